"""LoRA and QLoRA: quantized loading of the frozen base and peft adapters on top.

Two silent failures are guarded here: bitsandbytes' CPU fast path for 4-bit weights has no
autograd (after any no-grad forward, LoRA gradients become exactly zero), and reentrant
gradient checkpointing drops LoRA gradients inside checkpointed blocks.
"""

from __future__ import annotations

from typing import Any

from raft_dist.config import LoraConfig, QuantizationConfig, Recipe
from raft_dist.errors import ConfigError
from raft_dist.model import enable_gradient_checkpointing, torch_dtype


def quantization_config(cfg: QuantizationConfig) -> Any | None:
    if cfg.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(cfg.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(cfg.quant_storage),
    )


def disable_cpu_4bit_fast_path(model: Any) -> int:
    """bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs after a no-grad forward and then
    uses a kernel without autograd: LoRA grads silently stay 0. Keep the autograd path."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - a quantized model implies bitsandbytes
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def wrap_with_lora(model: Any, lora: LoraConfig, *, gradient_checkpointing: bool) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
        # The frozen embeddings give no grad-requiring input to the first checkpointed block.
        model.enable_input_require_grads()
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save or None,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def check_combination(recipe: Recipe, zero_stage: int | None) -> None:
    """Refuse quantization settings that the chosen engine cannot use, naming both settings."""
    q = recipe.quantization
    if q.mode == "none":
        return  # "quantization needs LoRA" is a recipe rule: config.validate states it
    if zero_stage is not None and q.mode == "8bit":
        raise ConfigError(
            f"quantization.mode=8bit with DeepSpeed ZeRO-{zero_stage}: bitsandbytes 8-bit weights "
            "cannot be sharded by DeepSpeed; use quantization.mode=4bit or a non-DeepSpeed profile"
        )
    if zero_stage == 3 and q.quant_storage != q.compute_dtype:
        raise ConfigError(
            f"quantization.quant_storage={q.quant_storage} with DeepSpeed ZeRO-3: ZeRO-3 shards "
            "parameters of one dtype, so set quantization.quant_storage equal to "
            f"quantization.compute_dtype ({q.compute_dtype})"
        )


def build_training_model(recipe: Recipe, tokenizer: Any, device_map: Any = None) -> Any:
    """The model the loop trains: full fine-tuning, LoRA, or QLoRA on a quantized base."""
    from raft_dist.model import load_model

    quantized = recipe.quantization.mode != "none"
    model = load_model(
        recipe.model,
        tokenizer,
        quantization_config(recipe.quantization),
        device_map=device_map if quantized else None,
    )
    checkpointing = recipe.training.gradient_checkpointing
    if checkpointing is None:
        checkpointing = quantized
    if not recipe.lora.enabled:
        if checkpointing:
            enable_gradient_checkpointing(model)
        return model
    disable_cpu_4bit_fast_path(model)
    return wrap_with_lora(model, recipe.lora, gradient_checkpointing=checkpointing)
