"""The optimizer: AdamW from the recipe, or DeepSpeedCPUAdam when DeepSpeed offloads it.

raft-dist owns the optimizer (DeepSpeed configs may not define one), so the same recipe gives
the same update rule under DDP and every ZeRO stage.
"""

from __future__ import annotations

from typing import Any

from raft_dist.config import Recipe


def offloads_optimizer(accelerator: Any) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return False
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return (zero.get("offload_optimizer") or {}).get("device", "none") != "none"


def build_optimizer(accelerator: Any, model: Any, recipe: Recipe) -> Any:
    t = recipe.training
    params = [p for p in model.parameters() if p.requires_grad]
    if offloads_optimizer(accelerator):
        from raft_dist.train.setup import announce_op_compilation

        announce_op_compilation(recipe, ["cpu_adam"], accelerator.is_main_process)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay, adamw_mode=True)
    import torch

    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
