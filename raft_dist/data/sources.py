"""Turn a data spec (data set folder, folder, glob or file) into an ordered list of shards.

A data set folder written by `raft-dist generate` has a manifest.json that lists every shard
with its record count and sha256; any other spec is a plain list of files that must be counted.
Counting (or trusting the manifest's counts once checked) is what lets every rank compute its
own disjoint slice without reading anyone else's data.
"""

from __future__ import annotations

import glob as globlib
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raft_dist.config import DataConfig
from raft_dist.data.reader import EMPTY_FILE, count_records, load_json_file
from raft_dist.data.records import shown
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
        raise DataError(path, None, no_files_message(Path(spec), suffixes))
    return files


def no_files_message(folder: Path, suffixes: tuple[str, ...] = JSONL_SUFFIXES) -> str:
    """A folder without data files; when it holds data `raft-dist convert` reads, the command."""
    return f"the folder holds no {' or '.join(suffixes)} file{_convert_hint(folder)}"


def _convert_hint(folder: Path) -> str:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        held = "a Hugging Face datasets folder"
    elif any(folder.rglob("*.parquet")):
        held = "Parquet files"
    else:
        return ""
    return f" (it holds {held}: `raft-dist convert {shlex.quote(str(folder))} --to raft --out DIR`)"


def manifest_path(spec: str) -> Path | None:
    path = Path(spec) / MANIFEST
    return path if path.is_file() else None


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest as a JSON object; every way it can be unreadable is a DataError naming it."""
    manifest = load_json_file(path, "manifest")
    if not isinstance(manifest, dict):
        raise DataError(path, None, f"a manifest is a JSON object, got {_json_type(manifest)}")
    return manifest


def manifest_shards(spec: str, split: str) -> list[ManifestShard] | None:
    """The manifest's shards of `split` (None when `spec` is not a data set folder).

    Shard paths must stay inside the data set folder: a manifest is data, and data must not
    make raft-dist read other files.
    """
    path = manifest_path(spec)
    if path is None:
        return None
    name = shown(split)  # a split name comes from the file: keep every message one line
    splits = read_manifest(path).get("splits")
    if not isinstance(splits, dict):
        raise DataError(path, None, f'"splits" must be an object, got {_json_type(splits)}')
    if split not in splits:
        raise DataError(path, None, f"no '{name}' split (the manifest has: {_names(splits)})")
    info = splits[split]
    entries = info.get("shards") if isinstance(info, dict) else None
    if not isinstance(entries, list):
        raise DataError(path, None, f'"splits.{name}.shards" must be a list of shards')
    if not entries:
        raise DataError(path, None, f"the '{name}' split lists no shard")
    return [_manifest_shard(path, f"splits.{name}.shards[{i}]", e) for i, e in enumerate(entries)]


def _manifest_shard(manifest: Path, where: str, entry: object) -> ManifestShard:
    if not isinstance(entry, dict):
        raise DataError(manifest, None, f'"{where}" must be an object, got {_json_type(entry)}')
    name = entry.get("path")
    if not isinstance(name, str) or not name.strip():
        got = "an empty string" if isinstance(name, str) else _json_type(name)
        raise DataError(manifest, None, f'"{where}.path" must be a file name, got {got}')
    sha256 = entry.get("sha256")
    if sha256 is not None and not isinstance(sha256, str):
        got = _json_type(sha256)
        raise DataError(manifest, None, f'"{where}.sha256" must be a string, got {got}')
    shard = ManifestShard(manifest.parent / name, _record_count(manifest, where, entry), sha256)
    _check_inside(manifest, name, shard.path)
    return shard


def _record_count(manifest: Path, where: str, entry: dict) -> int | None:
    value = entry.get("records")
    if value is None:
        return None
    try:
        count = int(value)  # "2" and 2.0 from hand-written manifests are fine
    except (TypeError, ValueError, OverflowError):
        count = -1
    if isinstance(value, bool) or count < 0 or (isinstance(value, float) and value != count):
        got = repr(value) if isinstance(value, (int, float, str)) else _json_type(value)
        raise DataError(manifest, None, f'"{where}.records" must be a whole number >= 0, got {got}')
    return count


def _check_inside(manifest: Path, name: str, path: Path) -> None:
    """The shard must be a file inside the data set folder, links resolved."""
    if "\x00" in name:
        raise DataError(manifest, None, f"shard path {name!r} is not a valid file name")
    try:
        inside = path.resolve().is_relative_to(manifest.parent.resolve())
        exists = inside and path.is_file()
    except (OSError, ValueError) as exc:  # e.g. a name longer than the file system allows
        reason = getattr(exc, "strerror", None) or exc
        raise DataError(manifest, None, f"shard path {shown(name)} is unusable: {reason}") from None
    if not inside:
        raise DataError(manifest, None, f"shard path {shown(name)} is outside the data set folder")
    if not exists:
        raise DataError(manifest, None, f"shard path {shown(name)} is listed but no such file")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _names(splits: dict) -> str:
    return ", ".join(shown(str(name)) for name in splits) or "no split"


def has_split(spec: str, split: str) -> bool:
    """Whether a data set folder holds `split` (used to find eval/ next to train/)."""
    root = Path(spec)
    if not root.is_dir():
        return False
    if (root / MANIFEST).is_file():
        try:
            splits = read_manifest(root / MANIFEST).get("splits")
        except DataError:
            return False  # reported when the train split is read from the same manifest
        info = splits.get(split) if isinstance(splits, dict) else None
        return isinstance(info, dict) and bool(info.get("shards"))
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
