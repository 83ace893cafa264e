"""Turn a data spec (data set folder, folder, glob or file) into an ordered list of shards.

A data set folder written by `raft-dist generate` has a manifest.json that lists every shard
with its record count and sha256; any other spec is a plain list of files that must be counted.
Counting (or trusting the manifest's counts once checked) is what lets every rank compute its
own disjoint slice without reading anyone else's data.
"""

from __future__ import annotations

import glob as globlib
import json
from dataclasses import dataclass
from pathlib import Path

from raft_dist.config import DataConfig
from raft_dist.data.reader import EMPTY_FILE, count_records
from raft_dist.errors import DataError

MANIFEST = "manifest.json"
JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Shard:
    """One file and how many records (JSONL: non-blank lines; text: lines) it holds."""

    path: Path
    records: int


@dataclass(frozen=True)
class ManifestShard:
    """A shard as the manifest declares it (checked against the file before it is trusted).
    A hand-written manifest may list paths only; then the shard is counted, not verified."""

    path: Path
    records: int | None
    sha256: str | None


def resolve_files(spec: str, split: str = "train", *, text: bool = False) -> list[Path]:
    """Files named by `spec`, sorted so every rank sees the same order."""
    manifest = manifest_shards(spec, split)
    if manifest is not None:
        return [entry.path for entry in manifest]
    suffixes = TEXT_SUFFIXES if text else JSONL_SUFFIXES
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(spec, None, "the glob matches no file")
        return files
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(spec, None, "no such file or folder")
    if (path / split).is_dir():
        path = path / split
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        wanted = " or ".join(suffixes)
        raise DataError(path, None, f"the folder holds no {wanted} file")
    return files


def manifest_path(spec: str) -> Path | None:
    path = Path(spec) / MANIFEST
    return path if path.is_file() else None


def manifest_shards(spec: str, split: str) -> list[ManifestShard] | None:
    """The manifest's shards of `split` (None when `spec` is not a data set folder).

    Shard paths must stay inside the data set folder: a manifest is data, and data must not
    make raft-dist read other files.
    """
    path = manifest_path(spec)
    if path is None:
        return None
    root = path.parent
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["splits"][split]["shards"]
        listed = [
            ManifestShard(
                root / str(e["path"]),
                int(e["records"]) if e.get("records") is not None else None,
                str(e["sha256"]) if e.get("sha256") is not None else None,
            )
            for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(path, None, f"no readable '{split}' split: {exc}") from None
    if not listed:
        raise DataError(path, None, f"the '{split}' split lists no shard")
    for entry in listed:
        if not entry.path.resolve().is_relative_to(root.resolve()):
            raise DataError(path, None, f"shard path {entry.path} is outside the data set folder")
        if not entry.path.is_file():
            raise DataError(entry.path, None, f"listed in {path} but missing")
    return listed


def has_split(spec: str, split: str) -> bool:
    """Whether a data set folder holds `split` (used to find eval/ next to train/)."""
    root = Path(spec)
    if not root.is_dir():
        return False
    if (root / MANIFEST).is_file():
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            return bool(manifest["splits"][split]["shards"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
    return (root / split).is_dir()


def eval_source(data: DataConfig) -> str | None:
    """data.eval, or else the eval/ split of the data set folder given as data.train."""
    if data.eval:
        return data.eval
    return data.train if data.train and has_split(data.train, "eval") else None


def data_splits(data: DataConfig) -> dict[str, str]:
    """split name -> data spec, for every split a run reads."""
    splits = {"train": str(data.train)}
    eval_spec = eval_source(data)
    if eval_spec:
        splits["eval"] = eval_spec
    return splits


def index_shards(files: list[Path], *, text: bool = False) -> list[Shard]:
    """Count every file; an empty shard is an error because it usually means a failed write."""
    shards = []
    for file in files:
        records = count_records(file, text=text)
        if records == 0:
            raise DataError(file, None, EMPTY_FILE)
        shards.append(Shard(file, records))
    return shards


def load_shards(spec: str, split: str = "train", *, text: bool = False) -> list[Shard]:
    """Counted shards. This reads every file; a run instead gets its shards from
    `raft_dist.data.check`, which counts (or checks the manifest) once for all ranks."""
    return index_shards(resolve_files(spec, split, text=text), text=text)
