"""`raft-dist ask`: put a question to a model, with documents the way it was trained.

Documents come from files (`--doc`) or from a corpus folder (`--corpus`); both are cut by the
chunker `generate` uses, and when there are more chunks than `top_k`, BM25 (the index hard
distractors are picked with) keeps the `top_k` closest to the question. The prompt is the
training template (`render_prompt`) and generation is the evaluation's (`generate_ids`), so
what `ask` shows is what `eval` scores. Without documents the question is the whole prompt:
that is how a plain-text or instruction fine-tune is tried.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from raft_dist.data.prompts import render_prompt
from raft_dist.data.schema import Document
from raft_dist.evaluation.metrics import final_answer, quote_spans

DEFAULT_TOP_K = 4
DEFAULT_CHUNK_SIZE = 1200  # generate's default, so chunks look like the training documents


@dataclass(frozen=True)
class Answer:
    output: str
    answer: str
    quotes: list[tuple[str, str | None]]  # (quote, title of the document it came from)
    documents: tuple[Document, ...]


class Library:
    """The chunks a question may draw documents from, with their BM25 index."""

    def __init__(self, files: Sequence[Path], chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        from raft_dist.generate.chunking import load_corpus
        from raft_dist.generate.distractors import Bm25Index

        corpus = load_corpus(list(files), chunk_size)
        self.chunks = corpus.chunks
        self.index = Bm25Index(chunk.text for chunk in self.chunks)

    def documents_for(self, question: str, top_k: int) -> tuple[Document, ...]:
        """All chunks when they fit in top_k (in file order), else the top_k by BM25, best
        first; a question sharing no word with any chunk gets the first top_k chunks."""
        if len(self.chunks) <= top_k:
            picked = [c.id for c in self.chunks]
        else:
            picked = [doc for doc, _ in self.index.ranked(question, top_k)][:top_k]
            if not picked:
                picked = [c.id for c in self.chunks[:top_k]]
        return tuple(Document(self.chunks[i].text, self.chunks[i].title) for i in picked)


def library_from(docs: Sequence[str], corpus: str | None, chunk_size: int) -> Library | None:
    from raft_dist.generate.chunking import find_sources

    specs = [*docs, *([corpus] if corpus else [])]
    if not specs:
        return None
    return Library(find_sources(specs), chunk_size)


def build_prompt(question: str, documents: Sequence[Document]) -> str:
    return render_prompt(question, documents) if documents else question


def source_of(quote: str, documents: Sequence[Document]) -> str | None:
    """Title (or `document N`) of the first document holding the quote verbatim."""
    squashed = " ".join(quote.split())
    for number, doc in enumerate(documents, 1):
        if squashed and squashed in " ".join(doc.text.split()):
            return doc.title or f"document {number}"
    return None


def answer_question(
    model: Any,
    tokenizer: Any,
    question: str,
    documents: Sequence[Document],
    max_new_tokens: int,
    *,
    stream: TextIO | None = None,
) -> Answer:
    from raft_dist.data.tokenize import encode_prompt
    from raft_dist.evaluation.generation import generate_ids

    streamer = None
    if stream is not None:
        from transformers import TextStreamer

        class _To(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                stream.write(text + ("\n" if stream_end else ""))
                stream.flush()

        streamer = _To(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = encode_prompt(tokenizer, build_prompt(question, documents))
    (output,) = generate_ids(model, tokenizer, [ids], max_new_tokens, streamer=streamer)
    quotes = [(q, source_of(q, documents)) for q in quote_spans(output)]
    return Answer(output, final_answer(output), quotes, tuple(documents))


def describe(answer: Answer) -> str:
    lines = []
    if answer.documents:
        lines.append("documents: " + "; ".join(d.title or "(untitled)" for d in answer.documents))
    for quote, title in answer.quotes:
        where = f"from {title}" if title else "NOT found in the documents"
        lines.append(f'quote ({where}): "{quote}"')
    if answer.documents:
        lines.append(f"answer: {answer.answer or '(no <ANSWER>: line)'}")
    return "\n".join(lines)


def interactive(ask_one: Any, read: TextIO = sys.stdin, write: TextIO = sys.stdout) -> None:
    """A prompt loop: one question per line; an empty line, `exit` or end of input ends it."""
    while True:
        write.write("question> ")
        write.flush()
        line = read.readline()
        if not line or line.strip().lower() in ("", "exit", "quit"):
            write.write("\n")
            return
        ask_one(line.strip())
