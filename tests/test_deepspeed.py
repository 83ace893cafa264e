"""DeepSpeed ZeRO 1/2/3 (+ offload) and multi-node on loopback, with real processes on CPU.

Every run is 2 real processes started by `raft-dist launch`; engine, stage and world size are
asserted from files the ranks write about themselves. The uninterrupted ZeRO runs double as the
references for the resume tests.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    RAFT_DIST,
    launch,
    launch_two_machines,
    offline_env,
    one_step_recipe,
    rank_facts,
    read_metrics,
    seen_ids,
    train_losses,
    write_dataset,
    write_recipe,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

SHARDS = [7, 3, 9, 6, 4]
STEPS = 4


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


@pytest.fixture(scope="module")
def zero(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("zero")
    ids = write_dataset(root / "data", SHARDS, eval_sizes=(3, 2), seed=5)
    runs: dict = {"root": root, "ids": ids}

    def recipe(name: str) -> Path:
        return write_recipe(
            root / f"{name}.yaml",
            root / "data",
            root / name,
            data={"record_audit": True},
            training={
                "micro_batch_size": 1,
                "gradient_accumulation_steps": 2,
                "max_steps": STEPS,
                "save_every": 2,
                "keep_last": 1,
            },
        )

    for name, profile in [
        ("ddp", "cpu"),
        ("z1", "deepspeed_zero1"),
        ("z2", "deepspeed_zero2"),
        ("z3", "deepspeed_zero3"),
    ]:
        launch(recipe(name), profile)
        runs[name] = root / name
    for name, profile in [
        ("z2", "deepspeed_zero2"),
        ("z3", "deepspeed_zero3"),
        ("z2off", "deepspeed_zero2_offload"),
    ]:
        resumed = recipe(f"{name}_resumed")
        launch(resumed, profile, "training.stop_after_steps=2")
        launch(resumed, profile, "training.resume=latest")
        runs[f"{name}_resumed"] = root / f"{name}_resumed"
    launch(recipe("z2off"), "deepspeed_zero2_offload")
    runs["z2off"] = root / "z2off"
    return runs


@pytest.mark.parametrize(("name", "stage"), [("z1", 1), ("z2", 2), ("z3", 3), ("z2off", 2)])
def test_deepspeed_engine_and_stage_are_live(zero: dict, name: str, stage: int) -> None:
    facts = rank_facts(zero[name])
    assert [f["rank"] for f in facts] == [0, 1]
    for fact in facts:
        assert fact["engine"] == "deepspeed" and fact["zero_stage"] == stage
        assert fact["world_size"] == 2 and fact["backend"] == "gloo"
    seen = seen_ids(zero[name])  # 4 steps x micro 1 x accumulation 2 x 2 ranks
    assert len(seen) == len(set(seen)) == 2 * 2 * STEPS and set(seen) <= set(zero["ids"])


@pytest.mark.parametrize("name", ["z1", "z2", "z3"])
def test_zero_matches_ddp_by_gradient_norm_and_loss(zero: dict, name: str) -> None:
    ddp = [m for m in read_metrics(zero["ddp"]) if "loss" in m]
    other = [m for m in read_metrics(zero[name]) if "loss" in m]
    assert len(ddp) == len(other) == STEPS
    for a, b in zip(ddp, other, strict=True):
        assert b["target_tokens"] == a["target_tokens"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["lr"] == pytest.approx(a["lr"])


@pytest.mark.parametrize("name", ["z2", "z3"])
def test_zero_resume_is_exact(zero: dict, name: str) -> None:
    resumed = zero[f"{name}_resumed"]
    assert train_losses(resumed) == train_losses(zero[name])
    assert same_weights(resumed, zero[name])
    seen = seen_ids(resumed)
    assert len(seen) == len(set(seen))  # no record read twice across stop and resume


def test_offload_resume_continues(zero: dict) -> None:
    """ZeRO-2 offload (DeepSpeedCPUAdam) resumes with the same data and losses; its weights
    after the resumed steps drift by up to ~1e-3 from an uninterrupted run (see the strict
    xfail below), unlike ZeRO-2/3 with torch AdamW, which resume bitwise."""
    resumed, whole = zero["z2off_resumed"], zero["z2off"]
    assert train_losses(resumed) == pytest.approx(train_losses(whole), rel=1e-6)
    left = load_file(resumed / "final/model.safetensors")
    right = load_file(whole / "final/model.safetensors")
    for key, tensor in left.items():
        torch.testing.assert_close(tensor, right[key], rtol=0.0, atol=2e-3)
    seen = seen_ids(resumed)
    assert len(seen) == len(set(seen))


@pytest.mark.xfail(strict=True, reason="DeepSpeedCPUAdam resume is not bit-exact (known gap)")
def test_offload_resume_is_bitwise(zero: dict) -> None:
    assert same_weights(zero["z2off_resumed"], zero["z2off"])


def test_offload_trains(zero: dict) -> None:
    losses = train_losses(zero["z2off"])
    assert len(losses) == STEPS and losses[STEPS] < losses[1]


def test_zero3_export_loads_in_a_fresh_process(zero: dict) -> None:
    """The gathered ZeRO-3 model is a plain HF model with the same loss as the DDP model."""
    probe = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "losses = []\n"
        "for path in sys.argv[1:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(path)\n"
        "    tokenizer = AutoTokenizer.from_pretrained(path)\n"
        "    ids = tokenizer('the tide mill turns', return_tensors='pt')\n"
        "    losses.append(model(**ids, labels=ids['input_ids']).loss.item())\n"
        "print('LOSSES', *losses)\n"
    )
    result = subprocess.run(
        [RAFT_DIST[0], "-c", probe, str(zero["z3"] / "final"), str(zero["ddp"] / "final")],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    z3_loss, ddp_loss = map(float, result.stdout.split("LOSSES")[1].split())
    assert z3_loss == pytest.approx(ddp_loss, rel=1e-4)
    weights = load_file(zero["z3"] / "final/model.safetensors")
    assert all(t.numel() > 0 for t in weights.values())  # gathered, not empty ZeRO-3 shards
    assert torch.isfinite(torch.tensor(z3_loss))


def test_accumulation_equivalence_under_zero2(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [8], seed=3)
    norms = []
    for name, mb, acc in [("mb4", 4, 1), ("acc4", 1, 4)]:
        recipe = one_step_recipe(tmp_path, name, mb, acc, output={"save_final_model": False})
        launch(recipe, "deepspeed_zero2")
        norms.append(read_metrics(tmp_path / name)[0])
    assert norms[0]["target_tokens"] == norms[1]["target_tokens"]
    assert norms[1]["grad_norm"] == pytest.approx(norms[0]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("profile", ["multi_node", "multi_node_deepspeed_zero3"])
def test_two_nodes_on_loopback(tmp_path: Path, profile: str) -> None:
    ids = write_dataset(tmp_path / "data", [5, 4, 6], seed=9)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "run",
        data={"record_audit": True},
        training={"epochs": 1},
    )
    env = offline_env()
    if profile == "multi_node":
        env["ACCELERATE_USE_CPU"] = "1"  # the profile's header: CPU-only nodes need it
    codes, outputs = launch_two_machines(recipe, profile, env, ([], []))
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    facts = rank_facts(tmp_path / "run")
    assert [f["world_size"] for f in facts] == [2, 2]
    assert {f["engine"] for f in facts} == {"ddp" if profile == "multi_node" else "deepspeed"}
    seen = seen_ids(tmp_path / "run")
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
