"""LoRA and QLoRA (bitsandbytes 4-bit on CPU) through the same loop, adapters and merging."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    launch,
    rank_facts,
    read_metrics,
    run_cli,
    train_losses,
    write_dataset,
    write_recipe,
)
from safetensors.torch import load_file

from raft_dist.config import Recipe, load_recipe
from raft_dist.errors import ConfigError

QLORA = {"mode": "4bit", "quant_type": "nf4", "compute_dtype": "bfloat16"}


def save_tiny_base(folder: Path, arch: str) -> Path:
    """A saved random base, so merging has full-precision weights to reload."""
    from raft_dist.config import ModelConfig
    from raft_dist.model import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=f"builtin:tiny-{arch}")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    load_model(cfg, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_tiny_base(root / arch, arch) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, bases: dict) -> Any:
    """`trained(arch, quantized)`: (run folder, CLI result) of one 4-step single-process run
    of lora_recipe, made once for the module: the training, merge and resume tests check the
    same runs."""
    runs: dict[tuple[str, bool], tuple[Path, Any]] = {}

    def run(arch: str, quantized: bool) -> tuple[Path, Any]:
        if (arch, quantized) not in runs:
            root = tmp_path_factory.mktemp(f"{arch}-{'qlora' if quantized else 'lora'}")
            result = run_cli(
                "train", "--config", str(lora_recipe(root, bases[arch], "run", quantized))
            )
            assert result.returncode == 0, result.stderr[-4000:]
            runs[arch, quantized] = root / "run", result
        return runs[arch, quantized]

    return run


def lora_recipe(tmp_path: Path, base: Path, name: str, quantized: bool, **training) -> Path:
    if not (tmp_path / "data").exists():
        write_dataset(tmp_path / "data", [6, 6], eval_sizes=(4,), seed=2)
    return write_recipe(
        tmp_path / f"{name}.yaml",
        tmp_path / "data",
        tmp_path / name,
        model={"name_or_path": str(base), "dtype": "bfloat16" if quantized else "float32"},
        training={
            "max_steps": 4,
            "lr": 1e-2,
            "eval_every": 2,
            "eval_batches": 1,
            "save_every": 2,
            **training,
        },
        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
        quantization=QLORA if quantized else {"mode": "none"},
    )


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_train_and_nothing_else_does(trained: Any, arch: str, quantized: bool) -> None:
    run_dir, result = trained(arch, quantized)
    metrics = read_metrics(run_dir)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    # Step 3 follows the evaluation at step 2: gradients must not have collapsed to zero.
    assert all(m["grad_norm"] > 0 for m in metrics if "loss" in m)
    adapter = load_file(run_dir / "final/adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at 0
    assert "trainable" in result.stdout and "MiB in memory" in result.stdout
    # checkpoints hold the adapter, not the whole model
    checkpoint = run_dir / "checkpoints/step-00000004"
    assert (checkpoint / "adapter/adapter_model.safetensors").is_file()
    assert not list(checkpoint.glob("model*.safetensors"))


def test_lora_resume_is_exact(tmp_path: Path, bases: dict, trained: Any) -> None:
    whole, _ = trained("llama", False)  # the same recipe and data, uninterrupted
    parts = lora_recipe(tmp_path, bases["llama"], "parts", False)
    assert run_cli("train", "--config", str(parts), "training.stop_after_steps=2").returncode == 0
    resumed = run_cli("train", "--config", str(parts), "training.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(tmp_path / "parts") == train_losses(whole)
    left = load_file(whole / "final/adapter_model.safetensors")
    right = load_file(tmp_path / "parts/final/adapter_model.safetensors")
    assert left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


def logits(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.arange(5, 40).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_merge_equals_adapter_on_full_precision_base(
    tmp_path: Path, bases: dict, trained: Any, quantized: bool
) -> None:
    adapter = trained("llama", quantized)[0] / "final"
    result = run_cli(
        "merge",
        "--base",
        str(bases["llama"]),
        "--adapter",
        str(adapter),
        "--out",
        str(tmp_path / "merged"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = logits(tmp_path / "merged")
    reference = logits(bases["llama"], adapter)  # the adapter on a full-precision reload
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)
    assert not merged.equal(logits(bases["llama"]))  # the adapter changed something
    if not quantized:  # an existing --out is replaced only when asked
        again = [*result.args[3:]]
        refused = run_cli(*again)
        assert refused.returncode == 2 and "pass --overwrite" in refused.stderr
        assert logits(tmp_path / "merged").equal(merged)
        assert run_cli(*again, "--overwrite").returncode == 0


def test_merge_refuses_a_quantized_base(tmp_path: Path, bases: dict) -> None:
    fake = tmp_path / "quantized"
    fake.mkdir()
    config = json.loads((bases["llama"] / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True}
    (fake / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    result = run_cli(
        "merge", "--base", str(fake), "--adapter", str(adapter), "--out", str(tmp_path / "out")
    )
    assert result.returncode == 2
    assert "quantized model; merging into quantized weights is lossy" in result.stderr
    assert "Traceback" not in result.stderr


def test_qlora_on_two_processes(tmp_path: Path, bases: dict) -> None:
    recipe = lora_recipe(tmp_path, bases["gpt2"], "ddp", True)
    launch(recipe, "cpu")
    facts = rank_facts(tmp_path / "ddp")
    assert [f["world_size"] for f in facts] == [2, 2]
    assert (tmp_path / "ddp/final/adapter_model.safetensors").is_file()


def test_refused_combinations_name_both_settings() -> None:
    from raft_dist.adapters import check_combination

    root = Path(__file__).resolve().parent.parent
    with pytest.raises(ConfigError, match="quantization.mode=4bit needs lora.enabled=true"):
        load_recipe(root / "configs/tiny.yaml", ["quantization.mode=4bit"])
    qlora: Recipe = load_recipe(root / "configs/tiny-qlora.yaml")
    check_combination(qlora, None)
    check_combination(qlora, 2)
    with pytest.raises(ConfigError, match="quant_storage=uint8 with DeepSpeed ZeRO-3"):
        check_combination(qlora, 3)
    qlora.quantization.quant_storage = "bfloat16"
    check_combination(qlora, 3)
    qlora.quantization.mode = "8bit"
    with pytest.raises(ConfigError, match="8bit with DeepSpeed ZeRO-2"):
        check_combination(qlora, 2)


def test_cpu_4bit_fast_path_is_disabled_on_every_layer() -> None:
    import bitsandbytes as bnb

    from raft_dist.adapters import disable_cpu_4bit_fast_path, quantization_config
    from raft_dist.config import ModelConfig, QuantizationConfig
    from raft_dist.model import load_model, load_tokenizer

    cfg = ModelConfig()
    model = load_model(cfg, load_tokenizer(cfg), quantization_config(QuantizationConfig("4bit")))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == disable_cpu_4bit_fast_path(model) > 0
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)


@pytest.mark.parametrize("profile", ["deepspeed_zero2", "deepspeed_zero3"])
def test_qlora_under_deepspeed_resumes_exactly(tmp_path: Path, bases: dict, profile: str) -> None:
    """QLoRA with ZeRO-2/3 on CPU (quant storage = compute dtype): trains, checkpoints hold no
    frozen base weights, and a stop + resume gives the same adapter bit for bit."""

    def run(name: str, *overrides: str) -> None:
        recipe = lora_recipe(tmp_path, bases["llama"], name, True, eval_every=0)
        launch(recipe, profile, "quantization.quant_storage=bfloat16", *overrides)

    run("whole")
    run("parts", "training.stop_after_steps=2")
    run("parts", "training.resume=latest")
    facts = rank_facts(tmp_path / "parts")
    assert {f["engine"] for f in facts} == {"deepspeed"}
    assert train_losses(tmp_path / "parts") == train_losses(tmp_path / "whole")
    left = load_file(tmp_path / "whole/final/adapter_model.safetensors")
    right = load_file(tmp_path / "parts/final/adapter_model.safetensors")
    assert all(left[k].equal(right[k]) for k in left)
    checkpoint = tmp_path / "whole/checkpoints/step-00000004"
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    base_size = (bases["llama"] / "model.safetensors").stat().st_size
    assert size < base_size  # adapter + its optimizer state only, no frozen base


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_only_lora_parameters_change(quantized: bool) -> None:
    """After optimizer steps through raft-dist's model wrapping, every frozen base tensor is
    bit-identical and every adapter tensor that received a gradient has moved."""
    from raft_dist.adapters import build_training_model
    from raft_dist.config import load_recipe
    from raft_dist.evaluate import token_loss_sum
    from raft_dist.model import load_tokenizer

    root = Path(__file__).resolve().parent.parent
    recipe = load_recipe(
        root / ("configs/tiny-qlora.yaml" if quantized else "configs/tiny-lora.yaml")
    )
    tokenizer = load_tokenizer(recipe.model)
    torch.manual_seed(0)
    model = build_training_model(recipe, tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, len(tokenizer), (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(2):
        loss, count = token_loss_sum(model, batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in model.named_parameters():
        if name in trainable:
            assert not param.detach().equal(before[name]), name
        else:
            assert param.detach().equal(before[name]), name


@pytest.mark.parametrize("recipe_name", ["tiny.yaml", "tiny-lora.yaml"])
def test_gradient_checkpointing_recomputes_the_layers(recipe_name: str) -> None:
    """training.gradient_checkpointing=true really checkpoints: a decoder layer's MLP runs its
    forward again during backward, and once without it. A setting that silently did nothing
    would otherwise only show as memory never saved."""
    from raft_dist.adapters import build_training_model
    from raft_dist.evaluate import token_loss_sum, unwrapped
    from raft_dist.model import load_tokenizer

    root = Path(__file__).resolve().parent.parent
    calls = {}
    for checkpointing in (False, True):
        recipe = load_recipe(
            root / "configs" / recipe_name,
            [f"training.gradient_checkpointing={str(checkpointing).lower()}"],
        )
        tokenizer = load_tokenizer(recipe.model)
        model = build_training_model(recipe, tokenizer)
        model.train()
        # Counted on forward itself: module hooks do not fire when checkpointing recomputes.
        mlp = unwrapped(model).model.layers[0].mlp
        count, forward = [0], mlp.forward

        def counting(*args: Any, _f: Any = forward, _n: list = count, **kwargs: Any) -> Any:
            _n[0] += 1
            return _f(*args, **kwargs)

        mlp.forward = counting
        ids = torch.randint(5, len(tokenizer), (2, 16))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        calls[checkpointing] = count[0]
        if checkpointing:
            assert unwrapped(model).config.use_cache is False
    assert calls == {False: 1, True: 2}


def test_enabling_gradient_checkpointing_does_not_warn() -> None:
    """transformers 5.2x deprecates gradient_checkpointing_enable with a warning per call."""
    import warnings

    from raft_dist.config import ModelConfig
    from raft_dist.model import enable_gradient_checkpointing, load_model, load_tokenizer

    cfg = ModelConfig()
    model = load_model(cfg, load_tokenizer(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_gradient_checkpointing(model)
