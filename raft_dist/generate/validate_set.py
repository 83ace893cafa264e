"""`raft-dist validate`: check a RAFT data set (folder with manifest, folder, or files) and
describe it.

Errors (each "path:line: message"): records that do not parse, duplicate ids, quotes that are not
verbatim in the oracle, the oracle repeated among the distractors, an eval oracle used anywhere in
train, manifest hashes or counts that do not match the shards. Statistics: records per split, the
achieved P(oracle), distractors per record and the example length (prompt + answer) in
characters or, with a tokenizer, in tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raft_dist.data.answers import extract_quotes
from raft_dist.data.reader import EMPTY_FILE, read_records
from raft_dist.data.records import RaftRecord, Record, shown, to_example
from raft_dist.data.sources import MANIFEST, manifest_shards, no_files_message, read_manifest
from raft_dist.errors import DataError, RaftDistError

MAX_SHOWN_ERRORS = 50


@dataclass
class SplitStats:
    records: int = 0
    files: int = 0
    with_oracle: int = 0
    without_quote: int = 0
    not_raft: int = 0
    distractors: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)


@dataclass
class Report:
    unit: str = "characters"
    splits: dict[str, SplitStats] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    notes: list[str] = field(default_factory=list)

    def error(self, path: object, line: int | None, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_SHOWN_ERRORS:
            self.errors.append(str(DataError(path, line, message)))

    @property
    def ok(self) -> bool:
        return self.error_count == 0


@dataclass(frozen=True)
class _File:
    path: Path
    split: str
    records: int | None = None  # from a manifest
    sha256: str | None = None


# --------------------------------------------------------------------------- what to read


def _targets(specs: Sequence[str], report: Report) -> tuple[list[_File], bool]:
    """Files to check and whether eval/train leakage can be judged (split by chunk)."""
    files: list[_File] = []
    leakage = True
    for spec in specs:
        path = Path(spec)
        if path.is_dir() and (path / MANIFEST).exists():
            found, by_chunk = _manifest_files(path, report)
            files += found
            leakage = leakage and by_chunk
        elif path.is_dir():
            jsonl = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
            if not jsonl:
                report.error(path, None, no_files_message(path))
            files += [_File(p, _split_of(p.relative_to(path))) for p in jsonl]
        elif path.is_file():
            files.append(_File(path, _split_of(path)))
        else:
            report.error(path, None, "no such file or folder")
    return files, leakage


def _split_of(path: Path) -> str:
    parts = path.parts[:-1]
    return "eval" if "eval" in parts else "train" if "train" in parts else "all"


def _manifest_files(root: Path, report: Report) -> tuple[list[_File], bool]:
    manifest_path = root / MANIFEST
    try:
        manifest = read_manifest(manifest_path)
        splits = manifest.get("splits")
    except DataError as exc:
        report.error(exc.path, exc.line, exc.reason)
        return [], False
    if not isinstance(splits, dict):
        report.error(manifest_path, None, '"splits" must be an object')
        return [], False
    files: list[_File] = []
    for split, info in splits.items():
        try:
            declared = int(info["records"])
            # A split may be empty (e.g. no eval chunk); training treats it as absent.
            listed = (manifest_shards(str(root), split) or []) if info["shards"] else []
        except DataError as exc:
            report.error(exc.path, exc.line, exc.reason)
            continue
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            report.error(
                manifest_path, None, f"split {shown(split)!s} is malformed: {shown(str(exc))}"
            )
            continue
        total = sum(entry.records or 0 for entry in listed)
        if total != declared:
            report.error(
                manifest_path,
                None,
                f"split {shown(split)} declares {declared} records but its shards list {total}",
            )
        files += [_File(e.path, split, e.records, e.sha256) for e in listed]
        listed_paths = {entry.path.resolve() for entry in listed}
        folder = root / split
        if folder.is_dir():
            for extra in sorted(folder.glob("*.jsonl")):
                if extra.resolve() not in listed_paths:
                    report.notes.append(f"{extra}: not listed in the manifest, not checked")
    generator = manifest.get("generator") if isinstance(manifest, dict) else None
    settings = generator.get("settings") if isinstance(generator, dict) else None
    by_question = isinstance(settings, dict) and settings.get("split_by") == "question"
    if by_question:
        report.notes.append("split by question: eval oracles may appear in train by design")
    return files, not by_question


# --------------------------------------------------------------------------- reading


def _records(file: _File, report: Report) -> Iterator[tuple[int, Record]]:
    """Records through the one reader (errors reported per line), hashing and counting as
    they stream past."""
    digest = hashlib.sha256()
    count = 0
    try:
        for line, result in read_records(file.path, digest=digest):
            count += 1
            if isinstance(result, DataError):
                report.error(file.path, line, result.reason)
                continue
            yield line, result
    except DataError as exc:
        report.error(exc.path, exc.line, exc.reason)
        return
    if count == 0:
        report.error(file.path, None, EMPTY_FILE)
    if file.sha256 is not None and digest.hexdigest() != file.sha256:
        report.error(
            file.path,
            None,
            f"sha256 {digest.hexdigest()} does not match the manifest's {file.sha256}",
        )
    if file.records is not None and count != file.records:
        report.error(file.path, None, f"{count} records, the manifest says {file.records}")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()


def _check_record(record: RaftRecord, path: Path, line: int, report: Report) -> None:
    for quote in extract_quotes(record.cot_answer):
        if quote not in record.oracle:
            report.error(path, line, f'quote not verbatim in the oracle: "{quote[:80]}"')
    oracle = record.oracle.strip()
    seen: dict[str, int] = {}
    for i, document in enumerate(record.documents):
        text = document.text.strip()
        if i != record.oracle_index and text == oracle:
            report.error(path, line, f"documents[{i}] repeats the oracle as a distractor")
        elif text in seen:
            report.error(path, line, f"documents[{i}] duplicates documents[{seen[text]}]")
        seen.setdefault(text, i)


# --------------------------------------------------------------------------- the check


def validate(specs: Sequence[str], *, tokenizer: str | None = None) -> Report:
    """Check everything and collect statistics; never stops at the first error."""
    report = Report()
    files, leakage = _targets(specs, report)
    # eval first, so train records can be checked against the eval oracles.
    files.sort(key=lambda f: 0 if f.split == "eval" else 1)
    eval_oracles: set[bytes] = set()
    ids: dict[str, str] = {}
    lengths = _Lengths(tokenizer)
    if tokenizer is not None:
        report.unit = "tokens"
    for file in files:
        stats = report.splits.setdefault(file.split, SplitStats())
        stats.files += 1
        for line, record in _records(file, report):
            where = f"{file.path}:{line}"
            if record.id in ids:
                report.error(
                    file.path, line, f"duplicate id {record.id!r} (first at {ids[record.id]})"
                )
            else:
                ids[record.id] = where
            stats.records += 1
            if not isinstance(record, RaftRecord):
                # Trainable (instruction/output, prompt/completion), so not an error; the RAFT
                # checks below need documents and an oracle.
                stats.not_raft += 1
                example = to_example(record)
                lengths.add(stats, file.split, example.prompt, example.completion)
                continue
            _check_record(record, file.path, line, report)
            if not extract_quotes(record.cot_answer):
                stats.without_quote += 1
            has_oracle = record.oracle_index is not None
            stats.with_oracle += has_oracle
            stats.distractors[len(record.documents) - has_oracle] += 1
            if file.split == "eval" and leakage:
                eval_oracles.add(_digest(record.oracle))
            elif file.split == "train" and leakage and eval_oracles:
                for i, document in enumerate(record.documents):
                    if _digest(document.text) in eval_oracles:
                        report.error(
                            file.path, line, f"documents[{i}] is the oracle of an eval record"
                        )
                        break
            example = to_example(record)
            lengths.add(stats, file.split, example.prompt, example.completion)
    for split, stats in report.splits.items():
        lengths.flush(stats, split)
    return report


class _Lengths:
    """Example lengths in characters, or in tokens as training counts them (prompt with special
    tokens, answer, EOS), tokenized in batches so memory stays small."""

    BATCH = 256

    def __init__(self, tokenizer: str | None) -> None:
        self.tok = None
        self.pending: dict[str, list[tuple[str, str]]] = {}
        if tokenizer is not None:
            from raft_dist.config import ModelConfig
            from raft_dist.model import load_tokenizer

            self.tok = load_tokenizer(ModelConfig(name_or_path=tokenizer))

    def add(self, stats: SplitStats, split: str, prompt: str, completion: str) -> None:
        if self.tok is None:
            stats.lengths.append(len(prompt) + len(completion))
            return
        batch = self.pending.setdefault(split, [])
        batch.append((prompt, completion))
        if len(batch) >= self.BATCH:
            self.flush(stats, split)

    def flush(self, stats: SplitStats, split: str) -> None:
        batch = self.pending.pop(split, [])
        if not batch or self.tok is None:
            return
        eos = 1 if self.tok.eos_token_id is not None else 0
        prompts = self.tok([p for p, _ in batch], add_special_tokens=True)["input_ids"]
        answers = self.tok([c for _, c in batch], add_special_tokens=False)["input_ids"]
        stats.lengths += [len(p) + len(a) + eos for p, a in zip(prompts, answers, strict=True)]


# --------------------------------------------------------------------------- output


def _percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values."""
    index = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[index]


