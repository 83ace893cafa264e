"""`raft-dist generate` and `raft-dist validate`: properties of the generated data, exact resume,
up-to-date re-runs, and every bad input as one clear error line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, offline_env

from raft_dist.data.answers import extract_final_answer, extract_quotes
from raft_dist.data.reader import iter_records
from raft_dist.data.records import RaftRecord, parse_record
from raft_dist.data.sources import load_shards
from raft_dist.generate.chunking import chunk_paragraphs, find_sources, load_corpus
from raft_dist.generate.distractors import Bm25Index
from raft_dist.generate.pipeline import GenerateOptions, generate
from raft_dist.generate.validate_set import validate

TOPICS = {
    "harbour": "quay crane pier tug ballast mooring berth freighter",
    "orchard": "apple pear blossom cider graft pruning ladder harvest",
    "observatory": "telescope lens comet nebula dome eyepiece galaxy meteor",
    "bakery": "loaf dough oven yeast crust rye pastry flour",
    "railway": "locomotive platform signal carriage timetable junction sleeper boiler",
    "library": "shelf ledger archive manuscript catalogue reading binding index",
    "brewery": "hops malt barley cask mash kettle stout cellar",
    "museum": "gallery exhibit curator fossil tapestry relic display vitrine",
}
SHARED = "old new large small town village river hill north south".split()
VERBS = ("has", "is", "was", "holds", "keeps", "needs")


def topic_sentence(rng: random.Random, topic: str, words: list[str]) -> str:
    """Short declarative sentences with topic words, numbers and a verb the template can use."""
    subject = f"The {rng.choice(SHARED)} {topic} {rng.choice(words)}"
    body = " ".join(rng.choice(words + SHARED) for _ in range(rng.randint(3, 9)))
    tail = f"near the {rng.choice(words)} {rng.choice(words)}"
    number = rng.choice(["", f" since {rng.randint(1800, 2020)}", f" with {rng.randint(2, 90)}"])
    return f"{subject} {rng.choice(VERBS)} {body}{number} {tail}."


def write_corpus(root: Path, *, sentences: int = 40, seed: int = 0) -> Path:
    """One file per topic (.md with a heading, .txt, and a .jsonl with two documents)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, (topic, vocabulary) in enumerate(TOPICS.items()):
        words = vocabulary.split()
        paragraphs = [
            " ".join(topic_sentence(rng, topic, words) for _ in range(5))
            for _ in range(sentences // 5)
        ]
        if i % 3 == 0:
            text = f"# The {topic}\n\n" + "\n\n".join(paragraphs) + "\n"
            (root / f"{i:02d}-{topic}.md").write_text(text, encoding="utf-8")
        elif i % 3 == 1:
            (root / f"{i:02d}-{topic}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
        else:
            half = len(paragraphs) // 2
            lines = [
                json.dumps({"title": f"{topic} part {k}", "text": "\n\n".join(part)})
                for k, part in enumerate((paragraphs[:half], paragraphs[half:]))
            ]
            (root / "sub").mkdir(exist_ok=True)
            (root / "sub" / f"{i:02d}-{topic}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


OPTIONS = GenerateOptions(chunk_size=300, eval_fraction=0.2, shard_size=40, seed=3)


@pytest.fixture(scope="module")
def generated(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "set"
    generate([str(corpus)], out, OPTIONS)
    return out


def read_split(out: Path, split: str) -> list[tuple[Path, int, RaftRecord]]:
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        for line, record in iter_records(out / shard["path"]):
            assert isinstance(record, RaftRecord)
            rows.append((out / shard["path"], line, record))
    return rows


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run_main(*args: str) -> int:
    """The real CLI entry point in-process (errors become `error: ...` and exit code 2)."""
    from raft_dist.cli import cli, main
    from raft_dist.cli_generate import generate as generate_command
    from raft_dist.cli_generate import validate as validate_command

    for command in (generate_command, validate_command):
        cli.commands.setdefault(command.name, command)
    return main(list(args))


# --------------------------------------------------------------------------- chunking


def test_chunks_keep_sentences_whole_and_respect_the_size() -> None:
    rng = random.Random(1)
    sentences = [f"Sentence {i} {'word ' * rng.randint(2, 30)}ends here." for i in range(60)]
    long = "A very long sentence " + "that keeps going " * 40 + "and ends."
    paragraphs = [" ".join(sentences[:30]), long, " ".join(sentences[30:])]
    chunks = chunk_paragraphs(paragraphs, 200)
    assert all(len(c) <= 200 for c in chunks)
    joined = "\n".join(chunks)
    for sentence in sentences:  # every short sentence lies whole inside one chunk
        assert any(sentence in chunk for chunk in chunks), sentence
    assert long not in joined and all(p in long for p in chunks if "keeps going" in p)
    short = [f"Short sentence number {i} ends here." for i in range(40)]
    with_overlap = chunk_paragraphs([" ".join(short)], 150, overlap=1)
    assert len(with_overlap) > 5
    for before, after in zip(with_overlap, with_overlap[1:], strict=False):
        last = before.rsplit("ends here. ", 1)[-1]
        assert after.startswith(last) and after != last


def test_a_chunk_at_least_half_full_ends_with_its_paragraph() -> None:
    first = ["The first paragraph opens here.", "It has a second sentence of some length."]
    second = ["The next paragraph starts.", "Its second sentence closes it."]
    paragraphs = [" ".join(first), " ".join(second)]
    size = len(paragraphs[0]) + 1 + len(second[0]) + 5  # room for one more sentence
    assert 2 * len(paragraphs[0]) >= size
    assert chunk_paragraphs(paragraphs, size) == paragraphs  # not first + second[0], second[1]
    # A chunk under half full still takes the next paragraph's sentences.
    assert chunk_paragraphs(["Tiny one.", paragraphs[1]], size) == ["Tiny one.\n" + paragraphs[1]]


def test_abbreviations_and_initials_do_not_end_a_sentence() -> None:
    from raft_dist.generate.chunking import split_sentences

    text = "Dr. Ruddock met J. Smith at 10.30 today. They talked! Did it rain? Yes."
    assert split_sentences(text) == [
        "Dr. Ruddock met J. Smith at 10.30 today.",
        "They talked!",
        "Did it rain?",
        "Yes.",
    ]


# --------------------------------------------------------------------------- generated data


def test_generated_records_have_the_raft_properties(generated: Path) -> None:
    train, evals = read_split(generated, "train"), read_split(generated, "eval")
    assert train and evals
    ids = [r.id for _, _, r in train + evals]
    assert len(ids) == len(set(ids))
    for _, _, record in train + evals:
        texts = [d.text for d in record.documents]
        assert len(texts) == len(set(texts)), "duplicate distractors"
        assert len(texts) == OPTIONS.num_distractors + 1
        if record.oracle_index is None:
            assert record.oracle not in texts
        else:
            assert texts[record.oracle_index] == record.oracle
            assert texts.count(record.oracle) == 1
        quotes = extract_quotes(record.cot_answer)
        assert quotes and all(q in record.oracle for q in quotes)
        answer = extract_final_answer(record.cot_answer)
        assert answer and any(answer in q for q in quotes)
        assert record.question.endswith("?")
    # No eval oracle anywhere in train, neither as oracle nor as distractor.
    eval_oracles = {r.oracle for _, _, r in evals}
    for _, _, record in train:
        assert record.oracle not in eval_oracles
        assert not eval_oracles & {d.text for d in record.documents}


def test_p_oracle_is_achieved_over_many_examples(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "big", sentences=100, seed=4)
    options = GenerateOptions(chunk_size=150, p_oracle=0.6, eval_fraction=0.0, seed=11)
    out = tmp_path / "p"
    result = generate([str(corpus)], out, options)
    records = [r for _, _, r in read_split(out, "train")]
    assert len(records) > 700
    share = sum(r.oracle_index is not None for r in records) / len(records)
    assert abs(share - 0.6) < 0.06  # 3.4 standard deviations at n = 700
    assert result.manifest["splits"]["eval"] == {"records": 0, "shards": []}


def test_output_loads_in_the_training_reader(generated: Path) -> None:
    manifest = json.loads((generated / "manifest.json").read_text())
    shards = load_shards(str(generated), "train")
    assert sum(s.records for s in shards) == manifest["splits"]["train"]["records"]
    assert [s.records for s in shards] == [
        e["records"] for e in manifest["splits"]["train"]["shards"]
    ]
    assert all(s.records <= OPTIONS.shard_size for s in shards)
    for shard in shards + load_shards(str(generated), "eval"):
        for number, line in enumerate(shard.path.read_text().splitlines(), start=1):
            assert isinstance(parse_record(json.loads(line), shard.path, number), RaftRecord)
    for entry in manifest["splits"]["train"]["shards"]:
        data = (generated / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    generator = manifest["generator"]
    assert generator["settings"]["chunk_size"] == 300
    assert generator["settings"]["raft_dist_version"]
    assert all(len(s["sha256"]) == 64 for s in generator["settings"]["sources"])
    assert not (generated / ".progress.jsonl").exists()
    assert not (generated / ".partial").exists()


def test_bm25_distractors_are_closer_to_the_question_than_random(
    corpus: Path, tmp_path: Path
) -> None:
    options = GenerateOptions(chunk_size=300, eval_fraction=0.0, p_oracle=1.0, seed=5)
    chunks = load_corpus(find_sources([str(corpus)]), options.chunk_size).chunks
    index = Bm25Index([c.text for c in chunks])
    chunk_id = {c.text: c.id for c in chunks}
    means = {}
    for method in ("random", "bm25"):
        out = tmp_path / method
        generate([str(corpus)], out, dataclasses.replace(options, distractors=method))
        scores = [
            index.score(record.question, chunk_id[doc.text])
            for _, _, record in read_split(out, "train")
            for i, doc in enumerate(record.documents)
            if i != record.oracle_index
        ]
        means[method] = sum(scores) / len(scores)
    assert means["bm25"] > 1.5 * means["random"], means


# --------------------------------------------------------------------------- resume and re-runs


class Stop(Exception):
    pass


def stop_after(k: int):
    def hook(done: int) -> None:
        if done == k:
            raise Stop

    return hook


RESUME_OPTIONS = GenerateOptions(chunk_size=300, shard_size=7, eval_fraction=0.2, seed=9)


@pytest.fixture(scope="module")
def whole(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run that resumed runs must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("whole") / "set"
    generate([str(corpus)], out, RESUME_OPTIONS)
    return out


def test_resume_after_interruption_is_byte_identical(
    corpus: Path, whole: Path, tmp_path: Path
) -> None:
    options = RESUME_OPTIONS
    parts = tmp_path / "parts"
    with pytest.raises(Stop):
        generate([str(corpus)], parts, options, on_chunk=stop_after(5), sync_interval=0.0)
    assert not (parts / "manifest.json").exists()
    # Simulate a kill in the middle of the next chunk: half a record and half a progress line.
    partial = sorted((parts / ".partial" / "train").glob("shard-*.jsonl"))[-1]
    with partial.open("ab") as handle:
        handle.write(b'{"id": "half a rec')
    with (parts / ".progress.jsonl").open("ab") as handle:
        handle.write(b'{"done": 6, "spl')
    with pytest.raises(Stop):
        generate([str(corpus)], parts, options, on_chunk=stop_after(17))
    result = generate([str(corpus)], parts, options)
    assert result.status == "resumed"
    assert tree_bytes(parts) == tree_bytes(whole)


KILLER = """
import os, signal, sys
from raft_dist.generate import writer
from raft_dist.generate.pipeline import GenerateOptions, generate

original, calls = writer.ShardWriter.write, [0]

def write(self, split, line):
    original(self, split, line)
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):  # mid-chunk, with records still in Python's buffers
        os.kill(os.getpid(), signal.SIGKILL)

writer.ShardWriter.write = write
options = GenerateOptions(chunk_size=300, shard_size=7, eval_fraction=0.2, seed=9)
generate([sys.argv[1]], sys.argv[2], options)
"""


def test_resume_after_sigkill_is_byte_identical(corpus: Path, whole: Path, tmp_path: Path) -> None:
    parts = tmp_path / "killed"
    for at in ("23", "61"):
        result = subprocess.run(
            [sys.executable, "-c", KILLER, str(corpus), str(parts), at],
            capture_output=True,
            text=True,
            env=offline_env(),
            cwd=ROOT,
            timeout=120,
        )
        assert result.returncode == -9, result.stderr
        assert not (parts / "manifest.json").exists()
    assert generate([str(corpus)], parts, RESUME_OPTIONS).status == "resumed"
    assert tree_bytes(parts) == tree_bytes(whole)


def test_rerun_is_up_to_date_and_other_settings_need_overwrite(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "set"
    args = ["generate", str(corpus), "--out", str(out), "--chunk-size", "400", "--no-progress"]
    assert run_main(*args) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert run_main(*args) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert run_main(*args[:-1], "--seed", "4", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "different settings (changed: seed)" in err and "--overwrite" in err
    assert run_main(*args, "--seed", "4", "--overwrite") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"]["settings"]["seed"] == 4
    # A failing --overwrite run leaves the previous data set alone.
    bad = write_bytes(tmp_path / "bad.txt", b"\xff\xfe")
    assert run_main(*args, "--seed", "5", "--overwrite", str(bad)) == 2
    assert "bad.txt: not UTF-8 text" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_split_by_question(corpus: Path, tmp_path: Path) -> None:
    options = GenerateOptions(chunk_size=300, eval_fraction=0.3, split_by="question", seed=2)
    out = tmp_path / "q"
    generate([str(corpus)], out, options)
    train, evals = read_split(out, "train"), read_split(out, "eval")
    share = len(evals) / (len(train) + len(evals))
    assert 0.15 < share < 0.45
    report = validate([str(out)])
    assert report.ok, report.errors


# --------------------------------------------------------------------------- validate


def test_validate_passes_on_generated_output(
    generated: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_main("validate", str(generated)) == 0
    out = capsys.readouterr().out
    assert "P(oracle) achieved" in out and "length (characters)" in out and "ok" in out


def test_validate_counts_tokens_with_a_tokenizer(generated: Path) -> None:
    tokenizer = str(ROOT / "raft_dist" / "assets" / "tiny-tokenizer")
    report = validate([str(generated / "eval" / "shard-00000.jsonl")], tokenizer=tokenizer)
    assert report.ok and report.unit == "tokens"
    lengths = report.splits["eval"].lengths
    assert lengths and all(n > 20 for n in lengths)


def corrupt(shard: Path, line: int, change) -> None:
    lines = shard.read_text().splitlines(keepends=True)
    lines[line - 1] = change(lines[line - 1])
    shard.write_text("".join(lines))


def bad_quote(line: str) -> str:
    obj = json.loads(line)
    obj["cot_answer"] = obj["cot_answer"].replace("##end_quote##", "not in it ##end_quote##", 1)
    return json.dumps(obj) + "\n"


@pytest.mark.parametrize(
    ("line", "change", "message"),
    [
        (3, lambda s: s[:40] + "\n", ":3: malformed JSON"),
        (2, bad_quote, ":2: quote not verbatim in the oracle"),
    ],
)
def test_validate_fails_on_a_corrupted_shard(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture, line, change, message
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(generated, copy)
    shard = copy / "train" / "shard-00000.jsonl"
    corrupt(shard, line, change)
    assert run_main("validate", str(copy)) == 2
    err = capsys.readouterr().err
    assert f"{shard}{message}" in err
    assert "does not match the manifest" in err
    assert "error: validation failed" in err and "Traceback" not in err


def test_validate_finds_duplicate_ids_and_leaked_oracles(generated: Path, tmp_path: Path) -> None:
    shard = generated / "train" / "shard-00000.jsonl"
    copy = tmp_path / "dup.jsonl"
    copy.write_bytes(shard.read_bytes() + shard.read_bytes().split(b"\n", 1)[0] + b"\n")
    report = validate([str(copy)])
    assert any(
        f"{copy}:{len(shard.read_bytes().splitlines()) + 1}: duplicate id" in e
        for e in report.errors
    )
    # An eval record whose oracle is a train chunk: the train records using it are leaks.
    leak = tmp_path / "leak"
    (leak / "eval").mkdir(parents=True)
    (leak / "train").mkdir()
    (leak / "train" / "a.jsonl").write_bytes(shard.read_bytes())
    first = json.loads(shard.read_text().splitlines()[0])
    first["id"] = "eval-copy"
    (leak / "eval" / "a.jsonl").write_text(json.dumps(first) + "\n")
    report = validate([str(leak)])
    assert any("is the oracle of an eval record" in e for e in report.errors)


# --------------------------------------------------------------------------- bad input


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


GOOD = b"The harbour has three cranes. The pier is long and old. " * 4


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("report.docx", b"PK\x03\x04", "report.docx: unsupported file type '.docx'"),
        ("empty.txt", b"  \n\n", "empty.txt: the file is empty"),
        ("nul.md", b"text\x00more", "nul.md: binary file (NUL byte at offset 4)"),
        ("latin.txt", b"caf\xe9 au lait", "latin.txt: not UTF-8 text: invalid byte 0xe9"),
        ("no_text.jsonl", b'{"text": "ok. Fine."}\n{"body": 1}\n', "no_text.jsonl:2: each line"),
        ("bad.jsonl", b'{"text": "ok"}\n{oops\n', "bad.jsonl:2: malformed JSON"),
    ],
)
def test_bad_source_is_one_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, data: bytes, message: str
) -> None:
    good = write_bytes(tmp_path / "src" / "good.txt", GOOD)
    bad = write_bytes(tmp_path / "src" / name, data)
    out = tmp_path / "out"
    for sources in ([str(good), str(bad)], [str(tmp_path / "src")]):
        assert run_main("generate", *sources, "--out", str(out), "--no-progress") == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert not out.exists()


def test_unreadable_and_missing_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = write_bytes(tmp_path / "locked.txt", GOOD)
    real_open = Path.open

    def deny(self: Path, *args, **kwargs):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    out = tmp_path / "out"
    assert run_main("generate", str(locked), "--out", str(out)) == 2
    assert "locked.txt: cannot read file: Permission denied" in capsys.readouterr().err
    monkeypatch.undo()
    assert run_main("generate", str(tmp_path / "nope.md"), "--out", str(out)) == 2
    assert "nope.md: no such file or folder" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--chunk-size", "50"], "--chunk-size must be at least 100 characters, got 50"),
        (["--num-distractors", "5"], "only 2 chunk(s) for 5 distractors plus the oracle"),
        (["--p-oracle", "1.5"], "--p-oracle must be between 0 and 1"),
        (["--eval-fraction", "0.5"], "only 1 train chunk(s) after holding out 1 for eval"),
    ],
)
def test_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    source = write_bytes(tmp_path / "a.txt", GOOD)  # 224 characters: 2 chunks of at most 200
    out = tmp_path / "out"
    args = ["generate", str(source), "--out", str(out), "--chunk-size", "200", "--no-progress"]
    assert run_main(*args, "--num-distractors", "1", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_sources_without_a_sentence_to_ask_about(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = write_bytes(tmp_path / "list.md", b"# Items\n\n" + b"- red apple\n- green pear\n" * 20)
    out = tmp_path / "out"
    args = ["--num-distractors", "0", "--eval-fraction", "0", "--no-progress"]
    assert run_main("generate", str(source), "--out", str(out), *args) == 2
    assert "found nothing to ask in 1 chunks" in capsys.readouterr().err
    assert not out.exists()


def test_help_states_characters_and_imports_no_heavy_library() -> None:
    probe = (
        "import sys\n"
        "from raft_dist.cli import cli, main\n"
        "from raft_dist.cli_generate import generate, validate\n"
        "cli.add_command(generate); cli.add_command(validate)\n"
        "assert main(['generate', '--help']) == 0\n"
        "assert main(['validate', '--help']) == 0\n"
        "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=offline_env(), cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert "CHARACTERS" in result.stdout
