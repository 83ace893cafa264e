"""Real 2-process runs through `raft-dist launch --profile cpu` (accelerate launch, torchrun, gloo).

One set of launches proves several properties at once, to keep the suite short:
  run A (uninterrupted) and run B (stopped after 3 steps, then resumed) on 29 records in 5
  uneven shards (2 ranks do not divide 5 shards; one rank holds one record more and runs a
  whole zero-weight padding window at the end of the epoch).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import (
    launch,
    offline_env,
    one_step_recipe,
    rank_facts,
    read_metrics,
    run_cli,
    seen_ids,
    train_losses,
    write_dataset,
    write_recipe,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

SHARDS = [7, 3, 9, 6, 4]  # 29 records: ranks own 14 and 15


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    ids = write_dataset(root / "data", SHARDS, eval_sizes=(3, 2), seed=1)
    common = {
        "data": {"record_audit": True},
        "training": {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 2,
            "epochs": 1,
            "save_every": 3,
            "keep_last": 1,
            "eval_every": 4,
        },
    }
    recipe_a = write_recipe(root / "a.yaml", root / "data", root / "run_a", **common)
    recipe_b = write_recipe(root / "b.yaml", root / "data", root / "run_b", **common)
    out_a = launch(recipe_a)
    launch(recipe_b, "cpu", "training.stop_after_steps=3")
    stopped = sorted(p.name for p in (root / "run_b" / "checkpoints").iterdir())
    stopped_summary = json.loads((root / "run_b" / "summary.json").read_text())
    stopped_final = (root / "run_b" / "final").exists()
    stopped_peaks = sorted(p.name for p in (root / "run_b" / "ranks").glob("*_peak.json"))
    launch(recipe_b, "cpu", "training.resume=latest")
    return {
        "ids": ids,
        "a": root / "run_a",
        "b": root / "run_b",
        "stdout_a": out_a.stdout,
        "stopped_checkpoints": stopped,
        "stopped_summary": stopped_summary,
        "stopped_final": stopped_final,
        "stopped_peaks": stopped_peaks,
    }


def test_two_real_processes_with_gloo(runs: dict) -> None:
    facts = rank_facts(runs["a"])
    assert [f["rank"] for f in facts] == [0, 1]
    for fact in facts:
        assert fact["world_size"] == 2
        assert fact["backend"] == "gloo"
        assert fact["engine"] == "ddp"
    assert "world size    2 process(es)" in runs["stdout_a"]


def test_every_record_seen_exactly_once_with_uneven_shards(runs: dict) -> None:
    seen = seen_ids(runs["a"])
    assert sorted(seen) == sorted(runs["ids"])
    assert len(seen) == len(set(seen)) == sum(SHARDS)
    per_rank = [len(p.read_text().split()) for p in sorted((runs["a"] / "audit").glob("*.txt"))]
    assert per_rank == [14, 15]


def test_epoch_ends_together_after_padding_window(runs: dict) -> None:
    summary = json.loads((runs["a"] / "summary.json").read_text())
    # The longer rank has 15 micro-batches -> 8 windows; the other pads its 8th window.
    assert summary["steps"] == 8
    assert summary["examples_tokenized"] == sum(SHARDS)
    assert [e["step"] for e in summary["evals"]] == [4, 8]


def test_an_early_stop_takes_the_same_exit_path(runs: dict) -> None:
    """stop_after_steps: a checkpoint, no final/ and no final eval, the same summary and
    per-rank files as a full run, and why it stopped."""
    summary = runs["stopped_summary"]
    assert summary["stopped"] == {"reason": "stop_after_steps", "step": 3, "detail": ""}
    assert summary["steps"] == 3 and summary["model_dir"] is None
    assert summary["evals"] == []  # eval_every=4: a final eval would have added step 3
    assert not runs["stopped_final"]
    assert runs["stopped_peaks"] == ["rank0_peak.json", "rank1_peak.json"]
    full = json.loads((runs["a"] / "summary.json").read_text())
    assert full["stopped"] is None and set(full) == set(summary)


def test_resume_is_exact(runs: dict) -> None:
    assert runs["stopped_checkpoints"] == ["step-00000003"]
    kept = sorted(p.name for p in (runs["a"] / "checkpoints").iterdir())
    assert kept == ["step-00000006"]  # keep_last=1 pruned step 3
    losses_a, losses_b = train_losses(runs["a"]), train_losses(runs["b"])
    assert sorted(losses_b) == list(range(1, 9))
    assert losses_a == losses_b
    weights_a = load_file(runs["a"] / "final" / "model.safetensors")
    weights_b = load_file(runs["b"] / "final" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        assert tensor.equal(weights_b[name]), name
    # The interrupted run read every record exactly once across its two invocations.
    seen = seen_ids(runs["b"])
    assert sorted(seen) == sorted(runs["ids"])


def test_lr_schedule_spans_the_whole_run(runs: dict) -> None:
    lrs = [m["lr"] for m in read_metrics(runs["a"]) if "lr" in m]
    assert len(lrs) == 8
    assert lrs[0] > lrs[-1] > 0.0  # cosine to zero over 8 steps: the last step is still > 0
    assert lrs == sorted(lrs, reverse=True)


def test_final_model_loads_with_plain_transformers(runs: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(runs["a"] / "final")
    tokenizer = AutoTokenizer.from_pretrained(runs["a"] / "final")
    ids = tokenizer("harbour tide mill", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.isfinite().all()


def test_accumulation_equivalence_on_one_and_two_processes(tmp_path: Path) -> None:
    """mb8 x acc1 == mb1 x acc8 == 2 ranks x mb1 x acc4, compared by gradient norm and loss."""
    write_dataset(tmp_path / "data", [8], seed=3)
    lengths = []
    for line in (tmp_path / "data/train/shard-00000.jsonl").read_text().splitlines():
        lengths.append(len(json.loads(line)["oracle"]))
    assert max(lengths) > 2 * min(lengths)  # variable length is the point of the test

    def one_step(name: str, mb: int, acc: int, processes: int) -> dict:
        recipe = one_step_recipe(tmp_path, name, mb, acc)
        if processes == 1:
            result = run_cli("train", "--config", str(recipe), "output.save_final_model=false")
            assert result.returncode == 0, result.stderr[-4000:]
        else:
            launch(recipe, "cpu", "output.save_final_model=false")
        return read_metrics(tmp_path / name)[0]

    big = one_step("mb8", 8, 1, 1)
    accumulated = one_step("acc8", 1, 8, 1)
    two_ranks = one_step("ddp", 1, 4, 2)
    for other in (accumulated, two_ranks):
        assert other["target_tokens"] == big["target_tokens"]
        assert other["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
        assert other["loss"] == pytest.approx(big["loss"], rel=1e-6)


def test_packed_rows_on_two_processes(tmp_path: Path) -> None:
    """data.packing under DDP on the CPU: attention per example on every rank (the device is
    "cpu:0" there, not "cpu"), after the packing check passed on the prepared model."""
    write_dataset(tmp_path / "data", [6, 5], seed=3)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "out",
        data={"packing": True, "max_seq_len": 512},
        training={"max_steps": 3, "micro_batch_size": 1, "gradient_accumulation_steps": 1},
        output={"save_final_model": False},
    )
    result = launch(recipe, "cpu")
    assert "packed: whole examples per row, attention per example" in result.stdout
    assert [(f["world_size"], f["engine"]) for f in rank_facts(tmp_path / "out")] == [
        (2, "ddp")
    ] * 2
    assert [row["step"] for row in read_metrics(tmp_path / "out") if "loss" in row] == [1, 2, 3]


def test_live_setup_contradicting_the_launch_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, tmp_path / "out")
    env = offline_env(RAFT_DIST_EXPECT_WORLD_SIZE="2", RAFT_DIST_EXPECT_ENGINE="ddp")
    result = run_cli("train", "--config", str(recipe), env=env)
    assert result.returncode == 2
    assert "world size 1, but the launch asked for 2" in result.stderr
    assert "Traceback" not in result.stderr
