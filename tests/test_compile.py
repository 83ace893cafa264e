"""training.compile: the compiled forward trains like the eager one, checkpoints keep plain
parameter names (no `_orig_mod.`), a compiled run resumes, and what cannot work is refused.

The end-to-end test compiles the tiny model in two real `raft-dist train` processes (a stopped
run and its resume); inductor's on-disk cache keeps the second compile short.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import offline_env, run_cli, write_dataset, write_recipe

from raft_dist.config import load_recipe
from raft_dist.errors import ConfigError
from raft_dist.train.accelerator import LiveSetup, check_compile, compile_description

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def live(engine: str = "single") -> LiveSetup:
    return LiveSetup(
        world_size=1,
        rank=0,
        num_machines=1,
        machine_rank=0,
        engine=engine,
        distributed_type="DEEPSPEED" if engine == "deepspeed" else "NO",
        backend=None,
        zero_stage=2 if engine == "deepspeed" else None,
        mixed_precision="no",
        device="cpu",
    )


def tiny(*overrides: str):
    return load_recipe(ROOT / "configs" / "tiny.yaml", list(overrides))


# ---- the recipe key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("null", None), ("false", False), ("true", True), ("dynamic", "dynamic")],
)
def test_compile_values(value: str, expected: object) -> None:
    assert tiny(f"training.compile={value}").training.compile == expected


def test_compile_is_off_by_default() -> None:
    recipe = tiny()
    assert recipe.training.compile is None
    assert check_compile(recipe, live()) is False


@pytest.mark.parametrize("value", ["static", "yes please", "[1]"])
def test_unknown_compile_value_is_refused_listing_the_allowed_ones(value: str) -> None:
    with pytest.raises(ConfigError, match=r"training\.compile: .* is not one of: False, True, dyn"):
        tiny(f"training.compile={value}")


@pytest.mark.parametrize("value", ["1", "0"])
def test_an_integer_is_not_taken_for_a_bool(value: str) -> None:
    # YAML's 1 equals True (0 False): the recipe's choice check compares types too.
    with pytest.raises(
        ConfigError, match=rf"training\.compile: {value} is not one of: False, True"
    ):
        tiny(f"training.compile={value}")


@pytest.mark.parametrize("value", ["true", "dynamic"])
def test_compile_under_deepspeed_is_refused(value: str) -> None:
    recipe = tiny(f"training.compile={value}")
    assert check_compile(recipe, live("ddp")) is True
    with pytest.raises(ConfigError, match="training.compile under DeepSpeed"):
        check_compile(recipe, live("deepspeed"))


def test_run_card_line_comes_from_the_live_module() -> None:
    import torch

    module = torch.nn.Linear(2, 2)
    assert compile_description(module, True) is None  # asked for, but not compiled: no line
    module.compile(dynamic=True)  # lazy: nothing compiles before the first call
    assert compile_description(module, "dynamic") == "torch.compile, dynamic=True"
    assert compile_description(module, True) == "torch.compile, default shapes"
    assert not any(k.startswith("_orig_mod.") for k in module.state_dict())
    # What in-place compilation avoids: the wrapper torch.compile(module) returns renames keys.
    assert all(k.startswith("_orig_mod.") for k in torch.compile(module).state_dict())


# ---- a compiled run ----------------------------------------------------------------------


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return sorted(handle.keys())


def train(recipe: Path, env: dict[str, str], *overrides: str) -> str:
    result = run_cli("train", "--config", str(recipe), *overrides, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result.stdout


def test_compiled_run_matches_eager_checkpoints_plain_keys_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset(data, [8, 8])  # no eval split: evaluation would compile a second graph
    # torch's own inductor cache (/tmp/torchinductor_$USER): the resume, and later test runs,
    # reuse the compiled kernels instead of compiling them again.
    env = offline_env(OMP_NUM_THREADS="2")
    common = {
        "data": {"packing": True, "max_seq_len": 128},  # full rows: one shape, one compile
        "training": {"max_steps": STEPS, "save_every": 2, "gradient_accumulation_steps": 1},
    }
    eager = write_recipe(tmp_path / "eager.yaml", data, tmp_path / "eager", **common)
    # Eager packed rows on the CPU run attention per example; compiled ones keep the block
    # mask (one graph for every batch): the losses compared below come from both kernels.
    assert "attention per example" in train(eager, env)
    compiled = write_recipe(
        tmp_path / "compiled.yaml",
        data,
        tmp_path / "compiled",
        data=common["data"],
        training={**common["training"], "compile": True},
    )
    card = train(compiled, env, "training.stop_after_steps=2")
    assert re.search(r"\n  compile +torch\.compile, default shapes\n", card), card
    assert "block-diagonal attention mask" in card
    checkpoint = tmp_path / "compiled" / "checkpoints" / "step-00000002"
    keys = weight_keys(checkpoint)
    assert keys and not any("_orig_mod" in k for k in keys)
    assert keys == weight_keys(tmp_path / "eager" / "checkpoints" / "step-00000002")

    train(compiled, env, "training.resume=latest")
    assert not any("_orig_mod" in k for k in weight_keys(tmp_path / "compiled" / "final"))
    eager_losses, compiled_losses = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled_losses) == len(eager_losses) == STEPS
    # Inductor fuses and reorders float32 arithmetic: close, not bit-equal.
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_losses[-1] < compiled_losses[0]  # it trains
