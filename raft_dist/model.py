"""Model and tokenizer loading: a local folder, a hub id, or a built-in tiny random model.

Built-in models (`builtin:tiny-llama`, `builtin:tiny-gpt2`) are built from a config with random
weights and the tokenizer that ships inside the package, so tests and CI never need a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raft_dist.config import ModelConfig
from raft_dist.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny-tokenizer"

# Small enough to train in seconds on one CPU core, big enough to have every real code path
# (attention masks, rotary positions, tied embeddings, several layers).
TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,
    },
    "tiny-gpt2": {
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 2048,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
}


# Every dtype name a recipe or command may use; the one table from names to torch dtypes.
DTYPE_NAMES = ("float32", "bfloat16", "float16", "uint8")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r} is not one of: {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant: with the reentrant variant, LoRA gradients inside checkpointed blocks
    are missing. The KV cache is useless in training and conflicts with checkpointing.

    transformers 5.2x renamed it activation_checkpointing_enable and warns on every call of the
    old name, which goes away in v6; older releases (the GPU machines' 5.17) only have that."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def pick_device(requested: str = "auto") -> str:
    """auto: the first of cuda, mps, cpu that this machine has; anything else as given."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


BUNDLED_PRETRAINED = "smollm2"


def builtin_name(name_or_path: str) -> str | None:
    """The tiny architecture named by a `builtin:` id (None for anything else)."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return None
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name == BUNDLED_PRETRAINED:
        return None
    if name not in TINY_ARCHITECTURES:
        allowed = ", ".join(BUILTIN_PREFIX + n for n in [*TINY_ARCHITECTURES, BUNDLED_PRETRAINED])
        raise ConfigError(
            f"model.name_or_path: unknown built-in {name_or_path!r}; allowed: {allowed}"
        )
    return name


def resolve_pretrained(name_or_path: str) -> str:
    """`builtin:smollm2` becomes the converted bundled model folder; other ids pass through."""
    if name_or_path == BUILTIN_PREFIX + BUNDLED_PRETRAINED:
        from raft_dist.bundled import bundled_model_dir

        return str(bundled_model_dir())
    return name_or_path


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    source = str(TINY_TOKENIZER) if builtin_name(source) is not None else resolve_pretrained(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.tokenizer: cannot load tokenizer from {source!r}: {exc}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelConfig, tokenizer: Any, quantization: Any = None, device_map: Any = None
) -> Any:
    """Random init for built-ins (seeded by the caller), pretrained weights otherwise.

    With `quantization` (a transformers BitsAndBytesConfig) the frozen base loads quantized;
    a built-in is first built in full precision, then reloaded quantized from a temp folder.
    Under a ZeRO-3 profile with zero3_init_flag: true the model is built partitioned.
    """
    from raft_dist.train.deepspeed import zero3_init_active

    try:
        if zero3_init_active():
            model = _load_partitioned(cfg, tokenizer, quantization)
        else:
            model = _load(cfg, tokenizer, quantization, device_map)
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        if cfg.attn_implementation is None:
            raise
        raise ConfigError(f"model.attn_implementation={cfg.attn_implementation}: {exc}") from None
    check_tied_embeddings(model)
    return model


def check_tied_embeddings(model: Any) -> None:
    """With config.tie_word_embeddings the output head must BE the input embedding (one
    Parameter). A tied model saves the embedding only, so a separate head with other values
    was filled by no checkpoint: training would start, silently, from other weights than DDP's.
    Every rank checks right after loading, under every profile, and stops the run. A separate
    head holding the same values passes (a load that copies the head)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    source, head = getattr(inputs, "weight", None), getattr(outputs, "weight", None)
    if source is None or head is None or head is source:
        return
    if not _same_values(source, head):
        raise RuntimeError(
            "config.tie_word_embeddings is true but the output head "
            f"({type(outputs).__name__}.weight) is not the input embedding and holds other "
            "values: the model would train from other weights than it was saved with"
        )


def _same_values(a: Any, b: Any) -> bool:
    from contextlib import nullcontext

    import torch

    partitioned = [p for p in (a, b) if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        gathered: Any = deepspeed.zero.GatheredParameters(partitioned)
    else:
        gathered = nullcontext()
    with gathered, torch.no_grad():
        if a.shape != b.shape or not (a.is_floating_point() and b.is_floating_point()):
            return False
        return torch.equal(a, b.to(a.dtype))


def _load_partitioned(cfg: ModelConfig, tokenizer: Any, quantization: Any) -> Any:
    """transformers builds the model inside deepspeed.zero.Init (from_config: each weight is
    drawn, then sharded; from_pretrained: each tensor is loaded into its shards), so no rank
    ever holds the whole model. The build is checked and reported on every rank."""
    from raft_dist.train.deepspeed import (
        built_whole,
        refuse_quantization_under_init,
        report_partitioned_build,
    )

    if quantization is not None:
        refuse_quantization_under_init()
    if cfg.name_or_path == BUILTIN_PREFIX + BUNDLED_PRETRAINED:
        with built_whole():  # its first use converts the GGUF file to a folder, whole, once
            resolve_pretrained(cfg.name_or_path)
    model = _load(cfg, tokenizer, None, None)
    report_partitioned_build(model)
    return model


def _load(cfg: ModelConfig, tokenizer: Any, quantization: Any, device_map: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(cfg.dtype)
    # Passed only when set: transformers then picks its own default (and a model class that
    # lacks the kernel asked for fails here, naming it).
    attention = {}
    if cfg.attn_implementation is not None:
        attention["attn_implementation"] = cfg.attn_implementation
    name = builtin_name(cfg.name_or_path)
    if name is not None:
        arch = dict(TINY_ARCHITECTURES[name])
        model_type = arch.pop("model_type")
        config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **arch,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
        if quantization is None:
            return model
        import tempfile

        from safetensors.torch import save_model

        with tempfile.TemporaryDirectory() as folder:
            # Every rank needs its own copy; save_pretrained writes on rank 0 only.
            model.config.save_pretrained(folder)
            save_model(model, str(Path(folder) / "model.safetensors"))
            return AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                quantization_config=quantization,
                device_map=device_map,
                **attention,
            )
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve_pretrained(cfg.name_or_path),
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            quantization_config=quantization,
            device_map=device_map,
            **attention,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name_or_path: cannot load a causal LM from {cfg.name_or_path!r}: {exc}"
        ) from None
