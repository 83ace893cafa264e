"""DeepSpeed settings the loop needs: the plugin, its batch size, model init (compiled ops: ops.py).

Model init under ZeRO-3 has two modes, chosen by the profile's `zero3_init_flag`:

- false (deepspeed_zero3, the default): every rank builds the whole model, as on DDP, and
  DeepSpeed shards it in accelerator.prepare. Peak memory per rank holds one full copy.
- true (deepspeed_zero3_init): transformers builds the model inside deepspeed.zero.Init, so
  each rank allocates only its 1/N share of every weight while it is constructed (random init
  for a model built from a config; from_pretrained of a folder loads each tensor into its
  shards). LoRA adapters are then added whole (they are small) and sharded by prepare; QLoRA
  is refused (bitsandbytes quantizes whole tensors). The run checks after construction that
  every parameter really is partitioned, and each rank prints what it holds
  (report_partitioned_build): a flag that is dropped somewhere stops the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from raft_dist.config import Recipe
from raft_dist.env import env_flag
from raft_dist.errors import ConfigError

# DeepSpeed's default for zero_optimization.stage3_param_persistence_threshold (elements);
# ds_configs/zero3.json writes it out.
DEFAULT_PERSISTENCE_THRESHOLD = 100_000


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


# ---- ZeRO-3 partitioned construction (zero3_init_flag: true) ------------------------------


def zero3_init_active() -> bool:
    """Whether transformers builds models under deepspeed.zero.Init right now: true inside
    model_init_context on a profile with zero3_init_flag: true, false everywhere else."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return bool(is_deepspeed_zero3_enabled())


def persistence_threshold() -> int:
    """stage3_param_persistence_threshold of the live ZeRO-3 config (elements)."""
    from transformers.integrations.deepspeed import deepspeed_config

    zero = (deepspeed_config() or {}).get("zero_optimization", {})
    value = zero.get("stage3_param_persistence_threshold", DEFAULT_PERSISTENCE_THRESHOLD)
    return DEFAULT_PERSISTENCE_THRESHOLD if value == "auto" else int(value)


@contextmanager
def built_whole() -> Iterator[None]:
    """Suspend zero3 init for a helper model that must be whole (e.g. a one-off conversion that
    saves a file); the training model is still built partitioned afterwards."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def refuse_quantization_under_init() -> None:
    """bitsandbytes quantizes whole weight tensors while the model loads; under zero.Init no
    rank has them. Refuse, naming both settings."""
    if zero3_init_active():
        raise ConfigError(
            "quantization.mode (QLoRA) with zero3_init_flag: true (profile "
            "deepspeed_zero3_init): a quantized base cannot be built partitioned; use "
            "--profile deepspeed_zero3 (built whole, then sharded) or quantization.mode=none"
        )


@dataclass(frozen=True)
class PartitionReport:
    """What one rank holds of a model built under deepspeed.zero.Init."""

    parameters: int  # parameter tensors
    elements: int  # elements of the whole model
    local_elements: int  # elements this rank holds (its shards, plus anything whole)
    whole: tuple[str, ...]  # parameters zero.Init did not partition (should be empty)
    persistent: int  # parameters <= threshold: built sharded, then whole on every rank in training
    persistent_elements: int
    threshold: int
    rank: int
    world_size: int

    @property
    def local_share(self) -> float:
        return self.local_elements / max(1, self.elements)

    def line(self) -> str:
        return (
            f"zero3 init: rank {self.rank}/{self.world_size} built the model partitioned, holds "
            f"{self.local_elements} of {self.elements} parameter elements "
            f"({self.local_share:.1%}) in {self.parameters} parameters; "
            f"{self.persistent} parameters ({self.persistent_elements} elements) are at most "
            f"stage3_param_persistence_threshold={self.threshold} elements: DeepSpeed holds them "
            "whole on every rank once training starts"
        )


def partition_report(model: Any) -> PartitionReport:
    import torch.distributed as dist

    threshold = persistence_threshold()
    count = elements = local = persistent = persistent_elements = 0
    whole: list[str] = []
    for name, param in model.named_parameters():
        count += 1
        if not hasattr(param, "ds_id"):
            whole.append(name)
            elements += param.numel()
            local += param.numel()
            continue
        elements += param.ds_numel
        # A partitioned parameter's own data is an empty placeholder; its shard is ds_tensor.
        local += param.ds_tensor.numel() + param.data.numel()
        # DeepSpeed marks these persistent when the engine starts (mark_persistent_parameters).
        if param.ds_numel <= threshold:
            persistent += 1
            persistent_elements += param.ds_numel
    ready = dist.is_available() and dist.is_initialized()
    return PartitionReport(
        parameters=count,
        elements=elements,
        local_elements=local,
        whole=tuple(whole),
        persistent=persistent,
        persistent_elements=persistent_elements,
        threshold=threshold,
        rank=dist.get_rank() if ready else 0,
        world_size=dist.get_world_size() if ready else 1,
    )


def report_partitioned_build(model: Any) -> PartitionReport:
    """After construction under zero3 init: refuse a model that was built whole (the flag was
    dropped somewhere), then print, on every rank, what the rank holds."""
    report = partition_report(model)
    if report.whole:
        shown = ", ".join(report.whole[:3]) + (" ..." if len(report.whole) > 3 else "")
        raise RuntimeError(
            f"zero3_init_flag is true but {len(report.whole)} of {report.parameters} parameters "
            f"were built whole on rank {report.rank} ({shown}): the model was not constructed "
            "under deepspeed.zero.Init"
        )
    print(report.line(), flush=True)
    return report
