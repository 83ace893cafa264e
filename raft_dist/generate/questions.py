"""Question backends: a chunk in, question/answer pairs with a quoting chain of thought out.

The offline `template` backend builds questions from the chunk's own sentences, so every answer
and every quote is verbatim text of the oracle and the output is fully deterministic for a given
random generator. The model backends (`hf` in backend_hf.py, `openai` in backend_openai.py) share
the prompts and the output checks at the end of this module: a model's reply is kept only when it
ends in a final answer and quotes the oracle verbatim; every other reply is dropped and counted.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from raft_dist.data.answers import (
    ANSWER_TAG,
    BEGIN_QUOTE,
    END_QUOTE,
    cut_after_final_answer,
    extract_final_answer,
    extract_quotes,
)
from raft_dist.generate.chunking import Chunk, split_sentences


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # verbatim inside `quote` (template backend; a model's answer may paraphrase)
    quote: str  # verbatim inside the chunk ("" when a model answer quotes nothing)
    cot_answer: str  # chain of thought quoting `quote`, ending in "<ANSWER>: answer"


class Backend(Protocol):
    name: str

    def questions(self, chunk: Chunk, count: int, rng: random.Random) -> list[QA]:
        """Up to `count` pairs for `chunk`; all randomness must come from `rng`, so a resumed
        run writes the same bytes as an uninterrupted one."""
        ...


# --------------------------------------------------------------------------- template backend

_AUXILIARIES = (
    "is are was were has have had can could will would may might must should shall does did"
).split()
_SUBJECT_FORM = re.compile(
    r"^(?P<subject>[^,;:()\"]{2,80}?) (?P<aux>" + "|".join(_AUXILIARIES) + r") (?P<rest>.+)$"
)
_PRONOUNS = frozenset(
    "it this that these those they he she we i you there here its their his her one".split()
)
_NUMBER = re.compile(r"(?<![\w.,:])\d[\d,.:]*(?<![.,:])(?![\w])")
_PREPOSITIONS = frozenset(
    "at in on by of for to from with into near under over after before during since until than"
    " as about across along among around behind beside between beyond inside outside through"
    " toward towards within without".split()
)
_TRAILING = ".!\"')]\u201d\u2019 "
_FORBIDDEN = (BEGIN_QUOTE, END_QUOTE, ANSWER_TAG)
MIN_WORDS, MAX_WORDS = 5, 60

_OPENERS = (
    "The question is about {title}, so look for the document about {title}.",
    "To answer this, find the sentence in the document about {title} that states the fact.",
    "Look for the passage about {title} that contains this statement.",
)


def _candidates(text: str) -> list[str]:
    """Complete declarative sentences that are long enough to ask about."""
    found = []
    for paragraph in text.split("\n"):
        for sentence in split_sentences(paragraph):
            if not sentence.endswith((".", "!")) or not (
                sentence[0].isupper() or sentence[0].isdigit()
            ):
                continue
            if "?" in sentence or any(marker in sentence for marker in _FORBIDDEN):
                continue
            if MIN_WORDS <= sentence.count(" ") + 1 <= MAX_WORDS:
                found.append(sentence)
    return found


def _core(sentence: str) -> str:
    """The sentence without its final punctuation (answers never end in a full stop)."""
    return sentence.rstrip(_TRAILING)


def _subject_question(sentence: str, lead: str) -> tuple[str, str, str] | None:
    """'The mill has six sails.' -> ('..., what has six sails?', 'The mill', reason)."""
    match = _SUBJECT_FORM.match(_core(sentence))
    if not match:
        return None
    subject, aux, rest = match["subject"], match["aux"], match["rest"]
    if subject.split()[0].lower() in _PRONOUNS or len(subject.split()) > 8:
        return None
    if len(rest.split()) < 2:
        return None
    question = f"{lead}what {aux} {rest}?"
    return question, subject, f"It names {subject} as what {aux} {rest}."


def _number_question(sentence: str, lead: str) -> tuple[str, str, str] | None:
    """Blank out a number that is not the first word: '..., what fills the blank in "..."?'"""
    matches = [m for m in _NUMBER.finditer(sentence) if m.start() > 0]
    if not matches:
        return None
    match = matches[0]
    statement = sentence[: match.start()] + "____" + sentence[match.end() :]
    answer = match.group()
    question = f'{lead}what number fills the blank in "{statement}"?'
    return question, answer, f"The blank stands for {answer}."


def _ending_question(sentence: str, lead: str) -> tuple[str, str, str] | None:
    """Ask for the end of the sentence after its last preposition (or its last two words)."""
    core = _core(sentence)
    words = core.split(" ")
    cut = None
    for i in range(len(words) - 2, max(len(words) - 6, 0), -1):
        if words[i].lower() in _PREPOSITIONS:
            cut = i + 1
            break
    if cut is None:
        cut = max(len(words) - 2, 1)
    answer = " ".join(words[cut:])
    prefix = " ".join(words[:cut])
    if not answer or not prefix:
        return None
    question = f'{lead}how does this sentence end: "{prefix} ..."?'
    return question, answer, f'The sentence ends with "{answer}".'


_FORMS = (_subject_question, _number_question, _ending_question)


class TemplateBackend:
    """Deterministic questions from the chunk's own sentences; no model, no network."""

    name = "template"

    def questions(self, chunk: Chunk, count: int, rng: random.Random) -> list[QA]:
        candidates = _candidates(chunk.text)
        if not candidates:
            return []
        chosen = rng.sample(candidates, min(count, len(candidates)))
        title = chunk.title.strip()
        lead = (
            f"According to the document about {title}, "
            if title
            else "According to the documents, "
        )
        pairs = []
        for sentence in chosen:
            start = rng.randrange(len(_FORMS))
            for k in range(len(_FORMS)):
                made = _FORMS[(start + k) % len(_FORMS)](sentence, lead)
                if made is not None:
                    break
            if made is None:
                continue
            question, answer, reason = made
            opener = rng.choice(_OPENERS).format(title=title or "this topic")
            cot = (
                f"{opener} The relevant passage says: {BEGIN_QUOTE} {sentence} {END_QUOTE} "
                f"{reason} Therefore the answer is {answer}.\n{ANSWER_TAG} {answer}"
            )
            pairs.append(QA(question=question, answer=answer, quote=sentence, cot_answer=cot))
        return pairs


