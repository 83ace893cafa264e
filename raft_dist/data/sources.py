"""Turn a data spec (data set folder, folder, glob or file) into an ordered list of counted shards.

Counting records up front is what lets every rank compute its own disjoint slice without reading
anyone else's data and without holding the data set in memory.
"""

from __future__ import annotations

import glob as globlib
import json
from dataclasses import dataclass
from pathlib import Path

from raft_dist.config import DataConfig
from raft_dist.errors import DataError

MANIFEST = "manifest.json"
JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Shard:
    """One file and how many records (JSONL: non-blank lines; text: lines) it holds."""

    path: Path
    records: int


def resolve_files(spec: str, split: str = "train", *, text: bool = False) -> list[Path]:
    """Files named by `spec`, sorted so every rank sees the same order."""
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
    if (path / MANIFEST).is_file():
        return _manifest_files(path, split)
    if (path / split).is_dir():
        path = path / split
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        wanted = " or ".join(suffixes)
        raise DataError(path, None, f"the folder holds no {wanted} file")
    return files


def _manifest_files(root: Path, split: str) -> list[Path]:
    manifest_path = root / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = manifest["splits"][split]["shards"]
        files = [root / entry["path"] for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(manifest_path, None, f"no readable '{split}' split: {exc}") from None
    for file in files:
        if not file.is_file():
            raise DataError(file, None, f"listed in {manifest_path} but missing")
    if not files:
        raise DataError(manifest_path, None, f"the '{split}' split lists no shard")
    return files


def has_split(spec: str, split: str) -> bool:
    """Whether a data set folder holds `split` (used to find eval/ next to train/)."""
    root = Path(spec)
    if not root.is_dir():
        return False
    if (root / MANIFEST).is_file():
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            return bool(manifest["splits"][split]["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return (root / split).is_dir()


def eval_source(data: DataConfig) -> str | None:
    """data.eval, or else the eval/ split of the data set folder given as data.train."""
    if data.eval:
        return data.eval
    return data.train if data.train and has_split(data.train, "eval") else None


def count_records(path: Path, *, text: bool = False) -> int:
    """Records in a file without parsing it (blank JSONL lines are not records)."""
    count = 0
    try:
        with path.open("rb") as handle:
            for line in handle:
                if text or line.strip():
                    count += 1
    except OSError as exc:
        raise DataError(path, None, f"cannot read: {exc.strerror or exc}") from None
    return count


def index_shards(files: list[Path], *, text: bool = False) -> list[Shard]:
    """Count every file; an empty shard is an error because it usually means a failed write."""
    shards = []
    for file in files:
        records = count_records(file, text=text)
        if records == 0:
            raise DataError(file, None, "the shard is empty (no records)")
        shards.append(Shard(file, records))
    return shards


def load_shards(spec: str, split: str = "train", *, text: bool = False) -> list[Shard]:
    return index_shards(resolve_files(spec, split, text=text), text=text)
