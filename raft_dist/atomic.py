"""Write to a temporary name, then swap it in: readers see the old version or the new one,
never a torn one, and a kill at any moment leaves the previous version intact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


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
