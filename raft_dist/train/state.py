"""The training progress: exactly what a checkpoint's trainer_state.json holds.

Model, optimizer, RNG and the LR schedule are saved by Accelerate beside it; each rank's data
position is saved by its stream. Everything else the loop needs to continue is here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    # Optimizer steps in the current epoch: a resume that lands on an epoch's end must know
    # whether the epoch trained at all (an empty one means every example was dropped).
    epoch_steps: int = 0
    target_tokens: float = 0.0  # tokens the loss was computed on, all ranks
    input_tokens: float = 0.0  # tokens fed to the model (non-pad), all ranks
    evals: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0  # updates skipped for a non-finite gradient (training.nonfinite=skip)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in known})


@dataclass(frozen=True)
class Stop:
    """Why a run ended before its schedule did, and after which optimizer step."""

    reason: str  # "stop_after_steps" | "stop_requested" (a signal or the request file)
    step: int
    detail: str = ""  # e.g. "signal SIGTERM"

    @property
    def resumable_interruption(self) -> bool:
        """Stopped from outside (preemption, time limit): the launcher says "requeue me".
        stop_after_steps was asked for in the recipe and ends like a normal run."""
        return self.reason == "stop_requested"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
