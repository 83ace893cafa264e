"""The Accelerator of a run, and the live facts the run card and the launch contract use.

Facts come from the live Accelerator and torch.distributed, never from the config: the point is
to catch launches that silently became something else (one process instead of two, DeepSpeed
dropped by a CPU flag, a GPU profile running on the CPU).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from raft_dist.config import Recipe
from raft_dist.cpu import on_cpu
from raft_dist.errors import ConfigError
from raft_dist.train.deepspeed import deepspeed_plugin, using_deepspeed
from raft_dist.train.ops import prepare_op_builds


def make_accelerator(recipe: Recipe, project_dir: str) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if using_deepspeed():
        # DeepSpeed clips by its own config ("auto" is filled from this); Accelerate's
        # clip_grad_norm_ only reports the norm under DeepSpeed.
        clip = recipe.training.max_grad_norm
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(clip) if clip > 0 else "0.0"
        if on_cpu():
            prepare_op_builds(recipe, ["deepspeed_shm_comm"], os.environ.get("RANK", "0") == "0")

    # The recipe's timeout bounds how long a collective waits for a rank that hangs (torch's
    # default is 10-30 minutes); teardown then names the ranks that did not answer.
    group = {"timeout": timedelta(seconds=recipe.training.process_group_timeout_s)}
    if on_cpu() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed and DDP on CPU both need gloo; without it Accelerate and DeepSpeed can
        # disagree about the world size.
        group["backend"] = "gloo"
    handlers = [InitProcessGroupKwargs(**group)]
    trackers: list[str] = []
    if recipe.logging.tensorboard:
        trackers.append("tensorboard")
    if recipe.logging.wandb:
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


@dataclass
class LiveSetup:
    world_size: int
    rank: int
    num_machines: int
    machine_rank: int
    engine: str  # single | ddp | deepspeed
    distributed_type: str
    backend: str | None
    zero_stage: int | None
    mixed_precision: str
    device: str  # str(accelerator.device): "cpu" alone, "cpu:0" under DDP, "cuda:3"

    @property
    def device_type(self) -> str:
        """ "cpu" or "cuda", with no index: compare this, never `device` itself."""
        return self.device.split(":")[0]

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
    plugin = deepspeed_plugin(accelerator)
    machines = int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("GROUP_WORLD_SIZE", 1)))
    return LiveSetup(
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        num_machines=max(1, machines),
        # torchrun's node rank (accelerate passes --machine_rank to it as the node rank).
        machine_rank=int(os.environ.get("GROUP_RANK", 0)),
        engine=engine,
        distributed_type=str(dtype.value if hasattr(dtype, "value") else dtype),
        backend=dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        zero_stage=plugin.zero_stage if plugin is not None else None,
        mixed_precision=str(accelerator.mixed_precision),
        device=str(accelerator.device),
    )


def quantized_device_map(live: LiveSetup) -> Any:
    """bitsandbytes places quantized weights at load time: on this rank's GPU, or nowhere
    special on CPU and under DeepSpeed (which places them itself)."""
    if live.device_type == "cuda" and live.engine != "deepspeed":
        return {"": live.device}
    return None


def check_compile(recipe: Recipe, live: LiveSetup) -> bool:
    """Whether training.compile asks for compilation; refuses what cannot work. Cheap: setup
    calls it before the model loads, so a refused combination costs no model load."""
    if not recipe.training.compile:  # null or false (config.py allows only these, true, dynamic)
        return False
    if live.engine == "deepspeed":
        raise ConfigError(
            "training.compile under DeepSpeed: the DeepSpeed engine wraps the model and hooks its "
            "parameters after the compiled graph was built; use a DDP or single-process profile "
            "with training.compile, or training.compile=false with DeepSpeed"
        )
    return True


def compile_model(model: Any, recipe: Recipe, live: LiveSetup) -> bool:
    """training.compile: compile the model's forward with torch.compile, in place.

    nn.Module.compile() keeps the module itself (torch.compile(model) would wrap it in an
    OptimizedModule whose state_dict keys all start with `_orig_mod.`, so that checkpoints and
    exported models would not load into an eager model). Called after the model is built (and
    wrapped by peft) and before accelerator.prepare: DDP then wraps the compiled module and syncs
    its gradients as usual. DeepSpeed is refused: its engine wraps and hooks the parameters
    (ZeRO-3 gathers them in forward hooks), which a graph compiled beforehand does not see.
    Returns whether the model was compiled.
    """
    if not check_compile(recipe, live):
        return False
    setting = recipe.training.compile
    # true: torch's default (static shapes, made dynamic after the first shape change);
    # "dynamic": dynamic shapes from the start, for variable-length batches.
    model.compile(dynamic=True if setting == "dynamic" else None)
    return True


def compile_description(model: Any, setting: Any) -> str | None:
    """The run card's line: from the live module (is its forward compiled?), None when eager."""
    if getattr(model, "_compiled_call_impl", None) is None:
        return None
    return "torch.compile, " + ("dynamic=True" if setting == "dynamic" else "default shapes")
