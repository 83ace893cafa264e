"""The shapes every data format is read into: RAFT records and prompt/completion examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raft_dist.data.answers import extract_final_answer


@dataclass(frozen=True)
class Document:
    text: str
    title: str = ""


@dataclass(frozen=True)
class RaftRecord:
    id: str
    question: str
    documents: tuple[Document, ...]
    oracle_index: int | None
    oracle: str
    cot_answer: str
    instruction: str | None = None

    @property
    def answer(self) -> str | None:
        """The final answer, which is what evaluation compares against."""
        return extract_final_answer(self.cot_answer)


@dataclass(frozen=True)
class Example:
    """What the training loop consumes: loss is taken on the completion only.

    `meta` keeps the keys of the source record that the format does not use (the seed
    project's `oracle_context`, `num_distractors`, `has_distractors`, ...), so nothing a user
    wrote is lost on the way through raft-dist.
    """

    id: str
    prompt: str
    completion: str
    meta: dict[str, Any] = field(default_factory=dict)
