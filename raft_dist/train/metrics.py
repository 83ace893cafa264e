"""Where training numbers go: metrics.jsonl in the run folder, Accelerate trackers, a bar."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Main process only: one JSON line per logged step, mirrored to TensorBoard/W&B."""

    def __init__(
        self, accelerator: Any, path: Path, total_steps: int, start_step: int, progress_bar: bool
    ) -> None:
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = path
        self.started = time.monotonic()
        self.bar = None
        if self.enabled and progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def log(self, step: int, values: dict[str, float]) -> None:
        values = {**values, "elapsed_s": round(time.monotonic() - self.started, 3)}
        self.accelerator.log(values, step=step)
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.bar is not None and "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def configure_logging(level: str, is_main: bool) -> logging.Logger:
    """Only the main process talks at info level; other ranks report warnings and errors."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logger = logging.getLogger("raft_dist")
    logger.setLevel(
        level.upper() if is_main else max(logging.WARNING, logging.getLevelName(level.upper()))
    )
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    return logger
