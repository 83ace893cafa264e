"""Small collectives shared by the training loop and evaluation."""

from __future__ import annotations

from typing import Any


def sum_over_ranks(accelerator: Any, values: list[float]) -> list[float]:
    """Sum small per-rank statistics over all ranks in one collective (float64, so token
    counts stay exact far beyond what one run reaches)."""
    import torch

    local = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    return accelerator.gather(local).sum(dim=0).tolist()


def gather_lists(local: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank.

    torch.distributed directly: Accelerate's gather_object returns the local list unchanged
    when its state calls the launch non-distributed (seen with a CPU launch), which would
    silently drop the other ranks' part.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]
