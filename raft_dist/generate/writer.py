"""Shards, manifest and the progress checkpoint that makes `generate` resumable.

Layout of an output folder::

    DIR/manifest.json                  written last (temp + os.replace): present means done
    DIR/train/shard-00000.jsonl ...    at most `shard_size` records each
    DIR/eval/shard-00000.jsonl ...
    DIR/.partial/{train,eval}/...      shards being written (moved into place when all are done)
    DIR/.progress.jsonl                header (settings) + one line per finished chunk

Each progress line holds, per split, the current shard's index and byte size after that chunk.
A resumed run truncates the shards back to the last recorded line and continues with the next
chunk; since every chunk's records depend only on the settings and the chunk, the result is
byte-identical to an uninterrupted run.

Durability: data and progress are flushed to the OS after every chunk (a killed process loses
nothing). fsync costs ~3 ms here, more than generating a chunk, so it runs at most once per
`sync_interval` seconds: shards first, then the progress file. After a power loss a resume
falls back to the last checkpoint whose shard sizes are all on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

from raft_dist.atomic import write_atomic
from raft_dist.data.records import shown
from raft_dist.data.sources import MANIFEST
from raft_dist.errors import ConfigError, DataError

PROGRESS = ".progress.jsonl"
PARTIAL = ".partial"
SPLITS = ("train", "eval")
FORMAT_VERSION = 1


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.jsonl"


def fingerprint(settings: dict[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- folder state


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable counts as absent: regenerate
        return None
    return value if isinstance(value, dict) else None


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [shown(str(k)) for k in keys if old.get(k) != new.get(k)]


def prepare(out: Path, settings: dict[str, Any], *, overwrite: bool) -> str:
    """Decide what to do with `out` without touching it: 'up to date', 'resume', 'fresh', or
    'replace' (clear it first; only with `overwrite`, else different settings are an error)."""
    if out.exists() and not out.is_dir():
        raise DataError(out, None, "exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    key = fingerprint(settings)
    manifest = read_json(out / MANIFEST)
    header = _read_header(out / PROGRESS)
    old = None
    if manifest is not None:
        generator = manifest.get("generator")
        generator = generator if isinstance(generator, dict) else {}
        if generator.get("fingerprint") == key and not overwrite:
            return "up to date"
        old = generator.get("settings") if isinstance(generator.get("settings"), dict) else {}
    elif header is not None:
        if header.get("fingerprint") == key and not overwrite:
            return "resume"
        old = header.get("settings") or {}
    if not overwrite:
        if old is None:
            raise ConfigError(
                f"{out} is not empty and holds no raft-dist data set; "
                "pass --overwrite to write into it anyway, or choose another --out"
            )
        changed = ", ".join(_differences(old, settings)) or "unknown"
        raise ConfigError(
            f"{out} holds a data set made with different settings (changed: {changed}); "
            "pass --overwrite to replace it"
        )
    return "replace"


def clear(out: Path) -> None:
    """Remove what `generate` writes (and only that), manifest first so a half-cleared folder
    never looks finished."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    for split in SPLITS:
        folder = out / split
        if folder.is_dir():
            for shard in folder.glob("shard-*.jsonl"):
                shard.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


def tidy(out: Path) -> None:
    """Drop a checkpoint left behind by a run killed after its manifest was written."""
    (out / PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)


def _read_header(path: Path) -> dict | None:
    try:
        with path.open("rb") as handle:
            first = handle.readline()
        value = json.loads(first)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and "fingerprint" in value else None


# --------------------------------------------------------------------------- the writer


