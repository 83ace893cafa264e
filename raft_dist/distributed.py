"""Small collectives shared by the training loop and evaluation."""

from __future__ import annotations

from typing import Any


def sum_over_ranks(accelerator: Any, values: list[float]) -> list[float]:
    """Sum small per-rank statistics over all ranks in one collective (float64, so token
    counts stay exact far beyond what one run reaches)."""
    import torch

    local = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    return accelerator.gather(local).sum(dim=0).tolist()
