"""Question backends: a chunk in, question/answer pairs with a quoting chain of thought out.

Only the offline `template` backend exists today. It builds questions from the chunk's own
sentences, so every answer and every quote is verbatim text of the oracle and the output is
fully deterministic for a given random generator. Model-based backends (`hf`, `openai`) only have
to implement `Backend.questions`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol

from raft_dist.data.prompts import ANSWER_TAG, BEGIN_QUOTE, END_QUOTE
from raft_dist.errors import ConfigError
from raft_dist.generate.chunking import Chunk, split_sentences


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # verbatim inside `quote`
    quote: str  # verbatim inside the chunk
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


BACKENDS: dict[str, type] = {"template": TemplateBackend}


def make_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return BACKENDS[name]()
