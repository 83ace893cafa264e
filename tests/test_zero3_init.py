"""ZeRO-3 with zero3_init_flag: true (profile deepspeed_zero3_init): the model is BUILT partitioned.

One real 2-process `raft-dist launch` of a pretrained folder (from_pretrained under
deepspeed.zero.Init). Every rank prints, right after construction and before
deepspeed.initialize, what it holds (raft_dist.train.deepspeed.report_partitioned_build); the
test reads those lines, the ranks' own facts (engine, stage, world size), the losses and the
gathered export. With the flag off (profile deepspeed_zero3) the model is built whole and
no rank prints the line, so the partition assertions fail.
"""

from __future__ import annotations

import math
import re

import pytest
from helpers import launch, rank_facts, train_losses, write_dataset, write_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

PROFILE = "deepspeed_zero3_init"
STEPS = 4
REPORT = re.compile(
    r"zero3 init: rank (\d+)/(\d+) built the model partitioned, holds (\d+) of (\d+) parameter "
    r"elements \([\d.]+%\) in (\d+) parameters; (\d+) parameters \((\d+) elements\) are at most "
    r"stage3_param_persistence_threshold=(\d+) elements"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from raft_dist.config import ModelConfig
    from raft_dist.model import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("zero3_init")
    cfg = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    model.save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    write_dataset(root / "data", [6, 6], seed=3)
    recipe = write_recipe(
        root / "recipe.yaml",
        root / "data",
        root / "out",
        model={"name_or_path": str(root / "pretrained"), "dtype": "float32"},
        training={"max_steps": STEPS, "lr": 3e-3, "save_every": 0, "eval_every": 0},
    )
    result = launch(recipe, PROFILE)
    return {
        "out": root / "out",
        "output": result.stdout + result.stderr,
        "shapes": {n: tuple(p.shape) for n, p in model.state_dict().items()},
        "elements": sum(p.numel() for p in model.parameters()),  # tied weights once
    }


def test_ranks_are_deepspeed_zero3_on_two_processes(run: dict) -> None:
    facts = rank_facts(run["out"])
    assert [f["rank"] for f in facts] == [0, 1]
    for fact in facts:
        assert fact["engine"] == "deepspeed" and fact["zero_stage"] == 3
        assert fact["world_size"] == 2 and fact["backend"] == "gloo"


def test_each_rank_holds_half_the_model_right_after_construction(run: dict) -> None:
    reports = {int(m[0]): m for m in REPORT.findall(run["output"])}
    assert sorted(reports) == [0, 1], f"no partitioned build reported:\n{run['output'][-3000:]}"
    for rank, (_, world, local, total, params, persistent, _, threshold) in reports.items():
        local, total, params = int(local), int(total), int(params)
        assert int(world) == 2
        assert total == run["elements"]  # every element of the model, counted once
        # Each parameter is split in 2 (DeepSpeed pads it to a multiple of the world size).
        assert total / 2 <= local <= total / 2 + params, (rank, local, total)
        assert int(threshold) == 100_000
        assert 0 < int(persistent) < params  # the small ones; the embedding is above it


def test_training_runs_with_finite_falling_loss(run: dict) -> None:
    losses = train_losses(run["out"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1]


def test_export_gathers_whole_weights(run: dict) -> None:
    saved = load_file(run["out"] / "final" / "model.safetensors")
    shapes = {n: tuple(t.shape) for n, t in saved.items()}
    # Tied embeddings: the export may leave out lm_head.weight, never a partitioned stub.
    assert {n: s for n, s in run["shapes"].items() if n in shapes} == shapes
    assert "model.embed_tokens.weight" in shapes
    assert all(t.numel() > 0 and t.isfinite().all() for t in saved.values())


def test_a_model_built_whole_stops_the_run() -> None:
    """The in-rank check itself: a model that zero.Init did not partition is refused."""
    import torch

    from raft_dist.train.deepspeed import report_partitioned_build

    with pytest.raises(RuntimeError, match="not constructed under deepspeed.zero.Init"):
        report_partitioned_build(torch.nn.Linear(4, 4))


def test_qlora_is_refused_under_zero3_init(monkeypatch: pytest.MonkeyPatch) -> None:
    import raft_dist.train.deepspeed as ds
    from raft_dist.config import ModelConfig
    from raft_dist.errors import ConfigError
    from raft_dist.model import load_model

    monkeypatch.setattr(ds, "zero3_init_active", lambda: True)
    cfg = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    with pytest.raises(ConfigError, match="zero3_init_flag: true"):
        load_model(cfg, tokenizer=None, quantization=object())
