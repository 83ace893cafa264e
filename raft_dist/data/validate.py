"""Whole-data-set check before a launch: every record parses, in one process, so a user mistake
is one clear line instead of a multi-rank crash report."""

from __future__ import annotations

from raft_dist.config import Recipe
from raft_dist.data.records import iter_records
from raft_dist.data.sources import eval_source, load_shards
from raft_dist.errors import DataError


def preflight(recipe: Recipe) -> dict[str, int]:
    """Records per split (and skipped ones); raises DataError at the first bad line."""
    d = recipe.data
    text = d.format == "text"
    splits = {"train": d.train}
    eval_spec = eval_source(d)
    if eval_spec:
        splits["eval"] = eval_spec
    counts: dict[str, int] = {}
    for split, spec in splits.items():
        shards = load_shards(spec, split, text=text)
        counts[split] = sum(s.records for s in shards)
        if text:
            for shard in shards:
                _check_utf8(shard.path)
            continue
        counter: dict = {}
        for shard in shards:
            for _ in iter_records(shard.path, skip_invalid=d.skip_invalid, counter=counter):
                pass
        if counter.get("skipped"):
            counts[f"{split}_skipped"] = counter["skipped"]
    return counts


def _check_utf8(path) -> None:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, number, f"invalid UTF-8: {exc.reason}") from None
