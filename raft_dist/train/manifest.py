"""A checkpoint's manifest: what it holds, written last, and the check that it is still intact.

`checkpoint-manifest.json` lists every file of the checkpoint with its size and, for periodic
saves, its sha256 (a save forced by a stop request skips hashing: a preempted Slurm job has
about 30 s of grace, and hashing multi-GB optimizer state would spend it). It is written after
every file of every rank is on disk and fsynced, so a checkpoint with a manifest is complete.

`problem_with` re-checks a checkpoint before anything of it is loaded: every listed file present
with its size (and hash when recorded), safetensors headers readable, every torch file's zip
directory readable, every rank's data position, RNG state and the JSON files parseable. It
returns what is wrong ("file: why"), so resume can name the file and fall back.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from raft_dist.atomic import write_json_atomic

MANIFEST = "checkpoint-manifest.json"
FORMAT = 1
_CHUNK = 8 << 20


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to stable storage.

    Every rank calls this on the whole checkpoint: on a shared filesystem each node's client
    flushes only the pages it wrote itself, so rank 0 alone could not make other nodes' files
    durable; each rank calls it after its own writes, so its own files are always listed.
    Linux accepts fsync on a read-only descriptor."""
    for path in sorted(folder.rglob("*"), reverse=True):
        try:
            _fsync_path(path)
        except FileNotFoundError:
            # Another rank's temporary file, renamed since the listing: that rank syncs its own.
            continue
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    _fsync_path(folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int, world_size: int, hashes: bool) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path) if hashes else None}
    write_json_atomic(
        folder / MANIFEST,
        {"format": FORMAT, "step": step, "world_size": world_size, "files": files},
    )


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, or ValueError saying why it cannot be used."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"{MANIFEST} is missing (the save did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{MANIFEST} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST} has no file list")
    return manifest


def problem_with(folder: Path, required: list[str]) -> str | None:
    """What is wrong with the checkpoint in `folder`, or None when it can be loaded.
    `required`: files the manifest must list (every rank's state, the loop's own files)."""
    try:
        manifest = read_manifest(folder)
    except ValueError as exc:
        return str(exc)
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{rel}: missing"
        size = path.stat().st_size
        if not isinstance(entry, dict) or size != entry.get("size"):
            want = entry.get("size") if isinstance(entry, dict) else "?"
            return f"{rel}: {size} bytes, the manifest says {want} (truncated or replaced)"
        if entry.get("sha256") and _sha256(path) != entry["sha256"]:
            return f"{rel}: content differs from the manifest's sha256 (corrupted)"
    for rel in manifest["files"]:
        problem = _unreadable(folder / rel)
        if problem:
            return f"{rel}: {problem}"
    for name in required:
        if name not in manifest["files"]:
            return f"{name}: missing from the manifest (not saved)"
    return None


def _unreadable(path: Path) -> str | None:
    """A cheap structural check per kind of file; None when it reads."""
    suffix = path.suffix
    try:
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".safetensors":
            _check_safetensors(path)
        elif suffix in (".bin", ".pt"):
            with zipfile.ZipFile(path) as archive:  # torch's format; the index sits at the end
                archive.namelist()
        elif suffix == ".pkl":
            _check_rng_state(path)
    except (OSError, UnicodeDecodeError, ValueError, zipfile.BadZipFile) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    except Exception as exc:  # torch.load's errors (UnpicklingError, RuntimeError, ...)
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(handle.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"tensors end at byte {8 + length + end}, the file has {size}")


def _check_rng_state(path: Path) -> None:
    """Accelerate's RNG states, read the way Accelerate reads them (weights_only, its allowed
    numpy globals: no code can run). Accelerate itself swallows a failed RNG load and resumes
    with fresh RNG without a word; this check makes that failure loud."""
    from accelerate.utils.other import load

    load(path, map_location="cpu")
