"""Per-example answer metrics (SQuAD EM/F1, containment, format, quote fidelity) and their means.

Pure standard library so the metrics can be tested and reused without loading a model. The
answer format itself (tag, quote markers) is defined in `raft_dist.data.answers`, not here.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from raft_dist.data.answers import (
    ANSWER_TAG,
    BEGIN_QUOTE,
    END_QUOTE,
    extract_final_answer,
    extract_quotes,
)

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_WHITESPACE_RE = re.compile(r"\s+")


def _is_punctuation(char: str) -> bool:
    """ASCII punctuation includes symbols such as `$` and `+`; unicode adds curly quotes etc."""
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, so answers differing only in case, punctuation or articles match."""
    text = text.lower()
    text = "".join(char for char in text if not _is_punctuation(char))
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Normalised tokens, the unit that F1 and containment compare."""
    return normalize_answer(text).split()


def final_answer(output: str) -> str:
    """The answer line after the last tag; the reasoning may mention the tag earlier, and text
    on later lines is not part of the answer. Empty when the tag is missing."""
    return extract_final_answer(output) or ""


def follows_format(output: str) -> bool:
    """Whether the model produced a usable final answer in the trained format."""
    return final_answer(output) != ""


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, as in SQuAD."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(gold) else 0.0


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD token F1 over multisets, giving partial credit for partly right answers."""
    pred_tokens = answer_tokens(prediction)
    gold_tokens = answer_tokens(gold)
    if not pred_tokens or not gold_tokens:
        # Two empty answers agree; one empty answer cannot overlap the other.
        return 1.0 if not pred_tokens and not gold_tokens else 0.0
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains_answer(output: str, gold: str) -> bool:
    """Whether the gold answer appears as a contiguous token run anywhere in the output.

    Token-level so that gold "1" is not found inside "1990"; this credits right answers that
    were given without the final-answer tag. The format markers are replaced by spaces first:
    deleting their punctuation would glue them to the quoted words ("beginquoteparis").
    """
    gold_tokens = answer_tokens(gold)
    if not gold_tokens:
        return False
    for marker in (BEGIN_QUOTE, END_QUOTE, ANSWER_TAG):
        output = output.replace(marker, " ")
    output_tokens = answer_tokens(output)
    width = len(gold_tokens)
    return any(
        output_tokens[start : start + width] == gold_tokens
        for start in range(len(output_tokens) - width + 1)
    )


def quote_spans(output: str) -> list[str]:
    """Closed quote spans in the output, parsed the same way as the training data."""
    return extract_quotes(output)


def _collapse_whitespace(text: str) -> str:
    """A tokenizer round trip can change spacing, which should not make a quote non-verbatim."""
    return _WHITESPACE_RE.sub(" ", text).strip()


def quote_fidelity(
    output: str, documents: Sequence[str], oracle: str | None
) -> tuple[int, int, int]:
    """(quotes, quotes found in some document, quotes found in the oracle document).

    Tells whether the model cites its context verbatim rather than inventing evidence, and
    whether it cites the relevant document rather than a distractor.
    """
    spans = [_collapse_whitespace(span) for span in quote_spans(output)]
    docs = [_collapse_whitespace(document) for document in documents]
    oracle_text = _collapse_whitespace(oracle) if oracle is not None else None
    verbatim = 0
    from_oracle = 0
    for span in spans:
        if not span:
            continue  # an empty quote cites nothing
        if any(span in document for document in docs):
            verbatim += 1
        if oracle_text is not None and span in oracle_text:
            from_oracle += 1
    return len(spans), verbatim, from_oracle


@dataclass(frozen=True)
class ExampleScore:
    """Metrics of one example; `em` and `follows_format` are None when the gold has no tag."""

    em: float | None
    f1: float
    contained: bool
    follows_format: bool | None
    quotes: int
    quotes_verbatim: int
    quotes_from_oracle: int

    def as_dict(self) -> dict[str, float | bool | int | None]:
        """Plain values for JSON reports."""
        return asdict(self)


def score_example(
    output: str,
    gold: str,
    *,
    documents: Sequence[str] = (),
    oracle: str | None = None,
    answer_only: bool = True,
) -> ExampleScore:
    """Score one generation against its gold.

    With `answer_only`, `gold` is the gold final answer and the output's final answer is
    compared to it. Without it (gold completions with no tag), `gold` is the whole completion,
    so only F1 and containment over the whole output are meaningful.
    """
    if not answer_only:
        return ExampleScore(
            em=None,
            f1=f1_score(output, gold),
            contained=contains_answer(output, gold),
            follows_format=None,
            quotes=0,
            quotes_verbatim=0,
            quotes_from_oracle=0,
        )
    answer = final_answer(output)
    quotes, verbatim, from_oracle = (
        quote_fidelity(output, documents, oracle) if documents else (0, 0, 0)
    )
    return ExampleScore(
        em=exact_match(answer, gold),
        f1=f1_score(answer, gold),
        contained=contains_answer(output, gold),
        follows_format=answer != "",
        quotes=quotes,
        quotes_verbatim=verbatim,
        quotes_from_oracle=from_oracle,
    )


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(scores: Sequence[ExampleScore]) -> dict[str, float | int | None]:
    """Means and shares over examples; a metric no example defines is None rather than 0."""
    quotes = sum(score.quotes for score in scores)
    verbatim = sum(score.quotes_verbatim for score in scores)
    from_oracle = sum(score.quotes_from_oracle for score in scores)
    formats = [score.follows_format for score in scores if score.follows_format is not None]
    return {
        "n": len(scores),
        "em": _mean([score.em for score in scores if score.em is not None]),
        "f1": _mean([score.f1 for score in scores]),
        "contained": _mean([1.0 if score.contained else 0.0 for score in scores]),
        "follows_format": _mean([1.0 if value else 0.0 for value in formats]),
        "quotes": quotes if scores else None,
        "quote_verbatim": verbatim / quotes if quotes else None,
        "quote_from_oracle": from_oracle / quotes if quotes else None,
    }
