"""Rows of (input_ids, labels) -> padded tensors; packing of examples into full-length rows."""

from __future__ import annotations

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


def pack_rows(
    examples: Iterator[Row],
    buffer_ids: list[int],
    buffer_labels: list[int],
    *,
    row_len: int,
    rows: int,
) -> list[Row]:
    """Fill up to `rows` rows of exactly `row_len` tokens; the rest stays in the buffer.

    The buffers are the stream's saved state and are changed in place. When the examples run
    out, what is left becomes one last shorter row so no token is lost at the end of an epoch.
    """
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
