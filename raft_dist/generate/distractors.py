"""Distractor choice: uniform random chunks, or the chunks BM25 ranks closest to the question.

Hard (BM25) distractors teach the model to ignore text that looks relevant but is not. The index
is a pure-Python inverted index whose postings are compact arrays (4-byte chunk id + 4-byte
precomputed BM25 weight), so a 200 MB corpus indexes in a few hundred MB.

Both pickers take a `Pool` (the chunks allowed for this example: train examples only see train
chunks) and never return the oracle or the same chunk twice.
"""

from __future__ import annotations

import heapq
import math
import random
import re
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Protocol

from raft_dist.errors import ConfigError

_TOKEN = re.compile(r"\w+")
# Function words plus the words of the template questions, which say nothing about the topic.
STOPWORDS = frozenset(
    """a an the and or but if then of at by for with about against between into through during
    before after above below to from up down in out on off over under again further once here
    there when where why how all any both each few more most other some such no nor not only own
    same so than too very can will just should now is are was were be been being have has had
    having do does did doing i me my we our you your he him his she her it its they them their
    what which who whom this that these those am would could also as s t according document
    documents number fills blank sentence end ends""".split()
)


def tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


@dataclass(frozen=True)
class Pool:
    """Chunk ids an example may draw from: `ids` for sampling, `member` (a flag per chunk id,
    None when every chunk is allowed) for filtering ranked candidates."""

    ids: Sequence[int]
    member: bytearray | None = None

    def allows(self, chunk: int) -> bool:
        return self.member is None or bool(self.member[chunk])


class DistractorPicker(Protocol):
    name: str

    def pick(
        self, question: str, oracle: int, pool: Pool, count: int, rng: random.Random
    ) -> list[int]:
        """`count` distinct chunk ids from `pool`, never `oracle` (fewer only when the pool is
        too small)."""
        ...


def sample_excluding(pool: Pool, exclude: set[int], count: int, rng: random.Random) -> list[int]:
    """Uniform sample without replacement that skips `exclude`; O(count) for large pools."""
    if count <= 0:
        return []
    want = min(count + len(exclude), len(pool.ids))
    picks = [c for c in rng.sample(pool.ids, want) if c not in exclude]
    return picks[:count]


class RandomPicker:
    name = "random"

    def pick(
        self, question: str, oracle: int, pool: Pool, count: int, rng: random.Random
    ) -> list[int]:
        return sample_excluding(pool, {oracle}, count, rng)


