"""Evaluation: the token loss shared with training, and the held-out loss of a run."""

from __future__ import annotations

import math
from typing import Any

from raft_dist.data.batching import block_causal_mask
from raft_dist.data.tokenize import IGNORE_INDEX
from raft_dist.distributed import sum_over_ranks


def token_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed next-token cross entropy over target tokens, in fp32, and their count.

    A sum, not a mean: the caller divides by the target tokens of the whole accumulation window
    across ranks, so every token weighs the same whatever batch it fell into.
    """
    import torch
    import torch.nn.functional as F

    if "sequence_ids" in batch:  # packed rows: examples apart (data/batching.py)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=block_causal_mask(batch["sequence_ids"]),
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum().to(torch.float64)


def target_count(batch: dict[str, Any]) -> float:
    """Tokens the loss is computed on: labels shifted by one, as in token_loss_sum."""
    return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate_loss(
    accelerator: Any, model: Any, stream: Any, pad: dict, max_batches: int | None
) -> dict[str, float]:
    """Token-weighted loss over the held-out split; ranks step in lockstep until all are done
    (a rank whose part ended feeds a zero-weight padding batch, so no collective hangs)."""
    import torch

    model.eval()
    stream.start_epoch(0)
    loss_sum, tokens, batches = 0.0, 0.0, 0
    with torch.no_grad():
        while max_batches is None or batches < max_batches:
            batch = stream.next_batch()
            (any_left,) = sum_over_ranks(accelerator, [1.0 if batch is not None else 0.0])
            if any_left == 0:
                break
            feed = {k: v.to(accelerator.device) for k, v in (batch or pad).items()}
            loss, count = token_loss_sum(model, feed)
            if batch is not None:
                loss_sum += float(loss)
                tokens += float(count)
            batches += 1
    model.train()
    total_loss, total_tokens = sum_over_ranks(accelerator, [loss_sum, tokens])
    mean = total_loss / max(total_tokens, 1.0)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens}
