"""The single prompt template shared by training, evaluation and `ask`.

A model only answers well when it sees at inference the exact layout it was trained on, so every
code path that builds a prompt goes through `render_prompt` and every path that reads an answer
goes through `raft_dist.data.answers`. The template is kept short because the small models this
tool is tested with have context windows of only a few hundred tokens.

Layout::

    <DOCUMENT>{title}: {text}</DOCUMENT>      (or <DOCUMENT>{text}</DOCUMENT> without a title)
    ...
    Question: {question}
    {INSTRUCTION}
    Answer: {completion follows here}
"""

from __future__ import annotations

from collections.abc import Sequence

from raft_dist.data.answers import ANSWER_TAG, BEGIN_QUOTE, END_QUOTE
from raft_dist.data.schema import Document

INSTRUCTION = (
    "Answer using the documents. Reason step by step, quote the relevant text between "
    f'{BEGIN_QUOTE} and {END_QUOTE}, and finish with "{ANSWER_TAG} $answer".'
)
ANSWER_PREFIX = "Answer: "


def format_document(document: Document) -> str:
    """One document per line, titled only when a title exists so untitled chunks stay compact."""
    text = document.text.strip()
    title = document.title.strip()
    body = f"{title}: {text}" if title else text
    return f"<DOCUMENT>{body}</DOCUMENT>"


def render_prompt(question: str, documents: Sequence[Document]) -> str:
    """Build the prompt; the completion (chain of thought plus final answer) follows directly."""
    lines = [format_document(doc) for doc in documents]
    lines.append(f"Question: {question.strip()}")
    lines.append(INSTRUCTION)
    return "\n".join(lines) + "\n" + ANSWER_PREFIX
