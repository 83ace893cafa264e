"""The demo measures what it claims: held-out questions and unseen documents stay out of
everything `make demo` trains on (the hand-written train split and the template-generated data,
made with the Makefile's own generation settings)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from helpers import ROOT, run_cli

from raft_dist.evaluation.items import load_eval_set
from raft_dist.evaluation.metrics import normalize_answer


def demo_pipeline_args() -> list[str]:
    """The arguments `make demo` gives `raft-dist pipeline` (DEMO_PIPELINE in the Makefile)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    match = re.search(r"^DEMO_PIPELINE\s*:?=\s*(.+)$", text, re.MULTILINE)
    assert match, "the Makefile defines DEMO_PIPELINE"
    return shlex.split(match.group(1))


def option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def training_records(tmp_path: Path) -> list[dict]:
    args = demo_pipeline_args()
    sources = [a for a in args if not a.startswith("-") and a not in _option_values(args)]
    generate_args = []
    generate_options = (
        "--chunk-size",
        "--questions-per-chunk",
        "--num-distractors",
        "--p-oracle",
        "--seed",
        "--eval-fraction",
    )
    for name in generate_options:
        for value in option(args, name):
            generate_args += [name, value]
    out = tmp_path / "generated"
    result = run_cli("generate", *sources, "--out", str(out), *generate_args, "--no-progress")
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("train/*.jsonl"))
    for extra in option(args, "--train-extra"):
        files += sorted((ROOT / extra).glob("*.jsonl"))
    assert len(files) >= 2
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines()]


def _option_values(args: list[str]) -> set[str]:
    return {args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--") and "=" not in a}


def test_held_out_questions_and_unseen_documents_are_not_trained_on(tmp_path: Path) -> None:
    args = demo_pipeline_args()
    eval_specs = [spec.split("=", 1)[1] for spec in option(args, "--eval-data")]
    assert len(eval_specs) == 2, "held-out questions on trained documents, and unseen documents"
    held_out = [item for spec in eval_specs for item in load_eval_set(str(ROOT / spec))]
    assert len(held_out) >= 40
    train = training_records(tmp_path)
    trained_questions = {normalize_answer(r["question"]) for r in train}
    leaked = [
        i.question for i in held_out if normalize_answer(i.question or "") in trained_questions
    ]
    assert leaked == []
    # No sentence of an unseen document is in any training record (oracle or distractor).
    unseen_docs = sorted((ROOT / "data/demo_source/unseen").glob("*.md"))
    assert len(unseen_docs) == 4
    train_text = " ".join(d["text"] for r in train for d in r["documents"]) + " ".join(
        r["oracle"] for r in train
    )
    for doc in unseen_docs:
        body = [line for line in doc.read_text().splitlines() if line and not line.startswith("#")]
        first_sentence = body[0].split(". ")[0]
        assert len(first_sentence) > 20
        assert first_sentence not in train_text, doc.name
    # And the unseen set is really about those documents.
    unseen = load_eval_set(str(ROOT / eval_specs[1]))
    unseen_text = " ".join(doc.read_text() for doc in unseen_docs)
    assert all(i.oracle is None or i.oracle[:40] in " ".join(unseen_text.split()) for i in unseen)


def test_hand_written_records_show_the_generators_chunks() -> None:
    """The hand-written splits (data/build_demo.py) show the model the very chunks that
    `make demo`'s generate step cuts, at the Makefile's --chunk-size: one unit of text in the
    generated training data, the hand-written training data and the held-out sets."""
    from raft_dist.generate.chunking import find_sources, load_corpus

    (chunk_size,) = option(demo_pipeline_args(), "--chunk-size")
    corpus = load_corpus(
        find_sources(
            [str(ROOT / "data/demo_source/trained"), str(ROOT / "data/demo_source/unseen")]
        ),
        int(chunk_size),
    )
    chunks = {chunk.text for chunk in corpus.chunks}
    records = [
        json.loads(line)
        for shard in sorted((ROOT / "data/demo").glob("*/shard-*.jsonl"))
        for line in shard.read_text(encoding="utf-8").splitlines()
    ]
    assert len(records) == 120
    shown = [doc["text"] for r in records for doc in r["documents"]]
    assert [text for text in shown if text not in chunks] == []
    assert all(r["oracle"] in chunks for r in records)
