"""DeepSpeed's compiled ops (CPU Adam under optimizer offload, shared-memory collectives on CPU):
where they are kept, a word before a first build, and no endless wait on a build that was killed.

DeepSpeed compiles these through torch's cpp_extension on first use, about a minute each on 2
cores, into a folder per op. The build holds a `lock` file in that folder, and every other
process that needs the op waits for the file to go, with no time limit; it waits even when the
op is already built. A build killed part-way (kill -9, a preempted job, a node that died) leaves
the file behind, and every later run on that cache would wait forever before its first step.
Here a lock in a folder where nothing has changed for STALE_AFTER_S (or RAFT_DIST_OPS_LOCK_STALE_S
seconds) is taken as left by such a build and removed, with a warning that names it; a live build,
here or on another machine that shares the cache, is waited for.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from raft_dist.config import Recipe
from raft_dist.errors import ConfigError

# A live build writes into its folder at every compile step (~1 min on 2 cores, a few under
# heavy load); a lock left this long without a change belongs to a build that is gone.
STALE_AFTER_S = 600.0
STALE_VARIABLE = "RAFT_DIST_OPS_LOCK_STALE_S"  # overrides STALE_AFTER_S (seconds)


def use_recipe_cache(recipe: Recipe) -> None:
    """training.ops_cache_dir, when set, is where the ops are kept (torch reads the variable)."""
    if recipe.training.ops_cache_dir:
        os.environ["TORCH_EXTENSIONS_DIR"] = recipe.training.ops_cache_dir


def op_folder(op: str) -> Path:
    """The folder torch's cpp_extension builds `op` in and loads it from: TORCH_EXTENSIONS_DIR/op,
    else a folder per Python and device build in torch's user cache (py311_cpu/op, py312_cu128/op),
    the rule of cpp_extension._get_build_directory."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / op
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        device = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        device = "cu" + torch.version.cuda.replace(".", "")
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{device}" / op


def prepare_op_builds(recipe: Recipe, ops: list[str], is_main: bool) -> None:
    """Before DeepSpeed loads `ops` (on every rank): say which will be compiled, and clear a
    lock that a killed build left."""
    use_recipe_cache(recipe)
    folders = {op: op_folder(op) for op in ops}
    missing = [op for op, folder in folders.items() if not any(folder.glob("*.so"))]
    if missing and is_main:
        cache = folders[missing[0]].parent
        print(
            f"DeepSpeed compiles {', '.join(missing)} on first use (about a minute each on 2 "
            f"cores); later runs reuse the cache in {cache} (training.ops_cache_dir or "
            "TORCH_EXTENSIONS_DIR).",
            flush=True,
        )
    stale_after_s = stale_limit()
    for folder in folders.values():
        wait_for_live_build(folder, is_main, stale_after_s)


def stale_limit() -> float:
    """STALE_AFTER_S, or the seconds RAFT_DIST_OPS_LOCK_STALE_S gives."""
    given = os.environ.get(STALE_VARIABLE)
    if not given:
        return STALE_AFTER_S
    try:
        seconds = float(given)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:  # also NaN
        raise ConfigError(f"{STALE_VARIABLE}={given!r}: expected a number of seconds above 0")
    return seconds


def wait_for_live_build(
    folder: Path, is_main: bool, stale_after_s: float = STALE_AFTER_S, poll_s: float = 1.0
) -> None:
    """Returns once `folder` has no lock: a live build ended, or a stale lock was removed."""
    lock = folder / "lock"
    said = False
    while lock.exists():
        quiet_s = time.time() - last_change(folder)
        if quiet_s >= stale_after_s:
            try:
                lock.unlink()
            except FileNotFoundError:  # another rank removed it first, and said so
                return
            print(
                f"warning: {lock}: removed a lock that nothing has touched for "
                f"{duration(quiet_s)}, left by a build that was killed; the op is built again",
                file=sys.stderr,
                flush=True,
            )
            return
        if is_main and not said:
            print(
                f"waiting for a build of {folder.name} in progress ({lock}); a lock with no "
                f"change for {duration(stale_after_s)} is taken as left by a killed build",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(poll_s)


def last_change(folder: Path) -> float:
    """The newest modification time in the folder (the folder itself included), 0 if gone."""
    times = []
    for path in [folder, *folder.iterdir()] if folder.is_dir() else []:
        try:
            times.append(path.stat().st_mtime)
        except FileNotFoundError:  # a build renames and removes files as it goes
            continue
    return max(times, default=0.0)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
