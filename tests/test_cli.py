"""The command line: instant help, and user mistakes as one clear line with exit code 2."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, offline_env, read_metrics, run_cli, write_dataset, write_recipe


def test_help_imports_no_heavy_library() -> None:
    probe = (
        "import sys\n"
        "from raft_dist.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['launch', '--help']):\n"
        "    assert main(argv) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'deepspeed') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=offline_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert "section.key=value" in result.stdout


def test_the_entry_point_flushes_and_skips_interpreter_teardown() -> None:
    """run() ends the process once the command is done: its output arrives whole through a
    pipe, its exit code is the command's, and nothing registered for interpreter exit runs
    (that teardown costs 1-2.5 s once torch is imported)."""
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TEARDOWN', flush=True))\n"
        "from raft_dist.cli import run\n"
        "run(sys.argv[1:])\n"
    )
    for argv, code in ((["--help"], 0), (["recipe", "--config", "missing.yaml"], 2)):
        result = subprocess.run(
            [sys.executable, "-c", probe, *argv],
            capture_output=True,
            text=True,
            env=offline_env(),
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == code, result.stderr
        assert "TEARDOWN" not in result.stdout + result.stderr
        assert ("validate  Check a RAFT data set" in result.stdout) is (code == 0)  # all of it
        assert ("missing.yaml" in result.stderr) is (code == 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.lr=fast", "error: training.lr: expected a number"),
        ("training.bogus=1", "error: unknown key training.bogus"),
    ],
)
def test_bad_config_is_one_line_without_traceback(override: str, message: str) -> None:
    result = run_cli("train", "--config", str(ROOT / "configs/tiny.yaml"), override)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def bad_line_cases() -> dict[str, tuple[bytes, str]]:
    good = json.loads(
        json.dumps(
            {
                "id": "x",
                "question": "q?",
                "documents": [{"text": "a b."}],
                "oracle_index": 0,
                "oracle": "a b.",
                "cot_answer": "##begin_quote## a b. ##end_quote## <ANSWER>: a",
            }
        )
    )
    missing = {k: v for k, v in good.items() if k != "question"}
    wrong_type = {**good, "oracle_index": "zero"}
    return {
        "malformed": (b'{"id": "x", "question": ', "malformed JSON"),
        "missing": (json.dumps(missing).encode(), 'missing required field "question"'),
        "wrong_type": (json.dumps(wrong_type).encode(), 'field "oracle_index"'),
        "utf8": (json.dumps(good).encode()[:-2] + b'\xff"}', "invalid UTF-8"),
    }


@pytest.mark.parametrize("command", ["launch", "train"])
@pytest.mark.parametrize("case", sorted(bad_line_cases()))
def test_bad_record_names_file_and_line(tmp_path: Path, command: str, case: str) -> None:
    write_dataset(tmp_path / "data", [3])
    shard = tmp_path / "data/train/shard-00000.jsonl"
    line, reason = bad_line_cases()[case]
    lines = shard.read_bytes().splitlines()
    shard.write_bytes(b"\n".join([lines[0], lines[1], line, lines[2]]) + b"\n")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "data", tmp_path / "out")
    result = run_cli(command, "--config", str(recipe), "training.max_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{shard}:3:" in result.stderr and reason in result.stderr
    assert "Traceback" not in result.stderr


def test_skip_invalid_counts_skipped_records(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [4])
    shard = tmp_path / "data/train/shard-00000.jsonl"
    shard.write_bytes(shard.read_bytes() + b"not json\n")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "out",
        data={"skip_invalid": True},
        training={"epochs": 1},
    )
    result = run_cli("train", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["skipped_invalid"] == 1 and summary["examples_tokenized"] == 4
    assert "1 skipped as invalid" in result.stdout


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("empty_shard", "the shard is empty"),
        ("no_files", "holds no .jsonl file"),
        ("missing", "no such file or folder"),
        ("json_array", "one JSON document"),
        ("parquet", "the file is Parquet, not JSON Lines"),
        ("gzip", "the file is gzip-compressed, not JSON Lines; decompress it first: `gunzip -k"),
        ("parquet_folder", "(it holds Parquet files: `raft-dist convert"),
        ("datasets_folder", "(it holds a Hugging Face datasets folder: `raft-dist convert"),
    ],
)
def test_empty_or_missing_data_set(tmp_path: Path, layout: str, message: str) -> None:
    """Also data in another shape: refused once, with the command that makes JSON Lines of it."""
    data = tmp_path / "data"
    record = {"prompt": "2+2=", "completion": "4"}
    if layout == "empty_shard":
        write_dataset(data, [2])
        (data / "train/shard-00001.jsonl").write_text("")
    elif layout == "no_files":
        (data / "train").mkdir(parents=True)
    elif layout == "json_array":
        data = tmp_path / "data.json"
        data.write_text(json.dumps([record, record], indent=2))
    elif layout in ("parquet", "parquet_folder"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        data.mkdir()
        pq.write_table(pa.Table.from_pylist([record]), data / "train.parquet")
        data = data / "train.parquet" if layout == "parquet" else data
    elif layout == "gzip":
        data = tmp_path / "data.jsonl.gz"
        data.write_bytes(gzip.compress(json.dumps(record).encode() + b"\n"))
    elif layout == "datasets_folder":
        (data / "train").mkdir(parents=True)
        (data / "dataset_dict.json").write_text('{"splits": ["train"]}')
        (data / "train/state.json").write_text("{}")
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "out")
    result = run_cli("launch", "--config", str(recipe))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_existing_checkpoints_need_an_explicit_resume(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [4])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "out",
        training={"max_steps": 2, "save_every": 1},
    )
    first = run_cli("train", "--config", str(recipe))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli("train", "--config", str(recipe))
    assert again.returncode == 2
    assert "training.resume=latest" in again.stderr
    saved = (tmp_path / "out/recipe.yaml").read_text()
    assert "max_steps: 2" in saved


def test_plain_text_fine_tuning_on_gpt2(tmp_path: Path) -> None:
    """data.format=text: classic causal-LM fine-tuning, the baseline RAFT is compared with."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b"):
        (corpus / f"{name}.txt").write_text("the tide mill turns at dawn.\n" * 40)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        corpus,
        tmp_path / "out",
        model={"name_or_path": "builtin:tiny-gpt2"},
        data={"format": "text", "max_seq_len": 64},
        training={"max_steps": 6, "lr": 3e-3},
    )
    result = run_cli("train", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # every position is a target in text mode: 2 rows x 2 micro-batches x 63 shifted tokens
    assert read_metrics(tmp_path / "out")[0]["target_tokens"] == 2 * 2 * 63
    assert (tmp_path / "out/final/config.json").is_file()
