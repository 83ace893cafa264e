"""Every shipped recipe loads, declares its launch profile and memory in its header, and
`raft-dist launch --dry-run` resolves it with that profile on this CPU-only machine without
downloading anything (the real-model recipes name hub ids that are never fetched here).

Header convention (README, Recipes): a comment line `# profile: NAME` (a launch profile, or
`none` for a base that other recipes extend) and, for launchable recipes, a line with `memory:`
and a figure in GB or MB.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, offline_env, run_cli

from raft_dist.config import load_recipe
from raft_dist.resources import profile_names

CONFIGS = ROOT / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
PROFILE_LINE = re.compile(r"^# profile: (\S+)", re.MULTILINE)
MEMORY_FIGURE = re.compile(r"memory:.*\d\s*[GM]B", re.IGNORECASE)
HEADER_LAUNCH = re.compile(r"raft-dist launch --profile (\S+)")
BASE = "none"


def header(path: Path) -> str:
    """The leading comment block of a recipe."""
    lines = path.read_text(encoding="utf-8").splitlines()
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line)
    return "\n".join(block)


def declared_profile(path: Path) -> str:
    found = PROFILE_LINE.findall(header(path))
    assert len(found) == 1, f"{path.name}: the header needs exactly one '# profile: NAME' line"
    return found[0]


def extended_names() -> set[str]:
    names = set()
    for path in RECIPES:
        parent = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("extends")
        if parent:
            names.add((path.parent / parent).resolve().name)
    return names


LAUNCHABLE = [p for p in RECIPES if PROFILE_LINE.findall(header(p)) != [BASE]]


def test_the_real_model_recipes_ship() -> None:
    names = {p.name for p in RECIPES}
    expected = {
        "tiny.yaml",
        "demo.yaml",
        "gpt2-full.yaml",
        "gpt2-lora.yaml",
        "smollm2-1.7b-full.yaml",
        "qwen2.5-7b-qlora.yaml",
        "multinode-zero3.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_its_header_declares_profile_and_memory(path: Path) -> None:
    load_recipe(path)
    text = header(path)
    profile = declared_profile(path)
    if profile == BASE:
        assert path.name in extended_names(), f"{path.name}: a base recipe nothing extends"
        return
    assert profile in profile_names(), f"{path.name}: unknown profile {profile}"
    assert MEMORY_FIGURE.search(text), f"{path.name}: the header needs a 'memory: ... GB' figure"
    for named in HEADER_LAUNCH.findall(text):
        assert named == profile, f"{path.name}: header command uses --profile {named}"


@pytest.mark.parametrize("path", LAUNCHABLE, ids=lambda p: p.name)
def test_dry_run_resolves_with_the_declared_profile(path: Path) -> None:
    profile = declared_profile(path)
    recipe = load_recipe(path)
    env = offline_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = run_cli(
        "launch", "--profile", profile, "--config", str(path), "--dry-run", env=env, timeout=120
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    resolved, _, command = result.stdout.partition("# command")
    assert yaml.safe_load(resolved.replace("# resolved recipe", "")) == recipe.to_dict()
    assert f"name_or_path: {recipe.model.name_or_path}" in resolved
    assert f"RAFT_DIST_PROFILE={profile}" in command
    assert f"accelerate_configs/{profile}.yaml" in command
    assert str(path) in command


def test_gpt2_lora_adapts_every_conv1d_projection() -> None:
    """gpt2-lora's target modules on the GPT-2 architecture (the built-in tiny one: no
    download): every Conv1D projection gets an adapter, peft sets fan_in_fan_out by itself, and
    the merged model computes what the adapted one does."""
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    from raft_dist.adapters import build_training_model
    from raft_dist.model import load_tokenizer

    recipe = load_recipe(CONFIGS / "gpt2-lora.yaml", ["model.name_or_path=builtin:tiny-gpt2"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        model = build_training_model(recipe, load_tokenizer(recipe.model))
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    layers = model.get_base_model().config.n_layer
    parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    expected = {f"base_model.model.transformer.h.{i}.{p}" for i in range(layers) for p in parts}
    assert set(adapted) == expected
    assert all(isinstance(m.get_base_layer(), Conv1D) for m in adapted.values())
    assert model.peft_config["default"].fan_in_fan_out is True
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    for module in adapted.values():
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        merged_logits = model.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-4, rtol=1e-4)


def test_dry_run_refuses_a_quantization_the_profile_cannot_use() -> None:
    """Checked before any rank starts: the QLoRA recipe's uint8 storage under ZeRO-3."""
    env = offline_env(CUDA_VISIBLE_DEVICES="")
    path = CONFIGS / "qwen2.5-7b-qlora.yaml"
    args = ("launch", "--profile", "deepspeed_zero3", "--config", str(path), "--dry-run")
    result = run_cli(*args, env=env, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:]
    assert "quantization.quant_storage=uint8 with DeepSpeed ZeRO-3" in result.stderr
    assert "Traceback" not in result.stderr