class ShardWriter:
    """Appends JSONL lines to per-split shards and checkpoints after every chunk."""

    def __init__(
        self, out: Path, settings: dict[str, Any], shard_size: int, *, sync_interval: float = 1.0
    ) -> None:
        self.out = out
        self.partial = out / PARTIAL
        self.shard_size = shard_size
        self.sync_interval = sync_interval
        self.settings = settings
        self.done = 0  # chunks finished, in processing order
        self.counters: dict[str, int] = {}
        # split -> [current shard index, bytes in it, records in the split]
        self.state: dict[str, list[int]] = {split: [0, 0, 0] for split in SPLITS}
        self._handles: dict[str, BinaryIO] = {}
        self._last_sync = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        header = _read_header(out / PROGRESS)
        if header is not None and header.get("fingerprint") == fingerprint(settings):
            self._resume()
        else:
            self._start()

    # ---- start / resume

    def _start(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        for split in SPLITS:
            (self.partial / split).mkdir(parents=True, exist_ok=True)
        header = {"fingerprint": fingerprint(self.settings), "settings": self.settings}
        write_atomic(self.out / PROGRESS, (json.dumps(header, sort_keys=True) + "\n").encode())
        self._progress = open(self.out / PROGRESS, "ab")

    def _resume(self) -> None:
        path = self.out / PROGRESS
        with path.open("rb") as handle:
            lines = handle.read().split(b"\n")
        good_end = len(lines[0]) + 1
        checkpoints: list[tuple[int, dict]] = []
        offset = good_end
        for raw in lines[1:]:
            end = offset + len(raw) + 1
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict) or "done" not in entry:
                    break
            except ValueError:
                break  # a line cut short by the interruption
            checkpoints.append((end, entry))
            offset = end
        for split in SPLITS:
            (self.partial / split).mkdir(parents=True, exist_ok=True)
        chosen: tuple[int, dict] | None = None
        for end, entry in reversed(checkpoints):
            if self._fits(entry):
                chosen = (end, entry)
                break
        if chosen is not None:
            good_end, entry = chosen
            self.done = int(entry["done"])
            self.counters = dict(entry.get("counters", {}))
            self.state = {split: list(entry["splits"][split]) for split in SPLITS}
        else:
            self.state = {split: [0, 0, 0] for split in SPLITS}
        self._truncate()
        with path.open("r+b") as handle:
            handle.truncate(good_end)
        self._progress = open(path, "ab")

    def _fits(self, entry: dict) -> bool:
        """Whether the shard sizes a checkpoint recorded are all still on disk."""
        for split in SPLITS:
            index, size, _ = entry["splits"][split]
            for i in range(index):
                if not self._location(split, i).is_file():
                    return False
            current = self._location(split, index)
            if size and (not current.is_file() or current.stat().st_size < size):
                return False
        return True

    def _location(self, split: str, index: int) -> Path:
        """A shard lives in .partial until the finish moves it into place."""
        partial = self.partial / shard_name(split, index)
        return partial if partial.exists() else self.out / shard_name(split, index)

    def _truncate(self) -> None:
        """Cut the shards back to the chosen checkpoint; later shards go."""
        for split in SPLITS:
            index, size, _ = self.state[split]
            for shard in (self.partial / split).glob("shard-*.jsonl"):
                if int(shard.stem.split("-")[1]) > index:
                    shard.unlink()
            current = self.partial / shard_name(split, index)
            if current.exists():
                with current.open("r+b") as handle:
                    handle.truncate(size)

    # ---- writing

    def write(self, split: str, line: bytes) -> None:
        state = self.state[split]
        in_shard = state[2] - state[0] * self.shard_size
        if in_shard >= self.shard_size:
            self._close(split)
            state[0] += 1
            state[1] = 0
        handle = self._handles.get(split)
        if handle is None:
            handle = self._handles[split] = open(self.partial / shard_name(split, state[0]), "ab")
        handle.write(line)
        state[1] += len(line)
        state[2] += 1

    def _close(self, split: str) -> None:
        handle = self._handles.pop(split, None)
        if handle is not None:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()

    def checkpoint(self, done: int, counters: dict[str, int]) -> None:
        """Record that the first `done` chunks (in processing order) are written."""
        for handle in self._handles.values():
            handle.flush()
        self.done = done
        self.counters = dict(counters)
        entry = {"done": done, "splits": self.state, "counters": self.counters}
        self._progress.write((json.dumps(entry, sort_keys=True) + "\n").encode())
        self._progress.flush()
        now = time.monotonic()
        if now - self._last_sync >= self.sync_interval:
            self._sync()
            self._last_sync = now

    def _sync(self) -> None:
        for handle in self._handles.values():
            os.fsync(handle.fileno())
        os.fsync(self._progress.fileno())

    def close(self) -> None:
        for split in list(self._handles):
            self._close(split)
        if not self._progress.closed:
            self._progress.flush()
            self._progress.close()

    # ---- finishing

    def finish(self, generator: dict[str, Any]) -> dict[str, Any]:
        """Move the shards into place, then write the manifest, then drop the checkpoint."""
        self.close()
        splits: dict[str, Any] = {}
        for split in SPLITS:
            index, _, total = self.state[split]
            shards = []
            count = index + 1 if total else 0
            for i in range(count):
                records = min(self.shard_size, total - i * self.shard_size)
                final = self.out / shard_name(split, i)
                final.parent.mkdir(parents=True, exist_ok=True)
                partial = self.partial / shard_name(split, i)
                if partial.exists():
                    with partial.open("rb") as handle:
                        os.fsync(handle.fileno())
                    os.replace(partial, final)
                shards.append(
                    {"path": shard_name(split, i), "records": records, "sha256": _sha256(final)}
                )
            splits[split] = {"records": total, "shards": shards}
        manifest = {"format": "raft", "version": FORMAT_VERSION, "generator": generator}
        manifest["splits"] = splits
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        write_atomic(self.out / MANIFEST, text.encode("utf-8"))
        (self.out / PROGRESS).unlink(missing_ok=True)
        shutil.rmtree(self.partial, ignore_errors=True)
        return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
