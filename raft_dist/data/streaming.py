"""Per-rank streaming of counted shards into token batches, with a resumable position.

Sharding rule (one mechanism, nowhere else): the epoch's shards are concatenated in a seeded
order and rank r owns the contiguous record range [N*r/W, N*(r+1)/W). Ranges are disjoint and
cover every record exactly once whatever the shard count; a rank reads only its own range
(`rank_segments`, which the run card reports too). A rank's position is (epoch, records
consumed, packing buffer, length-grouping window), so it fits in a JSON file and resuming skips
lines without tokenizing them. The shards and their counts come from `raft_dist.data.check`,
checked once per run; lines are read and parsed by `raft_dist.data.reader`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from raft_dist.config import Recipe
from raft_dist.data.batching import (
    Batch,
    Row,
    collate,
    collate_packed,
    length_groups,
    pack_examples,
    pack_rows,
)
from raft_dist.data.check import DataCheck
from raft_dist.data.encoded_cache import EncodedCache, outcome_of
from raft_dist.data.reader import Line, decode_text, iter_lines, parse_line
from raft_dist.data.records import to_example
from raft_dist.data.sources import Shard
from raft_dist.data.token_cache import TokenCache
from raft_dist.data.tokenize import (
    IGNORE_INDEX,
    LengthStats,
    encode_text_line,
    fit_example,
    tokenize_pair,
)
from raft_dist.errors import DataError


def rank_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous, disjoint, balanced to within one record."""
    return total * rank // world_size, total * (rank + 1) // world_size


