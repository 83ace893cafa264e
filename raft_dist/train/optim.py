"""The optimizer: AdamW from the recipe, or DeepSpeedCPUAdam when DeepSpeed offloads it.

raft-dist owns the optimizer (DeepSpeed configs may not define one), so the same recipe gives
the same update rule under DDP and every ZeRO stage.
"""

from __future__ import annotations

from typing import Any

from raft_dist.config import Recipe
from raft_dist.train.deepspeed import offloads_optimizer
from raft_dist.train.ops import prepare_op_builds


def build_optimizer(accelerator: Any, model: Any, recipe: Recipe) -> Any:
    t = recipe.training
    params = [p for p in model.parameters() if p.requires_grad]
    if offloads_optimizer(accelerator):
        prepare_op_builds(recipe, ["cpu_adam"], accelerator.is_main_process)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay, adamw_mode=True)
    import torch

    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
