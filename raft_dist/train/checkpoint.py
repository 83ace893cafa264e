"""Crash-safe checkpoints: Accelerate state + every rank's own data position.

A checkpoint is written into a hidden temporary folder and renamed into place only after all
ranks finished writing, so a kill at any moment leaves the previous checkpoint untouched;
`find_latest` only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from raft_dist.atomic import write_json_atomic
from raft_dist.errors import ConfigError
from raft_dist.train.deepspeed import deepspeed_plugin
from raft_dist.train.state import TrainState

STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.json"
# The LR schedule's state as JSON. It used to go through Accelerate's register_for_checkpointing,
# which loads custom_checkpoint_N.pkl with weights_only=False: a crafted checkpoint could run
# code on resume. raft-dist registers nothing, so Accelerate loads no such pickle.
LR_SCHEDULE = "lr_schedule.json"


def data_state_file(checkpoint: Path, name: str, rank: int) -> Path:
    return checkpoint / f"data_{name}_rank{rank}.json"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_latest(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """`latest` with no checkpoint yet starts fresh (a requeued job's first run)."""
    if resume is None:
        if list_checkpoints(root):
            raise ConfigError(
                f"output.dir already holds checkpoints in {root}; pass training.resume=latest to "
                "continue that run, or choose another output.dir"
            )
        return None
    if resume == "latest":
        return find_latest(root)
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"training.resume: {resume} is not a complete raft-dist checkpoint")
    return path


def save_checkpoint(
    accelerator: Any,
    root: Path,
    step: int,
    streams: dict[str, Any],
    trainer_state: TrainState,
    scheduler: Any,
    keep_last: int,
    adapters_only: bool = False,
) -> Path:
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # DeepSpeed saves through its engine, not the pre-hook: tell it to skip the frozen base.
    engine_kwargs = (
        {"exclude_frozen_parameters": True}
        if adapters_only and deepspeed_plugin(accelerator) is not None
        else {}
    )
    accelerator.save_state(str(tmp), **engine_kwargs)
    rank = accelerator.process_index
    for name, stream in streams.items():
        write_json_atomic(data_state_file(tmp, name, rank), stream.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / LR_SCHEDULE, scheduler.state_dict())
        write_json_atomic(tmp / TRAINER_STATE, trainer_state.to_dict())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Any,
    path: Path,
    streams: dict[str, Any],
    scheduler: Any,
    adapters_only: bool = False,
) -> TrainState:
    engine_kwargs = (
        {"load_module_strict": False}
        if adapters_only and deepspeed_plugin(accelerator) is not None
        else {}
    )
    pickles = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise ConfigError(
            f"training.resume: {path} holds {', '.join(pickles)}, a pickle raft-dist does not "
            "load (loading it could run any code). A checkpoint of an older raft-dist keeps "
            "its LR schedule there: delete the file to resume; the schedule is then recomputed "
            "from the step."
        )
    accelerator.load_state(str(path), **engine_kwargs)
    rank = accelerator.process_index
    for name, stream in streams.items():
        state_file = data_state_file(path, name, rank)
        if not state_file.is_file():
            raise ConfigError(
                f"training.resume: {path} has no data position for rank {rank}; it was written "
                "by a run with fewer processes. Resume with the same world size."
            )
        stream.load_state_dict(json.loads(state_file.read_text(encoding="utf-8")))
    state = TrainState.from_dict(json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")))
    _restore_schedule(scheduler, path, state)
    return state


def _restore_schedule(scheduler: Any, path: Path, state: TrainState) -> None:
    schedule = path / LR_SCHEDULE
    if schedule.is_file():
        scheduler.load_state_dict(json.loads(schedule.read_text(encoding="utf-8")))
        return
    # A checkpoint of an older raft-dist pickled the schedule; its pickle is never loaded. The
    # schedule is a function of the optimizer steps taken, so step it that far again.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(state.step - state.skipped_steps):
            scheduler.step()


ADAPTER_DIR = "adapter"


def register_adapter_checkpointing(accelerator: Any) -> None:
    """LoRA checkpoints hold the adapter only: the frozen base is rebuilt from the recipe.

    Accelerate's save_state writes the whole model unless a pre-hook takes the weights out of
    its list; the load hook restores the adapter and tells Accelerate there is no model file.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            if accelerator.is_main_process:
                unwrapped.save_pretrained(Path(output_dir) / ADAPTER_DIR)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        folder = Path(input_dir) / ADAPTER_DIR
        for model in models:
            state = load_file(folder / "adapter_model.safetensors")
            set_peft_model_state_dict(accelerator.unwrap_model(model), state)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
