"""Accelerator construction and the live-setup facts the run card and the guards are built from.

Facts come from the live Accelerator and torch.distributed, never from the config: the point is
to catch launches that silently became something else (one process instead of two, DeepSpeed
dropped by a CPU flag).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raft_dist.config import Recipe
from raft_dist.errors import ConfigError

# Set by `raft-dist launch` from the profile it launched; checked by every rank at start.
EXPECT_WORLD_SIZE = "RAFT_DIST_EXPECT_WORLD_SIZE"
EXPECT_ENGINE = "RAFT_DIST_EXPECT_ENGINE"
EXPECT_ZERO_STAGE = "RAFT_DIST_EXPECT_ZERO_STAGE"


def on_cpu() -> bool:
    import torch

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or not torch.cuda.is_available()


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


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


def make_accelerator(recipe: Recipe, project_dir: str) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if using_deepspeed():
        # DeepSpeed clips by its own config ("auto" is filled from this); Accelerate's
        # clip_grad_norm_ only reports the norm under DeepSpeed.
        clip = recipe.training.max_grad_norm
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(clip) if clip > 0 else "0.0"
        if on_cpu():
            announce_op_compilation(
                recipe, ["deepspeed_shm_comm"], os.environ.get("RANK", "0") == "0"
            )

    handlers = []
    if on_cpu() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed and DDP on CPU both need gloo; without it Accelerate and DeepSpeed can
        # disagree about the world size.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    trackers: list[str] = []
    if recipe.logging.tensorboard:
        trackers.append("tensorboard")
    if recipe.logging.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb=true needs wandb: pip install 'raft-dist[wandb]'")
        os.environ.setdefault("WANDB_MODE", "offline")
        trackers.append("wandb")
    mixed = recipe.training.mixed_precision
    return Accelerator(
        gradient_accumulation_steps=recipe.training.gradient_accumulation_steps,
        mixed_precision=None if mixed == "auto" else mixed,
        log_with=trackers or None,
        project_dir=project_dir,
        kwargs_handlers=handlers,
    )


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 autocast is emulated and ~10x slower."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return True  # not Linux: do not guess
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup_warnings(live: LiveSetup) -> list[str]:
    warnings = []
    if (
        live.device.startswith("cpu")
        and live.mixed_precision == "bf16"
        and not cpu_has_native_bf16()
    ):
        warnings.append(
            "mixed precision bf16 on a CPU without AVX512-BF16/AMX is emulated and runs about "
            "10x slower than fp32 here; consider training.mixed_precision=no"
        )
    return warnings


def fill_deepspeed_batch(accelerator: Any, recipe: Recipe) -> None:
    """DeepSpeed fills "auto" batch sizes from a prepared DataLoader; raft-dist streams its own
    batches, so it states the micro batch itself."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
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
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.is_zero3_init_enabled():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def quantized_device_map(live: LiveSetup) -> Any:
    """bitsandbytes places quantized weights at load time: on this rank's GPU, or nowhere
    special on CPU and under DeepSpeed (which places them itself)."""
    if live.device.startswith("cuda") and live.engine != "deepspeed":
        return {"": live.device}
    return None


@dataclass
class LiveSetup:
    world_size: int
    rank: int
    num_machines: int
    engine: str  # single | ddp | deepspeed
    distributed_type: str
    backend: str | None
    zero_stage: int | None
    mixed_precision: str
    device: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_setup(accelerator: Any) -> LiveSetup:
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    dtype = accelerator.distributed_type
    if dtype == DistributedType.DEEPSPEED:
        engine = "deepspeed"
    elif accelerator.num_processes > 1:
        engine = "ddp"
    else:
        engine = "single"
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    machines = int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("GROUP_WORLD_SIZE", 1)))
    return LiveSetup(
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        num_machines=max(1, machines),
        engine=engine,
        distributed_type=str(dtype.value if hasattr(dtype, "value") else dtype),
        backend=dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        zero_stage=plugin.zero_stage if plugin is not None else None,
        mixed_precision=str(accelerator.mixed_precision),
        device=str(accelerator.device),
    )


def check_expectations(live: LiveSetup) -> None:
    """Refuse to train when the launch asked for something the processes did not get."""
    problems = []
    want_world = os.environ.get(EXPECT_WORLD_SIZE)
    if want_world and int(want_world) != live.world_size:
        problems.append(f"world size {live.world_size}, but the launch asked for {want_world}")
    want_engine = os.environ.get(EXPECT_ENGINE)
    if want_engine and want_engine != live.engine:
        problems.append(f"engine {live.engine}, but the launch asked for {want_engine}")
    want_stage = os.environ.get(EXPECT_ZERO_STAGE)
    if want_stage and str(live.zero_stage) != want_stage:
        problems.append(f"ZeRO stage {live.zero_stage}, but the launch asked for {want_stage}")
    if problems:
        raise ConfigError(
            "the live setup contradicts the launch: "
            + "; ".join(problems)
            + ". Check the accelerate config (DESIGN pitfalls: use_cpu/--cpu with a DeepSpeed "
            "profile drops DeepSpeed; a MULTI_CPU profile without mpirun runs one process)."
        )