def epoch_order(shards: list[Shard], epoch: int, seed: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class Segment:
    """Records start..stop-1 of one shard (counted within the shard)."""

    shard: Shard
    start: int
    stop: int


def segments(shards: list[Shard], start: int, end: int) -> list[Segment]:
    """The parts of the concatenated shards that hold records start..end-1."""
    out, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(end, offset + shard.records)
        if lo < hi:
            out.append(Segment(shard, lo - offset, hi - offset))
        offset += shard.records
    return out


def iter_range(shards: list[Shard], start: int, end: int, *, text: bool) -> Iterator[Line]:
    """Records start..end-1 of the concatenated shards, reading only the files that overlap."""
    for part in segments(shards, start, end):
        read = 0
        for line in iter_lines(part.shard.path, text=text, start=part.start, stop=part.stop):
            read += 1
            yield line
        if read < part.stop - part.start:
            raise DataError(part.shard.path, None, "the shard shrank while it was being read")


@dataclass
class StreamState:
    """Everything needed to continue a rank's stream exactly where it stopped."""

    epoch: int = 0
    consumed: int = 0
    buffer_ids: list[int] = field(default_factory=list)
    buffer_labels: list[int] = field(default_factory=list)
    # Length grouping: windows read so far this epoch (part of the next window's seed), and
    # the micro batches of the current window not handed out yet. The examples in them are
    # already counted in `consumed`, so they travel with the position, like the packing buffer.
    window: int = 0
    pending: list[list[Row]] = field(default_factory=list)


@dataclass
class StreamSettings:
    max_seq_len: int
    micro_batch_size: int
    text: bool = False
    packing: bool = False
    overlong: Literal["truncate", "drop"] = "truncate"
    skip_invalid: bool = False
    shuffle_shards: bool = False
    seed: int = 0
    group_by_length: int = 0  # window in micro batches; 0: off
    token_cache: bool = False  # keep token ids on disk for later runs (data/token_cache.py)


class RankStream:
    """The batches of one rank, epoch by epoch; `next_batch` returns None when its range ends."""

    def __init__(
        self,
        shards: list[Shard],
        tokenizer: Any,
        settings: StreamSettings,
        *,
        rank: int,
        world_size: int,
        seen_ids: list[str] | None = None,
    ) -> None:
        self.shards = shards
        self.tokenizer = tokenizer
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.total = sum(s.records for s in shards)
        self.state = StreamState()
        self.lengths = LengthStats()
        self.skipped = 0
        self.seen_ids = seen_ids
        self._examples: Iterator[tuple[list[int], list[int]]] | None = None
        self._encoded = EncodedCache()  # RAFT examples by (file, line), for later epochs
        # ... and by their text on disk, for later runs (None: off, or a slow tokenizer).
        self._token_cache = (
            TokenCache.open(tokenizer) if settings.token_cache and not settings.text else None
        )

    # -- position ---------------------------------------------------------------------------

    @property
    def range(self) -> tuple[int, int]:
        return rank_range(self.total, self.world_size, self.rank)

    def epoch_segments(self) -> list[Segment]:
        """What this rank reads in the current epoch: the stream reads exactly these, and the
        run card reports their count, so the card cannot disagree with the reading."""
        order = epoch_order(
            self.shards, self.state.epoch, self.settings.seed, self.settings.shuffle_shards
        )
        start, end = self.range
        return segments(order, start, end)

    @property
    def shard_count(self) -> int:
        """Shards this rank reads in the current epoch (for the run card)."""
        return len(self.epoch_segments())

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "total_records": self.total,
            "epoch": self.state.epoch,
            "consumed": self.state.consumed,
            "buffer_ids": list(self.state.buffer_ids),
            "buffer_labels": list(self.state.buffer_labels),
            "window": self.state.window,
            # Rows are never changed in place once made, so copying the lists that hold them
            # is enough to keep this snapshot apart from the stream's later state.
            "pending": [[[ids, labels] for ids, labels in batch] for batch in self.state.pending],
            "lengths": self.lengths.as_dict(),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size or state["total_records"] != self.total:
            raise DataError(
                "checkpoint",
                None,
                f"the data position was saved with {state['world_size']} ranks over "
                f"{state['total_records']} records; this run has {self.world_size} ranks over "
                f"{self.total} records. Resume with the same world size and data.",
            )
        self.state = StreamState(
            epoch=state["epoch"],
            consumed=state["consumed"],
            buffer_ids=list(state["buffer_ids"]),
            buffer_labels=list(state["buffer_labels"]),
            # Absent from positions saved before length grouping existed: nothing pending.
            window=state.get("window", 0),
            pending=[
                [(list(ids), list(labels)) for ids, labels in batch]
                for batch in state.get("pending", [])
            ],
        )
        self.lengths = LengthStats(**state["lengths"])
        self.skipped = state["skipped"]
        self._examples = None

    def start_epoch(self, epoch: int) -> None:
        self.state = StreamState(epoch=epoch)
        self._examples = None

    # -- reading ----------------------------------------------------------------------------

    def _raw_records(self) -> Iterator[Line]:
        start, end = self.range
        order = epoch_order(
            self.shards, self.state.epoch, self.settings.seed, self.settings.shuffle_shards
        )
        yield from iter_range(order, start + self.state.consumed, end, text=self.settings.text)

    def _tokenized(self) -> Iterator[tuple[list[int], list[int]]]:
        """(input_ids, labels) per record; `consumed` advances as each record is read."""
        for record in self._raw_records():
            self.state.consumed += 1
            if self.settings.text:
                # EOS between files, but not before the first line of the rank's range.
                new_document = record.line == 1 and self.state.consumed > 1
                ids = encode_text_line(
                    self.tokenizer, decode_text(record), new_document=new_document
                )
                yield ids, list(ids)
                continue
            cached = self._encoded.get(record.path, record.line)  # met in an earlier epoch
            if cached is not None:
                if self.seen_ids is not None:
                    self.seen_ids.append(cached.example_id)
                encoded = cached.replay(self.lengths)
                if encoded is not None:
                    yield encoded.input_ids, encoded.labels
                continue
            try:
                parsed = parse_line(record)
            except DataError:
                if not self.settings.skip_invalid:
                    raise
                self.skipped += 1
                continue
            example = to_example(parsed)
            if self.seen_ids is not None:
                self.seen_ids.append(example.id)
            before = replace(self.lengths)
            if self._token_cache is not None:
                prompt_ids, answer_ids = self._token_cache.tokenize(
                    record.path, example.prompt, example.completion
                )
            else:
                prompt_ids, answer_ids = tokenize_pair(
                    self.tokenizer, example.prompt, example.completion
                )
            encoded = fit_example(
                prompt_ids,
                answer_ids,
                eos_token_id=self.tokenizer.eos_token_id,
                max_len=self.settings.max_seq_len,
                overlong=self.settings.overlong,
                stats=self.lengths,
            )
            self._encoded.put(
                record.path, record.line, example.id, outcome_of(before, self.lengths), encoded
            )
            if encoded is not None:
                yield encoded.input_ids, encoded.labels
        self.save_token_cache()  # the range is read: what it tokenized is kept for later runs

    @property
    def token_cache_hits(self) -> int:
        return 0 if self._token_cache is None else self._token_cache.hits

    def save_token_cache(self) -> None:
        """Write the token ids made since the last write (the loop calls this at the end)."""
        if self._token_cache is not None:
            self._token_cache.flush()

    def next_batch(self) -> Batch | None:
        if self._examples is None:
            self._examples = self._tokenized()
        settings = self.settings
        pad_id = pad_token_id(self.tokenizer)
        if settings.text:
            rows = pack_rows(
                self._examples,
                self.state.buffer_ids,
                self.state.buffer_labels,
                row_len=settings.max_seq_len,
                rows=settings.micro_batch_size,
            )
            return collate(rows, pad_id=pad_id) if rows else None
        if settings.packing:
            packed = pack_examples(
                self._examples,
                self.state.buffer_ids,
                self.state.buffer_labels,
                row_len=settings.max_seq_len,
                rows=settings.micro_batch_size,
            )
            return collate_packed(packed, pad_id=pad_id) if packed else None
        if settings.group_by_length:
            rows = self._next_group()
            return collate(rows, pad_id=pad_id) if rows else None
        rows = []
        for ids, labels in self._examples:
            rows.append((ids, labels))
            if len(rows) == settings.micro_batch_size:
                break
        return collate(rows, pad_id=pad_id) if rows else None

    def _next_group(self) -> list[Row]:
        """The next micro batch of the current length-grouped window; a new window is read
        when the last one is used up. The last window of an epoch may be shorter."""
        state, settings = self.state, self.settings
        if not state.pending:
            assert self._examples is not None
            size = settings.group_by_length * settings.micro_batch_size
            window: list[Row] = []
            for example in self._examples:
                window.append(example)
                if len(window) == size:
                    break
            if not window:
                return []
            seed = f"{settings.seed}:{state.epoch}:{state.window}:length-groups"
            state.pending = length_groups(window, batch_size=settings.micro_batch_size, seed=seed)
            state.window += 1
        return state.pending.pop(0)


def build_streams(
    recipe: Recipe,
    tokenizer: Any,
    data: DataCheck,
    *,
    rank: int,
    world_size: int,
    seen_ids: list[str] | None,
) -> tuple[RankStream, RankStream | None]:
    """This rank's train stream and, when the data has one, its held-out stream."""
    d, t = recipe.data, recipe.training
    settings = StreamSettings(
        max_seq_len=d.max_seq_len,
        micro_batch_size=t.micro_batch_size,
        text=d.format == "text",
        packing=d.packing,
        overlong=d.overlong,
        skip_invalid=d.skip_invalid,
        shuffle_shards=d.shuffle_shards,
        seed=t.seed,
        group_by_length=d.group_by_length or 0,
        token_cache=d.token_cache,
    )
    train = RankStream(
        data.splits["train"].shards,
        tokenizer,
        settings,
        rank=rank,
        world_size=world_size,
        seen_ids=seen_ids,
    )
    if "eval" not in data.splits:
        return train, None
    held_out = RankStream(
        data.splits["eval"].shards,
        tokenizer,
        # Unsorted: eval_batches then caps the same examples whatever the grouping.
        replace(settings, shuffle_shards=False, group_by_length=0),
        rank=rank,
        world_size=world_size,
    )
    return train, held_out


def pad_token_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def padding_batch(tokenizer: Any) -> Batch:
    """A zero-weight batch (no target token) for a rank whose range ended before the others'."""
    return collate([([pad_token_id(tokenizer)] * 2, [IGNORE_INDEX] * 2)], pad_id=0)
