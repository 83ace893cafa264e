"""The tokenized examples of a rank, kept from one epoch to the next.

RAFT fine-tunes are small data sets trained for several epochs, and tokenizing an example is
pure (the same line, tokenizer and settings give the same ids every time), so a rank that meets
a record again reuses its ids instead of parsing, formatting and tokenizing it again. On the
CPU that work competes with the step for the same cores (about 1 ms per 1k-token example with
the tiny tokenizer, ~6 % of a tiny-model step); later epochs then pay nothing.

The cache is a memo, not state: it is keyed by where a record lives (file, line), holds only
what the encoding returned, and starts empty in every process, so positions, checkpoints,
resume and the order of batches are exactly what they are without it (tests/test_streaming.py
compares the batches). What the overlong policy did is replayed into the length statistics on
every hit, so they count each epoch as before. Ids and labels are stored as int32 arrays
(8 bytes per token); past MAX_TOKENS per rank new records are no longer kept.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raft_dist.data.tokenize import LengthStats, Tokenized

# 32M tokens: 256 MiB per rank at most, a few hundred thousand RAFT examples.
MAX_TOKENS = 32 * 2**20

Outcome = Literal["kept", "truncated", "dropped"]


@dataclass(frozen=True)
class Encoded:
    example_id: str
    outcome: Outcome
    ids: array
    labels: array

    def replay(self, stats: LengthStats) -> Tokenized | None:
        """What encode_example returned, and its count in `stats`, once more."""
        if self.outcome == "dropped":
            stats.dropped += 1
            return None
        if self.outcome == "truncated":
            stats.truncated += 1
        stats.examples += 1
        return Tokenized(self.ids.tolist(), self.labels.tolist())


class EncodedCache:
    def __init__(self, max_tokens: int = MAX_TOKENS) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = 0
        self._entries: dict[tuple[Path, int], Encoded] = {}

    def get(self, path: Path, line: int) -> Encoded | None:
        found = self._entries.get((path, line))
        if found is not None:
            self.hits += 1
        return found

    def put(
        self, path: Path, line: int, example_id: str, outcome: Outcome, result: Tokenized | None
    ) -> None:
        """Keep what encode_example returned for this line and what its policy did."""
        size = max(1, 0 if result is None else len(result.input_ids))  # an entry costs too
        if self.tokens + size > self.max_tokens:
            return
        self._entries[(path, line)] = Encoded(
            example_id,
            outcome,
            array("i", result.input_ids if result is not None else ()),
            array("i", result.labels if result is not None else ()),
        )
        self.tokens += size


def outcome_of(before: LengthStats, after: LengthStats) -> Outcome:
    """What one encode_example call did, from the statistics before and after it."""
    if after.dropped > before.dropped:
        return "dropped"
    return "truncated" if after.truncated > before.truncated else "kept"
