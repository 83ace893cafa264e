"""Rows of (input_ids, labels) -> padded tensors; packing of whole examples into rows.

Packing (data.packing) puts several whole examples into one row of at most max_seq_len tokens
and keeps them apart: position ids restart at each example, and attention is block-diagonal
(each token sees only earlier tokens of its own example), built from `sequence_ids` by
`block_causal_mask`. An example is never split across rows: its answer must not train
without its documents and question. The loss and gradients of a packed batch equal those of
the same examples run unpacked (a test checks it).

Plain-text fine-tuning (data.format=text) concatenates lines into full rows instead (`pack_rows`):
there a row is a window of one continuous text, as in classic causal-LM training.

Length grouping (data.group_by_length) is the cheap alternative to packing: examples stay one
per row, but a window of them is sorted by length before it is cut into micro batches
(`length_groups`), so the rows of a batch have similar lengths and little padding. Nothing
about the attention or the positions changes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from raft_dist.data.tokenize import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
Row = tuple[list[int], list[int]]


def collate(rows: list[Row], *, pad_id: int) -> Batch:
    """Right padding: causal attention never looks at the pad tokens after the real ones."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(targets)] = torch.tensor(targets, dtype=torch.long)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate_packed(rows: list[list[Row]], *, pad_id: int) -> Batch:
    """Rows of whole examples -> tensors with restarting positions and per-token example ids
    (-1 on padding). The first token of each example is never a target: in a packed row its
    label would otherwise be predicted from the previous example's last token."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    sequences = torch.full(shape, -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for number, (ids, targets) in enumerate(row):
            end = start + len(ids)
            input_ids[i, start:end] = torch.tensor(ids, dtype=torch.long)
            labels[i, start + 1 : end] = torch.tensor(targets[1:], dtype=torch.long)
            attention[i, start:end] = 1
            positions[i, start:end] = torch.arange(len(ids))
            sequences[i, start:end] = number
            start = end
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "position_ids": positions,
        "sequence_ids": sequences,
    }


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean mask, True = may attend: causal within each example. A padding
    token attends to itself only, so no attention row is empty (an empty row makes NaN)."""
    length = sequence_ids.size(1)
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    real = (sequence_ids >= 0)[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=sequence_ids.device)
    return ((same & real & causal) | diagonal)[:, None]


def pack_examples(
    examples: Iterator[Row],
    pending_ids: list[int],
    pending_labels: list[int],
    *,
    row_len: int,
    rows: int,
) -> list[list[Row]]:
    """Up to `rows` rows of whole examples, each row at most `row_len` tokens.

    The example that did not fit the last row waits in `pending_*` (the stream's saved state,
    changed in place) and opens the next row. Every example fits an empty row: longer ones
    were truncated or dropped by the overlong policy.
    """
    out: list[list[Row]] = []
    while len(out) < rows:
        row: list[Row] = []
        used = 0
        if pending_ids:
            row.append((list(pending_ids), list(pending_labels)))
            used = len(pending_ids)
            pending_ids.clear()
            pending_labels.clear()
        for ids, labels in examples:
            if used + len(ids) > row_len:
                pending_ids.extend(ids)
                pending_labels.extend(labels)
                break
            row.append((ids, labels))
            used += len(ids)
        if not row:
            break
        out.append(row)
    return out


def pack_rows(
    examples: Iterator[Row],
    buffer_ids: list[int],
    buffer_labels: list[int],
    *,
    row_len: int,
    rows: int,
) -> list[Row]:
    """Plain text: fill up to `rows` rows of exactly `row_len` tokens; the rest stays in the
    buffer (the stream's saved state, changed in place). When the text runs out, what is left
    becomes one last shorter row so no token is lost at the end of an epoch."""
    out: list[Row] = []
    while len(out) < rows:
        while len(buffer_ids) < row_len:
            nxt = next(examples, None)
            if nxt is None:
                break
            buffer_ids.extend(nxt[0])
            buffer_labels.extend(nxt[1])
        if not buffer_ids:
            break
        take = min(row_len, len(buffer_ids))
        out.append((buffer_ids[:take], buffer_labels[:take]))
        del buffer_ids[:take], buffer_labels[:take]
    return out


def length_groups(window: list[Row], *, batch_size: int, seed: str) -> list[list[Row]]:
    """A window of examples as micro batches of similar lengths, in a seeded random order.

    Sorted by token length, equal lengths in a seeded order (never by position, which would
    tie the order to the shard layout), cut into batches of `batch_size` (the last one of a
    short window may hold fewer), then the batches shuffled so that the longest ones do not
    all come last. The same window and seed always give the same batches. The stream keeps
    the batches not yet handed out in its saved position, so a resume never rebuilds a window.
    """
    rng = random.Random(seed)
    ties = [rng.random() for _ in window]
    order = sorted(range(len(window)), key=lambda i: (len(window[i][0]), ties[i]))
    batches = [
        [window[i] for i in order[start : start + batch_size]]
        for start in range(0, len(order), batch_size)
    ]
    rng.shuffle(batches)
    return batches