class Bm25Index:
    """Okapi BM25 over chunk texts with an inverted index (see `ranked` for how a query stays
    cheap on a large corpus)."""

    def __init__(
        self,
        texts: Iterable[str],
        *,
        k1: float = 1.2,
        b: float = 0.75,
        max_postings: int = 4_000,
        progress: bool = False,
        total: int | None = None,
    ) -> None:
        from tqdm import tqdm

        self.k1, self.b, self.max_postings = k1, b, max_postings
        raw: dict[str, tuple[array, array]] = {}
        lengths = array("I")
        for doc, text in enumerate(
            tqdm(texts, desc="bm25 index", unit="chunk", total=total, disable=not progress)
        ):
            words = tokens(text)
            lengths.append(len(words))
            for term, tf in Counter(words).items():
                entry = raw.get(term)
                if entry is None:
                    entry = raw[term] = (array("I"), array("H"))
                entry[0].append(doc)
                entry[1].append(min(tf, 65535))
        self.size = len(lengths)
        avgdl = (sum(lengths) / self.size) if self.size else 1.0
        norm = [k1 * (1 - b + b * n / max(avgdl, 1e-9)) for n in lengths]
        self.postings: dict[str, tuple[array, array]] = {}
        for term, (ids, tfs) in raw.items():
            idf = self.idf(len(ids))
            k1p1 = (k1 + 1) * idf
            weights = array(
                "f", [tf * k1p1 / (tf + norm[d]) for d, tf in zip(ids, tfs, strict=True)]
            )
            self.postings[term] = (ids, weights)
            raw[term] = None  # type: ignore[assignment]  # free the tf array as we go
        del raw

    def idf(self, df: int) -> float:
        return math.log(1.0 + (self.size - df + 0.5) / (df + 0.5))

    def ranked(self, query: str, want: int) -> list[tuple[int, float]]:
        """Up to `want` (chunk id, score) pairs, best first.

        The rarest query terms are scanned in full until `max_postings` postings were read; the
        remaining, common terms (low IDF, long postings) are then added only to the leading
        candidates by binary search. So the cost per query stays bounded on any corpus, and the
        leading candidates carry their exact BM25 score.
        """
        lists = [self.postings[t] for t in set(tokens(query)) if t in self.postings]
        if not lists or want <= 0:
            return []
        lists.sort(key=lambda entry: (len(entry[0]), entry[0][0]))
        full, rest, scanned = [], [], 0
        for entry in lists:
            if full and scanned + len(entry[0]) > self.max_postings:
                rest.append(entry)
            else:
                full.append(entry)
                scanned += len(entry[0])
        scores = dict(zip(*full[-1], strict=True))  # the longest list at C speed
        get = scores.get
        for ids, weights in full[:-1]:
            for doc, weight in zip(ids, weights, strict=True):
                scores[doc] = get(doc, 0.0) + weight
        top = _best(scores, want)
        if not rest:
            return top
        refined = []
        for doc, score in top:
            for ids, weights in rest:
                i = bisect_left(ids, doc)
                if i < len(ids) and ids[i] == doc:
                    score += weights[i]
            refined.append((doc, score))
        refined.sort(key=itemgetter(1), reverse=True)  # stable: ties keep their order
        return refined

    def score(self, query: str, doc: int) -> float:
        """One chunk's exact BM25 score (all query terms); for checks and tests."""
        total = 0.0
        for term in set(tokens(query)):
            entry = self.postings.get(term)
            if entry is None:
                continue
            ids, weights = entry
            i = bisect_left(ids, doc)
            if i < len(ids) and ids[i] == doc:
                total += weights[i]
        return total

    def top(self, query: str, pool: Pool, exclude: set[int], count: int) -> list[int]:
        """The `count` best allowed chunks, best first (ties in a fixed, deterministic order)."""
        want = (count + len(exclude)) * 4 + 8
        ranked = self.ranked(query, want)
        picked = _filter(ranked, pool, exclude, count)
        if len(picked) < count and len(ranked) == want:  # many leaders were not allowed
            picked = _filter(self.ranked(query, want * 16), pool, exclude, count)
        return picked


def _best(scores: dict[int, float], want: int) -> list[tuple[int, float]]:
    """The `want` best items (more on ties), best first; cheaper than nlargest with a key."""
    if len(scores) <= want:
        return sorted(scores.items(), key=itemgetter(1), reverse=True)
    threshold = heapq.nlargest(want, scores.values())[-1]
    best = [(doc, score) for doc, score in scores.items() if score >= threshold]
    best.sort(key=itemgetter(1), reverse=True)
    return best


def _filter(
    ranked: list[tuple[int, float]], pool: Pool, exclude: set[int], count: int
) -> list[int]:
    picked = []
    for doc, _ in ranked:
        if doc not in exclude and pool.allows(doc):
            picked.append(doc)
            if len(picked) == count:
                break
    return picked


class Bm25Picker:
    """The chunks most similar to the question; random chunks fill up when too few chunks share
    a word with it."""

    name = "bm25"

    def __init__(self, index: Bm25Index) -> None:
        self.index = index

    def pick(
        self, question: str, oracle: int, pool: Pool, count: int, rng: random.Random
    ) -> list[int]:
        picked = self.index.top(question, pool, {oracle}, count)
        if len(picked) < count:
            exclude = {oracle, *picked}
            picked += sample_excluding(pool, exclude, count - len(picked), rng)
        return picked


def make_picker(
    name: str, texts: Sequence[str], *, progress: bool = False
) -> RandomPicker | Bm25Picker:
    if name == "random":
        return RandomPicker()
    if name == "bm25":
        return Bm25Picker(Bm25Index(texts, progress=progress, total=len(texts)))
    raise ConfigError(f"--distractors: unknown method {name!r}; allowed: random, bm25")
