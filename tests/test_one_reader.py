"""One reader, one check: validate, the launch preflight and the ranks read files by the same
rules, the data is checked once per run, and the run card reports what the ranks really read."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from helpers import launch, offline_env, raft_record, run_cli, write_dataset, write_recipe

from raft_dist.config import DataConfig
from raft_dist.data import reader
from raft_dist.data.check import check_data, read_stamp, write_stamp
from raft_dist.data.reader import iter_examples
from raft_dist.errors import DataError
from raft_dist.generate.validate_set import validate

# The seed project's RAFT record, exactly the shape its README documents.
SEED_RECORD = {
    "instruction": "Use the following documents to answer the question.\n"
    "Document [1]: The mill was built in 1820 by the river.\n"
    "Document [2]: The ferry leaves at noon.\n"
    "Question: When was the mill built?",
    "output": "Based on the documents: The mill was built in 1820.",
    "oracle_context": "The mill was built in 1820 by the river.",
    "num_distractors": 1,
    "has_distractors": True,
}


def jsonl(*records: object) -> bytes:
    return b"".join(
        (json.dumps(r) if not isinstance(r, str) else r).encode() + b"\n" for r in records
    )


def paper_record() -> dict:
    text = "Paris is the capital of France."
    return {
        "id": "paper-1",
        "type": "general",
        "question": "What is the capital of France?",
        "context": {"title": [["placeholder_title"]], "sentences": [[text]]},
        "oracle_context": text,
        "cot_answer": f"##begin_quote## {text} ##end_quote## <ANSWER>: Paris",
        "instruction": "<DOCUMENT>...</DOCUMENT>",
    }


def native(index: int) -> dict:
    import random

    return raft_record(random.Random(index), index)


# name -> file bytes; every case is read by the preflight and by validate.
CASES: dict[str, bytes] = {
    "good.jsonl": jsonl(native(0), native(1)),
    "bom.jsonl": b"\xef\xbb\xbf" + jsonl(native(2), native(3)),
    "bom_then_blank.jsonl": b"\xef\xbb\xbf\n" + jsonl(native(4)),
    "seed.jsonl": jsonl(SEED_RECORD, {**SEED_RECORD, "has_distractors": False}),
    "paper.jsonl": jsonl(paper_record()),
    "blank_lines.jsonl": b"\n" + jsonl(native(5)) + b"   \n\n" + jsonl(native(6)),
    "empty.jsonl": b"",
    "blank_only.jsonl": b"\n  \n\n",
    "bad_utf8.jsonl": jsonl(native(7)) + b'{"prompt": "caf\xe9", "completion": "x"}\n',
    "bad_json.jsonl": jsonl(native(8), "{oops"),
    "utf16.jsonl": json.dumps(native(9)).encode("utf-16"),
    "unknown_format.jsonl": jsonl({"text": "just text"}),
    "missing_field.jsonl": jsonl({k: v for k, v in native(10).items() if k != "question"}),
    "long_line.jsonl": jsonl(native(11), {"prompt": "x" * 5000, "completion": "y"}),
}


def preflight_outcome(path: Path) -> str | None:
    """What `raft-dist launch` (and a run without a stamp) says about the file: None or error."""
    try:
        check_data(DataConfig(train=str(path)))
    except DataError as exc:
        return str(exc)
    return None


def validate_outcome(path: Path) -> str | None:
    report = validate([str(path)])
    return report.errors[0] if report.errors else None


@pytest.mark.parametrize("name", sorted(CASES))
def test_validate_and_the_preflight_agree(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 4096)  # long_line.jsonl's second line is over
    path = tmp_path / name
    path.write_bytes(CASES[name])
    trained, validated = preflight_outcome(path), validate_outcome(path)
    assert (trained is None) == (validated is None), (trained, validated)
    if trained is not None:
        # The same place is blamed (file, and the line when there is one).
        assert trained.split(": ")[0] == validated.split(": ")[0], (trained, validated)
    good = {"good", "bom", "bom_then_blank", "seed", "paper", "blank_lines"}
    assert (trained is None) == (name.removesuffix(".jsonl") in good), trained


def test_reader_rules_in_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 4096)
    messages = {}
    for name in ("empty", "blank_only", "utf16", "long_line", "bad_utf8"):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(CASES[f"{name}.jsonl"])
        messages[name] = preflight_outcome(path)
    assert messages["empty"].endswith("empty.jsonl: the shard is empty (no records)")
    assert messages["blank_only"].endswith("blank_only.jsonl: the shard is empty (no records)")
    assert messages["utf16"].endswith("utf16.jsonl:1: the file is UTF-16 encoded; save it as UTF-8")
    assert messages["long_line"].endswith("long_line.jsonl:2: line longer than 4096 bytes")
    assert "bad_utf8.jsonl:2: invalid UTF-8 byte 0xe9" in messages["bad_utf8"]


def test_seed_records_load_as_instruction_examples_with_their_metadata(tmp_path: Path) -> None:
    path = tmp_path / "seed.jsonl"
    path.write_bytes(jsonl(SEED_RECORD))
    [(line, example)] = list(iter_examples(path))
    assert line == 1
    assert example.prompt == SEED_RECORD["instruction"] + "\n"
    assert example.completion == SEED_RECORD["output"]
    assert example.meta == {
        "oracle_context": SEED_RECORD["oracle_context"],
        "num_distractors": 1,
        "has_distractors": True,
    }


# --------------------------------------------------------------------------- the stamp


def manifest_dataset(root: Path, sizes: list[int]) -> Path:
    """A data set folder with a manifest holding counts and sha256s, as `generate` writes."""
    write_dataset(root, sizes)
    shards = []
    for path in sorted((root / "train").glob("*.jsonl")):
        data = path.read_bytes()
        records = sum(1 for line in data.splitlines() if line.strip())
        shards.append(
            {
                "path": f"train/{path.name}",
                "records": records,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    total = sum(s["records"] for s in shards)
    manifest = {"splits": {"train": {"records": total, "shards": shards}}}
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def test_stamp_is_trusted_only_while_the_files_are_unchanged(tmp_path: Path) -> None:
    data = DataConfig(train=str(manifest_dataset(tmp_path / "ds", [3, 2])))
    stamp = tmp_path / "run" / "data-check.json"
    check = check_data(data)
    assert check.counts() == {"train": 5}
    write_stamp(stamp, check, data)
    trusted = read_stamp(stamp, data)
    assert trusted is not None and trusted.source == "stamp"
    assert [s.records for s in trusted.splits["train"].shards] == [3, 2]
    # Another data spec is another check.
    assert read_stamp(stamp, DataConfig(train=str(tmp_path / "ds"), skip_invalid=True)) is None
    # A shard rewritten with the same length (one byte flipped) is no longer trusted ...
    shard = tmp_path / "ds/train/shard-00001.jsonl"
    raw = bytearray(shard.read_bytes())
    raw[raw.index(b"What")] = ord("w")
    shard.write_bytes(bytes(raw))
    assert read_stamp(stamp, data) is None
    # ... and the full check finds what changed.
    with pytest.raises(DataError, match=r"shard-00001\.jsonl: sha256 .* does not match"):
        check_data(data)


def test_manifest_paths_stay_inside_the_data_set(tmp_path: Path) -> None:
    root = manifest_dataset(tmp_path / "ds", [2])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["path"] = "../../../etc/passwd"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="outside the data set folder"):
        check_data(DataConfig(train=str(root)))


def test_a_run_without_the_launcher_checks_hashes_itself(tmp_path: Path) -> None:
    """`raft-dist train` finds no stamp: rank 0 checks the manifest's hashes before training."""
    root = manifest_dataset(tmp_path / "ds", [3, 3])
    shard = root / "train/shard-00000.jsonl"
    shard.write_bytes(shard.read_bytes().replace(b"What", b"Who?"))
    recipe = write_recipe(tmp_path / "r.yaml", root, tmp_path / "out", training={"max_steps": 1})
    result = run_cli("train", "--config", str(recipe), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{shard}: sha256" in result.stderr and "does not match the manifest" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_gpu_profile_without_a_gpu_is_refused(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [4])
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "data", tmp_path / "out")
    result = run_cli(
        "launch", "--profile", "single_gpu", "--config", str(recipe), env=offline_env()
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "--profile single_gpu: the live setup contradicts the launch" in output
    assert "device cpu, but the profile asks for cuda" in output
    assert not (tmp_path / "out" / "final").exists()


# --------------------------------------------------------------------------- one real launch


def test_run_card_reports_the_shards_each_rank_reads(tmp_path: Path) -> None:
    """Shuffled shards of uneven size, the first written with a byte-order mark: the launch
    trains (the BOM is accepted by every reader), the ranks trust the launcher's stamp, and
    the run card's shards per rank equal the shards the ranks' audits show they read."""
    sizes = [10, 1, 1, 1, 10]
    write_dataset(tmp_path / "data", sizes)
    first = tmp_path / "data/train/shard-00000.jsonl"
    first.write_bytes(b"\xef\xbb\xbf" + first.read_bytes())
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "out",
        data={"shuffle_shards": True, "record_audit": True},
        training={"seed": 0, "micro_batch_size": 2, "gradient_accumulation_steps": 1},
    )
    result = launch(recipe, "cpu")
    card = re.search(r"shards per rank \[(\d+), (\d+)\] \(this epoch\); (.*)", result.stdout)
    assert card is not None, result.stdout
    assert card.group(3) == "checked by the launcher"
    shard_of = {}
    for path in sorted((tmp_path / "data/train").glob("*.jsonl")):
        for _, example in iter_examples(path):
            shard_of[example.id] = path.name
    read = []
    for rank in (0, 1):
        ids = (tmp_path / f"out/audit/seen_ids_rank{rank}.txt").read_text().split()
        read.append(len({shard_of[i] for i in ids}))
    assert [int(card.group(1)), int(card.group(2))] == read
    # With these sizes and seed the ranks read [4, 2] shards; a card counted over the
    # unshuffled order says [2, 3].
    assert read == [4, 2]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["examples_tokenized"] == sum(sizes) and summary["stopped"] is None
