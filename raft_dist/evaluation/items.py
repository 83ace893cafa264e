"""Eval sets: any format the readers accept becomes a list of `EvalItem`s, plus the
robustness variants (the same questions re-posed with the oracle and k distractors).

The prompt of an item comes from `to_example`, the function the training stream uses, so a
fine-tuned model is evaluated on exactly the layout it was trained on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from raft_dist.data.answers import extract_final_answer
from raft_dist.data.prompts import render_prompt
from raft_dist.data.reader import read_records
from raft_dist.data.records import to_example
from raft_dist.data.schema import Document, Example, RaftRecord
from raft_dist.data.sources import has_split, resolve_files
from raft_dist.errors import DataError

# The RAFT paper's robustness curve: oracle plus this many distractors.
ROBUSTNESS_COUNTS = (0, 1, 2, 4, 8)
MAIN = "main"


@dataclass(frozen=True)
class EvalItem:
    """One question to answer. `gold` is the final answer when the gold completion has an
    answer tag (`answer_only`: EM applies), otherwise the whole gold completion."""

    id: str
    where: str  # file:line, for messages and the predictions file
    prompt: str
    gold: str
    answer_only: bool
    completion: str  # the whole gold completion (sizes the generation budget)
    question: str | None = None
    documents: tuple[Document, ...] = ()
    oracle_index: int | None = None
    variant: str = MAIN  # "main", or "k=N" for a robustness variant

    @property
    def oracle(self) -> str | None:
        return None if self.oracle_index is None else self.documents[self.oracle_index].text

    @property
    def has_documents(self) -> bool:
        return bool(self.documents)


def eval_files(spec: str) -> list[Path]:
    """A data set folder's eval/ split when it has one, else every shard `spec` names."""
    split = "eval" if has_split(spec, "eval") else "train"
    return resolve_files(spec, split)


def item_from_record(record: RaftRecord | Example, where: str) -> EvalItem:
    example = to_example(record)
    gold_line = extract_final_answer(example.completion) or ""
    item = EvalItem(
        id=example.id,
        where=where,
        prompt=example.prompt,
        gold=gold_line or example.completion.strip(),
        answer_only=bool(gold_line),
        completion=example.completion,
    )
    if isinstance(record, RaftRecord):
        return replace(
            item,
            question=record.question,
            documents=record.documents,
            oracle_index=record.oracle_index,
        )
    return item


def load_eval_set(spec: str, limit: int | None = None) -> list[EvalItem]:
    """Every record of the set, in file order; a malformed record is an error naming its line
    (an eval set is small, and a silently skipped question would change every figure)."""
    items: list[EvalItem] = []
    seen: dict[str, str] = {}
    for path in eval_files(spec):
        for line, record in read_records(path):
            if isinstance(record, DataError):
                raise record
            where = f"{path}:{line}"
            item = item_from_record(record, where)
            if not item.gold:
                raise DataError(path, line, "the record has no answer to score against")
            if item.id in seen:  # ids key the predictions and the multi-rank gather
                item = replace(item, id=f"{item.id}@{where}")
            seen[item.id] = where
            items.append(item)
            if limit is not None and len(items) >= limit:
                return items
    return items


def robustness_items(
    items: Sequence[EvalItem],
    counts: Sequence[int] = ROBUSTNESS_COUNTS,
    *,
    seed: int = 0,
    limit: int | None = None,
) -> tuple[list[EvalItem], dict[int, int]]:
    """The oracle-bearing questions re-posed with the oracle plus k distractors for each k.

    Distractors are re-sampled from the eval set's own documents (other than the oracle), seeded
    by (seed, item id, k), so every model sees the same prompts. Returns the variants and, per
    count, how many questions could not get that many distractors (pool too small).
    """
    eligible = [item for item in items if item.oracle_index is not None and item.answer_only]
    if limit is not None and len(eligible) > limit:
        keep = sorted(random.Random(seed).sample(range(len(eligible)), limit))
        eligible = [eligible[i] for i in keep]  # the sample, in set order
    pool: dict[str, Document] = {}
    for item in items:
        for doc in item.documents:
            pool.setdefault(doc.text, doc)
    documents = list(pool.values())
    variants: list[EvalItem] = []
    short = {k: 0 for k in counts}
    for item in eligible:
        oracle = item.documents[item.oracle_index]  # type: ignore[index]
        others = [doc for doc in documents if doc.text != oracle.text]
        for k in counts:
            if k > len(others):
                short[k] += 1
                continue
            rng = random.Random(f"{seed}:{item.id}:{k}")
            chosen = rng.sample(others, k)
            position = rng.randrange(k + 1)
            chosen.insert(position, oracle)
            variants.append(
                replace(
                    item,
                    prompt=render_prompt(item.question or "", chosen),
                    documents=tuple(chosen),
                    oracle_index=position,
                    variant=f"k={k}",
                )
            )
    return variants, short