def describe(report: Report) -> str:
    lines = []
    for split, stats in sorted(report.splits.items()):
        lines.append(f"{split}: {stats.records} records in {stats.files} file(s)")
        if not stats.records:
            continue
        raft = sum(stats.distractors.values())
        if raft:
            share = stats.with_oracle / raft
            lines.append(f"  P(oracle) achieved: {share:.3f} ({stats.with_oracle}/{raft})")
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(stats.distractors.items()))
            lines.append(f"  distractors per record: {counts}")
        if stats.not_raft:
            lines.append(
                "  instruction, prompt/completion and chat records (no documents, RAFT checks "
                f"skipped): {stats.not_raft}"
            )
        if stats.without_quote:
            lines.append(f"  records without a quote: {stats.without_quote}")
        values = sorted(stats.lengths)
        if values:
            lines.append(
                f"  length ({report.unit}): min {values[0]}, median {_percentile(values, 0.5)}, "
                f"p95 {_percentile(values, 0.95)}, max {values[-1]}"
            )
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def raise_on_errors(report: Report) -> None:
    if not report.ok:
        hidden = report.error_count - len(report.errors)
        more = f" ({hidden} more not shown)" if hidden else ""
        raise RaftDistError(f"validation failed: {report.error_count} error(s){more}")


def summary_dict(report: Report) -> dict[str, Any]:
    """Machine-readable form (for scripts and tests)."""
    return {
        "ok": report.ok,
        "errors": report.error_count,
        "splits": {
            split: {
                "records": s.records,
                "with_oracle": s.with_oracle,
                "distractors": dict(s.distractors),
            }
            for split, s in report.splits.items()
        },
    }
