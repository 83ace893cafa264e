"""ZeRO-3 built whole (profile deepspeed_zero3) from a pretrained folder with TIED embeddings.

A `save_pretrained` of a tied model holds the embedding only; lm_head must come back as the same
Parameter on every rank, or ZeRO-3 trains from other starting weights than DDP while every loss
stays plausible. One real 2-process launch per profile (cpu = DDP, deepspeed_zero3) of the same
folder: the step-1 loss is taken before any update, so equal losses and gradient norms at every
step mean equal starting weights and equal updates. The in-rank guard (model.check_tied_embeddings)
is checked on its own without a launch.
"""

from __future__ import annotations

import pytest
import torch
from helpers import launch, rank_facts, read_metrics, write_dataset, write_recipe

STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from raft_dist.config import ModelConfig
    from raft_dist.model import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("zero3_tied")
    cfg = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    write_dataset(root / "data", [6, 6], seed=11)
    out = {}
    for name, profile in [("ddp", "cpu"), ("z3", "deepspeed_zero3")]:
        recipe = write_recipe(
            root / f"{name}.yaml",
            root / "data",
            root / name,
            model={"name_or_path": str(root / "pretrained"), "dtype": "float32"},
            training={"max_steps": STEPS, "lr": 3e-3, "save_every": 0, "eval_every": 0},
        )
        launch(recipe, profile)
        out[name] = root / name
    return out


@pytest.mark.distributed
def test_zero3_from_a_tied_folder_matches_ddp(runs: dict) -> None:
    facts = rank_facts(runs["z3"])
    assert [(f["rank"], f["engine"], f["zero_stage"]) for f in facts] == [
        (0, "deepspeed", 3),
        (1, "deepspeed", 3),
    ]
    ddp = [m for m in read_metrics(runs["ddp"]) if "loss" in m]
    z3 = [m for m in read_metrics(runs["z3"]) if "loss" in m]
    assert [m["step"] for m in ddp] == [m["step"] for m in z3] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, z3, strict=True):
        assert b["target_tokens"] == a["target_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)


def test_an_untied_head_with_other_values_stops_the_run() -> None:
    from raft_dist.config import ModelConfig
    from raft_dist.model import check_tied_embeddings, load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    model = load_model(cfg, load_tokenizer(cfg))
    check_tied_embeddings(model)  # tied: one Parameter
    # Same values in a separate tensor pass (e.g. a quantized load that copies the head).
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    check_tied_embeddings(model)
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
    with pytest.raises(RuntimeError, match="tie_word_embeddings is true"):
        check_tied_embeddings(model)
