"""Learning-rate schedule stepped once per optimizer step, by the loop itself.

The scheduler is deliberately not passed to `accelerator.prepare`: a prepared scheduler is
stepped num_processes times per optimizer step, which ends the schedule halfway on 2 ranks.
"""

from __future__ import annotations

import math
from typing import Any

from raft_dist.config import TrainingConfig


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base LR before optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: Any, cfg: TrainingConfig, total_steps: int) -> Any:
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        return lr_factor(
            step,
            total=total_steps,
            warmup=cfg.warmup_steps,
            kind=cfg.lr_schedule,
            min_ratio=cfg.min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)
