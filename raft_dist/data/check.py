"""Check the whole data set once per run, and remember that it was checked.

Who reads what:

* `raft-dist launch` runs `check_data` before it starts any rank (on machine rank 0 only when
  several machines launch): every shard's sha256 and record count against its manifest, every
  line through the one reader. It then writes a stamp into the run folder: the data spec, the
  manifest's own digest, and each shard's path, size and modification time.
* In the run, global rank 0 trusts a stamp that still matches the files on disk; without one
  (`raft-dist train`, a bare `accelerate launch`, `srun`) it runs the same `check_data` itself
  and writes the stamp. The result, the counted shards of every split, is broadcast to all ranks,
  so no rank counts or parses anyone else's data, and no route trains on a shard whose hash does
  not match its manifest.

With a manifest the check proves the manifest's counts; without one the files are counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raft_dist.atomic import write_json_atomic
from raft_dist.config import DataConfig
from raft_dist.data.reader import EMPTY_FILE, decode_text, iter_lines, read_records
from raft_dist.data.sources import Shard, data_splits, manifest_path, manifest_shards, resolve_files
from raft_dist.errors import DataError

STAMP_VERSION = 1


@dataclass
class SplitCheck:
    spec: str
    shards: list[Shard]
    skipped: int = 0
    manifest_sha256: str | None = None

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)


@dataclass
class DataCheck:
    splits: dict[str, SplitCheck] = field(default_factory=dict)
    source: str = "checked"  # "checked" now, or "stamp" (checked before by the launcher)

    def counts(self) -> dict[str, int]:
        """Records per split, and the invalid ones skipped (data.skip_invalid)."""
        out: dict[str, int] = {}
        for split, check in self.splits.items():
            out[split] = check.records
            if check.skipped:
                out[f"{split}_skipped"] = check.skipped
        return out


def _digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_file(path: Path, data: DataConfig, digest: Any) -> tuple[int, int]:
    """(records, skipped invalid) of one file, read to the end through the one reader."""
    records = skipped = 0
    if data.format == "text":
        for line in iter_lines(path, text=True, digest=digest):
            decode_text(line)
            records += 1
    else:
        for _, result in read_records(path, digest=digest):
            records += 1
            if isinstance(result, DataError):
                if not data.skip_invalid:
                    raise result
                skipped += 1
    if records == 0:
        raise DataError(path, None, EMPTY_FILE)
    return records, skipped


def check_split(spec: str, split: str, data: DataConfig) -> SplitCheck:
    manifest = manifest_shards(spec, split)
    files = (
        [m.path for m in manifest]
        if manifest is not None
        else resolve_files(spec, split, text=data.format == "text")
    )
    result = SplitCheck(spec, [])
    for index, path in enumerate(files):
        digest = hashlib.sha256() if manifest is not None else None
        records, skipped = _check_file(path, data, digest)
        if manifest is not None and digest is not None:
            declared = manifest[index]
            if declared.sha256 is not None and digest.hexdigest() != declared.sha256:
                raise DataError(
                    path,
                    None,
                    f"sha256 {digest.hexdigest()} does not match the manifest's "
                    f"{declared.sha256}: the shard changed after it was written",
                )
            if declared.records is not None and records != declared.records:
                raise DataError(
                    path, None, f"{records} records, the manifest says {declared.records}"
                )
        result.shards.append(Shard(path, records))
        result.skipped += skipped
    found = manifest_path(spec)
    result.manifest_sha256 = _digest_file(found) if found is not None else None
    return result


def check_data(data: DataConfig) -> DataCheck:
    """Every split of the run, fully checked; raises DataError at the first problem."""
    return DataCheck(
        {split: check_split(spec, split, data) for split, spec in data_splits(data).items()}
    )


# --------------------------------------------------------------------------- the stamp


def _data_key(data: DataConfig) -> dict[str, Any]:
    """What the stamp was made for: another spec, format or skip rule needs another check."""
    return {
        "train": data.train,
        "eval": data.eval,
        "format": data.format,
        "skip_invalid": data.skip_invalid,
    }


def _file_key(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def write_stamp(path: Path, check: DataCheck, data: DataConfig) -> None:
    splits = {}
    for split, result in check.splits.items():
        splits[split] = {
            "spec": result.spec,
            "skipped": result.skipped,
            "manifest_sha256": result.manifest_sha256,
            "shards": [{**_file_key(s.path), "records": s.records} for s in result.shards],
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"version": STAMP_VERSION, "data": _data_key(data), "splits": splits})


def read_stamp(path: Path, data: DataConfig) -> DataCheck | None:
    """The stamped check when it still describes the files on disk, else None (check again).

    Any doubt (no stamp, another data spec, a file added, removed, resized or touched, a
    changed manifest, an unreadable stamp) means None: a stale stamp must never be trusted.
    """
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
        if stamp.get("version") != STAMP_VERSION or stamp.get("data") != _data_key(data):
            return None
        check = DataCheck(source="stamp")
        for split, spec in data_splits(data).items():
            entry = stamp["splits"][split]
            if entry["spec"] != spec:
                return None
            files = resolve_files(spec, split, text=data.format == "text")
            stamped = entry["shards"]
            if [str(f.resolve()) for f in files] != [s["path"] for s in stamped]:
                return None
            for file, saved in zip(files, stamped, strict=True):
                if {**_file_key(file), "records": saved["records"]} != saved:
                    return None
            found = manifest_path(spec)
            digest = _digest_file(found) if found is not None else None
            if digest != entry["manifest_sha256"]:
                return None
            shards = [Shard(f, int(s["records"])) for f, s in zip(files, stamped, strict=True)]
            check.splits[split] = SplitCheck(spec, shards, int(entry["skipped"]), digest)
        return check
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        OverflowError,  # int(inf)
        RecursionError,  # JSON nested deeper than the parser goes
        DataError,
    ):
        return None


def checked_data_for_run(accelerator: Any, data: DataConfig, stamp: Path) -> DataCheck:
    """The run's data, decided once by global rank 0 and broadcast to every rank."""
    from accelerate.utils import broadcast_object_list

    message: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            check = read_stamp(stamp, data)
            if check is None:
                check = check_data(data)
                write_stamp(stamp, check, data)
            message = [check]
        except DataError as exc:
            message = [str(exc)]
    broadcast_object_list(message)
    if isinstance(message[0], str):
        raise DataError.relayed(message[0])
    return message[0]
