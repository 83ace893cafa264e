"""`raft-dist generate`: sources -> chunks -> RAFT records -> shards + manifest.

Order of work, chosen so a mistake never leaves a half-written data set behind:
1. check the options, find and hash the sources; stop early when DIR is already up to date;
2. read, check and chunk every source (bad input fails here, before DIR is touched);
3. split chunks into train/eval, build the distractor picker;
4. write records chunk by chunk, in a seeded order so shards mix all sources, with a checkpoint
   after each chunk; 5. move shards into place and write the manifest.

Every chunk gets its own random generator seeded from (seed, chunk id), which is what makes a
resumed run byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from raft_dist import __version__
from raft_dist.atomic import save_failure
from raft_dist.data.records import Document, RaftRecord, to_json
from raft_dist.errors import ConfigError, DataError, RaftDistError, SaveError
from raft_dist.generate.backends import check_backend, make_backend
from raft_dist.generate.chunking import (
    Chunk,
    Corpus,
    check_chunking,
    find_sources,
    hash_source,
    load_corpus,
)
from raft_dist.generate.distractors import Pool, make_picker
from raft_dist.generate.questions import (
    MAX_WORDS,
    MIN_WORDS,
    QA,
    Backend,
    ask_all,
)
from raft_dist.generate.writer import ShardWriter, clear, fingerprint, prepare, tidy

GENERATOR_NAME = "raft-dist generate"


@dataclass(frozen=True)
class GenerateOptions:
    """Everything that changes the output; all of it goes into the manifest."""

    backend: str = "template"
    chunk_size: int = 1200  # characters
    chunk_overlap: int = 0  # sentences
    questions_per_chunk: int = 3
    distractors: Literal["random", "bm25"] = "random"
    num_distractors: int = 3
    p_oracle: float = 0.8
    eval_fraction: float = 0.1
    split_by: Literal["chunk", "question"] = "chunk"
    shard_size: int = 1000
    seed: int = 0

    def check(self) -> None:
        """Option mistakes as one line that names the option."""
        check_chunking(self.chunk_size, self.chunk_overlap)
        check_backend(self.backend)
        if self.questions_per_chunk < 1:
            raise ConfigError(
                f"--questions-per-chunk must be at least 1, got {self.questions_per_chunk}"
            )
        if self.distractors not in ("random", "bm25"):
            raise ConfigError(
                f"--distractors: unknown method {self.distractors!r}; allowed: random, bm25"
            )
        if self.num_distractors < 0:
            raise ConfigError(f"--num-distractors must be 0 or more, got {self.num_distractors}")
        if not 0.0 <= self.p_oracle <= 1.0:
            raise ConfigError(f"--p-oracle must be between 0 and 1, got {self.p_oracle}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(
                f"--eval-fraction must be at least 0 and below 1, got {self.eval_fraction}"
            )
        if self.split_by not in ("chunk", "question"):
            raise ConfigError(f"--split-by must be chunk or question, got {self.split_by!r}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {self.shard_size}")


@dataclass
class GenerateResult:
    status: Literal["generated", "resumed", "up to date"]
    out: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.status == "up to date":
            return f"{self.out} is up to date (same sources and settings); nothing to do"
        splits = self.manifest["splits"]
        stats = self.manifest["generator"]["stats"]
        parts = [
            f"{split} {info['records']} records in {len(info['shards'])} shards"
            for split, info in splits.items()
        ]
        records = sum(info["records"] for info in splits.values())
        p = stats["with_oracle"] / records if records else 0.0
        text = (
            f"{self.status} {self.out}: {', '.join(parts)}; {stats['chunks']} chunks "
            f"({stats['eval_chunks']} eval); oracle included in {p:.1%} of records"
        )
        dropped = stats.get("dropped")
        if dropped is not None:
            total = sum(dropped.values())
            reasons = ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "none"
            text += f"; dropped {total} of {total + records} model answers ({reasons})"
        return text


ChunkHook = Callable[[int], None]


def generate(
    sources: Sequence[str],
    out: str | Path,
    options: GenerateOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    on_chunk: ChunkHook | None = None,
    sync_interval: float = 1.0,
    backend: Backend | None = None,
) -> GenerateResult:
    """Write a RAFT data set folder to `out`; resumes an interrupted run with the same settings.

    `on_chunk(done)` runs after each chunk's checkpoint (progress reporting, tests that stop a
    run part way). `backend` is a configured backend named `options.backend` (model backends
    need options of their own); by default one is made from the name alone.
    """
    options = options or GenerateOptions()
    options.check()
    if backend is None:
        backend = make_backend(options.backend)
    elif backend.name != options.backend:
        raise ValueError(f"backend {backend.name!r} given for options.backend {options.backend!r}")
    out = Path(out)
    files = find_sources(sources, exclude=out)
    settings = _settings(options, [asdict(hash_source(f)) for f in files], backend)
    status = prepare(out, settings, overwrite=overwrite)
    if status == "up to date":
        tidy(out)
        return GenerateResult("up to date", out)

    corpus = load_corpus(files, options.chunk_size, options.chunk_overlap, progress=progress)
    for seen, hashed in zip(corpus.sources, settings["sources"], strict=True):
        if asdict(seen) != hashed:
            raise DataError(seen.path, None, "the file changed while it was being read")
    plan = _plan(corpus, options)
    drop_reasons: tuple[str, ...] = getattr(backend, "drop_reasons", ())
    if not drop_reasons:  # model backends count failed answers instead of asking up front
        _check_questions(corpus, backend)
    picker = make_picker(options.distractors, [c.text for c in corpus.chunks], progress=progress)
    if status == "replace":
        clear(out)  # only now: a failed run must not destroy the previous data set

    from tqdm import tqdm

    writer = ShardWriter(out, settings, options.shard_size, sync_interval=sync_interval)
    resumed = writer.done > 0
    counters = {"records": 0, "with_oracle": 0, **writer.counters}
    chunks = corpus.chunks
    make = _RecordMaker(corpus, plan, options, picker)
    jobs = (
        (chunk, options.questions_per_chunk, random.Random(f"{options.seed}:{chunk.id}"))
        for chunk in (chunks[plan.order[p]] for p in range(writer.done, len(chunks)))
    )
    answers = ask_all(backend, jobs)  # in processing order, whatever order the work ran in
    try:
        with tqdm(
            total=len(chunks),
            initial=writer.done,
            desc="generate",
            unit="chunk",
            disable=not progress,
        ) as bar:
            for position, answered in enumerate(answers, start=writer.done):
                chunk, rng = answered.chunk, answered.rng
                for j, qa in enumerate(answered.pairs):
                    split, line, with_oracle = make(chunk, j, qa, rng)
                    writer.write(split, line)
                    counters["records"] += 1
                    counters["with_oracle"] += with_oracle
                for reason, n in answered.dropped.items():
                    key = f"dropped_{reason}"
                    counters[key] = counters.get(key, 0) + n
                writer.checkpoint(position + 1, counters)
                bar.update(1)
                if on_chunk is not None:
                    on_chunk(position + 1)
        # Flushes the last lines still in the file buffers: a full disk can first show here.
        writer.close()
    except OSError as exc:
        raise _write_failure(out, exc) from None
    finally:
        answers.close()
        # After a failure, closing again must not replace the message with a traceback.
        with contextlib.suppress(OSError):
            writer.close()
    generator = {
        "name": GENERATOR_NAME,
        "fingerprint": fingerprint(settings),
        "settings": settings,
        "stats": {
            "chunks": len(chunks),
            "eval_chunks": plan.eval_chunks,
            "with_oracle": counters["with_oracle"],
        },
    }
    if drop_reasons:
        dropped = {r: counters.get(f"dropped_{r}", 0) for r in drop_reasons}
        generator["stats"]["dropped"] = dropped
    try:
        manifest = writer.finish(generator)
    except OSError as exc:
        raise _write_failure(out, exc) from None
    return GenerateResult("resumed" if resumed else "generated", out, manifest)


def _write_failure(out: Path, exc: OSError) -> Exception:
    """A full disk (or another OS error) while writing shards: one line, and the progress so
    far stays on disk (the writer's log), so the same command resumes once there is room."""
    error = save_failure("writing generated data to", out, exc)
    if error is None:
        return exc
    return SaveError(f"{error}; what was written is kept: rerun the same command to resume")


class _RecordMaker:
    """One question -> (split, JSONL line, oracle kept?), drawing only from the chunk's rng."""

    def __init__(self, corpus: Corpus, plan: _Plan, options: GenerateOptions, picker) -> None:
        self.corpus, self.plan, self.options, self.picker = corpus, plan, options, picker

    def __call__(self, chunk: Chunk, j: int, qa: QA, rng: random.Random) -> tuple[str, bytes, bool]:
        chunks, options = self.corpus.chunks, self.options
        split = self.plan.split_of(chunk.id, rng)
        pool = self.plan.train_pool if split == "train" else self.plan.all_pool
        keep = rng.random() < options.p_oracle
        count = options.num_distractors + (0 if keep else 1)
        ids = self.picker.pick(qa.question, chunk.id, pool, count, rng)
        if keep:
            ids.append(chunk.id)
        rng.shuffle(ids)
        record = RaftRecord(
            id=f"c{chunk.id:07d}-q{j}",
            question=qa.question,
            documents=tuple(Document(text=chunks[i].text, title=chunks[i].title) for i in ids),
            oracle_index=ids.index(chunk.id) if keep else None,
            oracle=chunk.text,
            cot_answer=qa.cot_answer,
        )
        obj = to_json(record)
        obj["meta"] = {"chunk": chunk.id, "source": self.corpus.sources[chunk.source].path}
        return split, (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"), keep


def _check_questions(corpus: Corpus, backend: Backend) -> None:
    """Fail before writing when no chunk yields a question (usually decided by chunk 0)."""
    for chunk in corpus.chunks:
        if backend.questions(chunk, 1, random.Random(0)):
            return
    raise RaftDistError(
        f"the {backend.name} backend found nothing to ask in {len(corpus.chunks)} chunks: it "
        f"needs sentences of {MIN_WORDS} to {MAX_WORDS} words that end with a full stop"
    )


def _settings(
    options: GenerateOptions, sources: list[dict[str, Any]], backend: Backend
) -> dict[str, Any]:
    """The settings a re-run is compared against (the version too: output may change). Model
    backends add what changes their output (model, sampling), never keys or addresses."""
    settings = {**asdict(options), "raft_dist_version": __version__, "sources": sources}
    backend_settings = getattr(backend, "settings", None)
    if backend_settings:
        settings["backend_settings"] = dict(backend_settings)
    return settings


@dataclass
class _Plan:
    """Processing order, split per chunk and the distractor pools of each split."""

    order: list[int]
    eval_flags: bytearray
    train_pool: Pool
    all_pool: Pool
    eval_chunks: int
    split_by: str
    eval_fraction: float

    def split_of(self, chunk: int, rng: random.Random) -> str:
        if self.split_by == "question":
            return "eval" if rng.random() < self.eval_fraction else "train"
        return "eval" if self.eval_flags[chunk] else "train"


def _plan(corpus: Corpus, options: GenerateOptions) -> _Plan:
    n = len(corpus.chunks)
    need = options.num_distractors + 1
    if n < need:
        raise RaftDistError(
            f"the sources give only {n} chunk(s) for {options.num_distractors} distractors "
            f"plus the oracle (need at least {need}); add sources, lower --chunk-size or "
            "--num-distractors",
        )
    order = list(range(n))
    random.Random(f"{options.seed}:order").shuffle(order)
    eval_flags = bytearray(n)
    n_eval = 0
    if options.split_by == "chunk" and options.eval_fraction > 0:
        n_eval = max(1, round(n * options.eval_fraction))
        shuffled = list(range(n))
        random.Random(f"{options.seed}:split").shuffle(shuffled)
        for chunk in shuffled[:n_eval]:
            eval_flags[chunk] = 1
        if n - n_eval < need:
            raise RaftDistError(
                f"only {n - n_eval} train chunk(s) after holding out {n_eval} for eval, but "
                f"train examples need {need} train chunks ({options.num_distractors} distractors "
                "plus the oracle); add sources, lower --chunk-size, --num-distractors or "
                "--eval-fraction",
            )
    all_pool = Pool(range(n))
    train_pool = all_pool
    if n_eval:
        allowed = bytearray(0 if flag else 1 for flag in eval_flags)
        train_pool = Pool([c for c in range(n) if allowed[c]], member=allowed)
    return _Plan(
        order, eval_flags, train_pool, all_pool, n_eval, options.split_by, options.eval_fraction
    )
