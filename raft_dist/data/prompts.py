"""The single prompt template shared by training, evaluation and `ask`.

A model only answers well when it sees at inference the exact layout it was trained on, so every
code path that builds a prompt goes through `render_prompt` and every path that reads an answer
goes through `extract_final_answer`. The template is kept short because the small models this
tool is tested with have context windows of only a few hundred tokens.

Layout::

    <DOCUMENT>{title}: {text}</DOCUMENT>      (or <DOCUMENT>{text}</DOCUMENT> without a title)
    ...
    Question: {question}
    {INSTRUCTION}
    Answer: {completion follows here}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raft_dist.data.records import Document

BEGIN_QUOTE = "##begin_quote##"
END_QUOTE = "##end_quote##"
ANSWER_TAG = "<ANSWER>:"

INSTRUCTION = (
    "Answer using the documents. Reason step by step, quote the relevant text between "
    f'{BEGIN_QUOTE} and {END_QUOTE}, and finish with "{ANSWER_TAG} $answer".'
)
ANSWER_PREFIX = "Answer: "

_QUOTE_RE = re.compile(re.escape(BEGIN_QUOTE) + r"(.*?)" + re.escape(END_QUOTE), re.DOTALL)


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


def extract_final_answer(text: str) -> str | None:
    """The final answer after the last tag, so earlier tags inside the reasoning are ignored.

    Apply this to the completion only: the prompt's instruction itself mentions the tag.
    """
    index = text.rfind(ANSWER_TAG)
    if index < 0:
        return None
    return text[index + len(ANSWER_TAG) :].strip()


def extract_quotes(text: str) -> list[str]:
    """Quoted evidence spans, used to check that answers cite the documents; unclosed ones are
    ignored because a truncated generation cannot be trusted to quote correctly."""
    return [match.strip() for match in _QUOTE_RE.findall(text)]
