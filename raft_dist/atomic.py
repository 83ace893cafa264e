"""Write to a temporary name, then swap it in: readers see the old version or the new one,
never a torn one, and a kill at any moment leaves the previous version intact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from raft_dist.errors import SaveError


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, json.dumps(payload, indent=1).encode("utf-8"))


def temp_dir_for(target: Path) -> Path:
    """A fresh sibling folder to build `target` in (same filesystem, so the swap is a rename)."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def swap_in_dir(tmp: Path, target: Path) -> None:
    """Replace `target` (a folder or nothing) by the finished folder `tmp`.

    Two renames with a short window where `target` is missing; readers that find it missing
    retry or fall back (a checkpoint folder is only trusted once complete).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def save_failure(
    what: str, target: Path, exc: BaseException, needed: int | None = None
) -> SaveError | None:
    """The one-line error for a failed save, or None when `exc` is not about the disk.

    Writers report a full disk differently: OSError(ENOSPC); torch.save a RuntimeError ("...
    iostream error") without an errno, which counts as disk-full when the filesystem has less
    room left than was needed; safetensors its own error type carrying the OS message."""
    import errno

    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    full = (
        getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        # safetensors' Rust writer: SafetensorError("... No space left on device (os error 28)")
        or "No space left on device" in str(exc)
        or (isinstance(exc, RuntimeError) and free < max(needed or 0, 1 << 20))
    )
    if full:
        need = f"needed about {_mib(needed)}, " if needed else ""
        return SaveError(
            f"{what} {target}: no space left on the device of {probe} ({need}{_mib(free)} free)"
        )
    if isinstance(exc, OSError):
        name = f" ({exc.filename})" if exc.filename else ""
        return SaveError(f"{what} {target}: {exc.strerror or exc}{name}")
    return None


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB"
