"""DeepSpeed settings the loop needs: the plugin, its batch size, op compilation, model init."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raft_dist.config import Recipe
from raft_dist.env import env_flag


def deepspeed_plugin(accelerator: Any) -> Any | None:
    """The live DeepSpeed plugin, or None when the run is not under DeepSpeed."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def using_deepspeed() -> bool:
    """Before the Accelerator exists: whether accelerate launch asked for DeepSpeed."""
    return env_flag("ACCELERATE_USE_DEEPSPEED")


def offloads_optimizer(accelerator: Any) -> bool:
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return False
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return (zero.get("offload_optimizer") or {}).get("device", "none") != "none"


def ops_cache_dir(recipe: Recipe) -> Path:
    if recipe.training.ops_cache_dir:
        os.environ["TORCH_EXTENSIONS_DIR"] = recipe.training.ops_cache_dir
    default = Path.home() / ".cache" / "torch_extensions"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", default))


def announce_op_compilation(recipe: Recipe, ops: list[str], is_main: bool) -> None:
    """DeepSpeed compiles CPU ops silently on first use (~1 min each on 2 cores): say so."""
    cache = ops_cache_dir(recipe)
    missing = [op for op in ops if not any(cache.glob(f"*/{op}/*.so"))]
    if missing and is_main:
        print(
            f"DeepSpeed compiles {', '.join(missing)} on first use (about a minute each on 2 "
            f"cores); later runs reuse the cache in {cache} (training.ops_cache_dir or "
            "TORCH_EXTENSIONS_DIR).",
            flush=True,
        )


def fill_deepspeed_batch(accelerator: Any, recipe: Recipe) -> None:
    """DeepSpeed fills "auto" batch sizes from a prepared DataLoader; raft-dist streams its own
    batches, so it states the micro batch itself."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.training.micro_batch_size


@contextmanager
def model_init_context(accelerator: Any) -> Iterator[None]:
    """Build the model outside deepspeed.zero.Init unless the profile asks for it.

    Accelerate registers the ZeRO-3 config with transformers even when zero3_init_flag is false,
    and transformers then builds random weights partition by partition, which draws different
    random numbers than DDP would. With the flag off the model is built whole, as on DDP; with
    it on, large models load partitioned (pretrained weights are the same either way).
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None or plugin.is_zero3_init_enabled():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()
