"""The answer format of RAFT completions: quoted evidence and a final `<ANSWER>:` line.

Every path that reads an answer (training data checks, evaluation, `ask`, generation) goes
through these functions, so the format is defined here and nowhere else.
"""

from __future__ import annotations

import re

BEGIN_QUOTE = "##begin_quote##"
END_QUOTE = "##end_quote##"
ANSWER_TAG = "<ANSWER>:"

_QUOTE_RE = re.compile(re.escape(BEGIN_QUOTE) + r"(.*?)" + re.escape(END_QUOTE), re.DOTALL)


def cut_after_final_answer(text: str) -> str:
    """The text up to the end of the final-answer line (all of it without a tag): what a model
    writes after that line is not part of its answer."""
    index = text.rfind(ANSWER_TAG)
    if index < 0:
        return text
    end = text.find("\n", index)
    return text if end < 0 else text[:end]


def extract_final_answer(text: str) -> str | None:
    """The final answer: after the last tag, to the end of that line, so earlier tags inside
    the reasoning and later rambling are ignored. None without a tag.

    Apply this to the completion only: the prompt's instruction itself mentions the tag.
    """
    index = text.rfind(ANSWER_TAG)
    if index < 0:
        return None
    return cut_after_final_answer(text)[index + len(ANSWER_TAG) :].strip()


def extract_quotes(text: str) -> list[str]:
    """Quoted evidence spans, used to check that answers cite the documents; unclosed ones are
    ignored because a truncated generation cannot be trusted to quote correctly."""
    return [match.strip() for match in _QUOTE_RE.findall(text)]
