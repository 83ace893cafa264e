"""Small collectives shared by the training loop and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def sum_over_ranks(accelerator: Any, values: list[float]) -> list[float]:
    """Sum small per-rank statistics over all ranks in one collective (float64, so token
    counts stay exact far beyond what one run reaches)."""
    if accelerator.num_processes == 1:
        # Nothing to add: the gather would only copy the values to the device and wait for
        # them to come back (a host sync twice per step on a GPU).
        return [float(v) for v in values]
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


def decided_on_rank0(decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 only; every rank returns its result or raises its project error.

    For decisions about the shared run folder (locking it, choosing and checking a checkpoint):
    one rank decides so that ranks cannot disagree, and a refusal reaches every rank instead of
    leaving the others waiting in the next collective."""
    import torch.distributed as dist

    from raft_dist.errors import ConfigError, RaftDistError

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", decide())]
        except RaftDistError as exc:
            outcome = [("error", str(exc))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise ConfigError(value)
    return value


class HangWatch:
    """Names the ranks that stopped answering when a collective times out.

    A rank that hangs (rather than dies) leaves the others blocked in a collective until the
    process-group timeout (training.process_group_timeout_s). The timed-out group may be left
    unusable, so a separate gloo group, created while all ranks are healthy, runs
    monitored_barrier(wait_all_ranks=True): rank 0 learns which ranks never arrived."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")

    def unresponsive(self, seconds: float = 10.0) -> str:
        """'rank(s) ... did not answer' (rank 0), or '' when everyone answered or unknown."""
        import datetime

        import torch.distributed as dist

        if self.group is None:
            return ""
        try:
            dist.monitored_barrier(
                group=self.group, timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True
            )
        except RuntimeError as exc:
            return str(exc).strip().splitlines()[0]
        return ""


def is_collective_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this rank when the process that started it dies (Linux).

    torch elastic starts every rank in a session of its own, so `kill -9` on the launch's
    process group (a node's job killed) stops the launcher and the agent but not the ranks:
    they trained on as orphans, writing checkpoints and metrics into a run folder that the
    requeued job was about to resume from."""
    import os
    import signal
    import sys

    # Only under torch elastic (torchrun / accelerate launch): a rank started from a shell with
    # nohup must survive its shell.
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # the parent died before the request took hold
        os._exit(1)
