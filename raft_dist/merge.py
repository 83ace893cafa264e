"""Fold a LoRA adapter into its base model, producing a plain transformers model.

The base is always reloaded in full precision: merging into 4-bit weights would round the
merged weights back to 4 bits and lose most of what the adapter learned.
"""

from __future__ import annotations

import json
from pathlib import Path

from raft_dist.atomic import swap_in_dir, temp_dir_for
from raft_dist.errors import ConfigError
from raft_dist.model import builtin_name, resolve_pretrained, torch_dtype


def _refuse_quantized(base: str) -> None:
    config_file = Path(base) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("quantization_config"):
            raise ConfigError(
                f"--base {base} is a quantized model; merging into quantized weights is lossy. "
                "Pass the full-precision base the adapter was trained on (QLoRA trains on a "
                "quantized copy of it)."
            )


def merge_adapter(
    base: str, adapter: str, out: str, dtype: str = "float32", *, overwrite: bool = False
) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")

    if builtin_name(base) is not None:
        raise ConfigError(
            f"--base {base}: a built-in random model has no saved weights to merge into; train "
            "from a saved model folder instead"
        )
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json (not a PEFT adapter)")
    base_path = resolve_pretrained(base)
    _refuse_quantized(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(dtype))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tmp = temp_dir_for(target)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer_source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base_path
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
    swap_in_dir(tmp, target)
    return target