# --------------------------------------------------------------------------- running backends

Job = tuple[Chunk, int, random.Random]  # chunk, questions wanted, the chunk's generator


@dataclass
class Answered:
    """One chunk's result; `dropped` counts model replies that failed the checks, by reason."""

    chunk: Chunk
    rng: random.Random
    pairs: list[QA]
    dropped: dict[str, int] = field(default_factory=dict)


def ask_all(backend: Backend, jobs: Iterable[Job]) -> Iterator[Answered]:
    """Results in job order. A backend with `ask_many` may work on several jobs at once (the
    openai backend's requests run in parallel) but must still yield in this order."""
    many = getattr(backend, "ask_many", None)
    if many is not None:
        yield from many(jobs)
        return
    for chunk, count, rng in jobs:
        yield Answered(chunk, rng, backend.questions(chunk, count, rng))


# --------------------------------------------------------------------------- model backends

DROP_REASONS = ("empty_question", "duplicate_question", "no_answer", "quote_not_verbatim")

Messages = list[dict[str, str]]
Complete = Callable[[list[Messages]], list[str]]  # chat prompts in, one reply each out

_SYSTEM = "You write reading-comprehension data. Follow the requested format exactly."
_LIST_MARK = re.compile(
    r"^\s*(?:[-*\u2022]\s*|\(?\d{1,3}[.):]\s*|(?:q|question)\s*\d*\s*[.:)]\s*)+",
    re.IGNORECASE,
)


def _about(chunk: Chunk) -> str:
    title = chunk.title.strip()
    return f"Document title: {title}\n" if title else ""


def question_messages(chunk: Chunk, count: int) -> Messages:
    """Ask for questions only; answers come from a second prompt per question (as in RAFT)."""
    user = (
        f"{_about(chunk)}<DOCUMENT>{chunk.text}</DOCUMENT>\n\n"
        f"Write {count} different questions that this document answers. Each question must make "
        "sense without seeing the document, so name what it is about. Write one question per "
        "line and nothing else."
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def answer_messages(chunk: Chunk, question: str) -> Messages:
    user = (
        f"{_about(chunk)}<DOCUMENT>{chunk.text}</DOCUMENT>\n"
        f"Question: {question}\n\n"
        "Answer the question using only the document. Reason step by step, and copy each "
        f"sentence you rely on word for word between {BEGIN_QUOTE} and {END_QUOTE}. "
        f'End with a last line "{ANSWER_TAG} $answer", where $answer is short. Format example:\n'
        f"The document says {BEGIN_QUOTE} The mill has six sails. {END_QUOTE} So it has six.\n"
        f"{ANSWER_TAG} six sails"
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def parse_questions(reply: str, count: int) -> tuple[list[str], Counter]:
    """Up to `count` distinct questions, one per line, without list markers; each missing or
    repeated one is counted as dropped."""
    found: list[str] = []
    dropped: Counter = Counter()
    for line in reply.splitlines():
        question = _LIST_MARK.sub("", line).strip().strip("\"'").strip()
        if not question or any(marker in question for marker in _FORBIDDEN):
            continue
        if question in found:
            dropped["duplicate_question"] += 1
        else:
            found.append(question)
        if len(found) == count:
            break
    dropped["duplicate_question"] = min(dropped["duplicate_question"], count - len(found))
    dropped["empty_question"] = count - len(found) - dropped["duplicate_question"]
    return found, +dropped


def check_answer(question: str, reply: str, oracle: str) -> QA | str:
    """The reply as a QA, or the reason it is dropped. Text after the final answer's line is
    cut off, since small models often ramble on after it."""
    question = question.strip()
    if not question:
        return "empty_question"
    if ANSWER_TAG not in reply:
        return "no_answer"
    cot = cut_after_final_answer(reply).strip()
    answer = extract_final_answer(cot)
    if not answer:
        return "no_answer"
    if cot.count(BEGIN_QUOTE) != cot.count(END_QUOTE):
        return "quote_not_verbatim"
    quotes = extract_quotes(cot)
    if any(quote not in oracle for quote in quotes):
        return "quote_not_verbatim"
    return QA(question=question, answer=answer, quote=quotes[0] if quotes else "", cot_answer=cot)


def answer_chunk(complete: Complete, chunk: Chunk, count: int) -> tuple[list[QA], dict[str, int]]:
    """Questions first, then one answer per question; kept + dropped always equals `count`."""
    [reply] = complete([question_messages(chunk, count)])
    questions, dropped = parse_questions(reply, count)
    replies = complete([answer_messages(chunk, q) for q in questions]) if questions else []
    pairs = []
    for question, answer in zip(questions, replies, strict=True):
        made = check_answer(question, answer, chunk.text)
        if isinstance(made, str):
            dropped[made] += 1
        else:
            pairs.append(made)
    return pairs, dict(dropped)
