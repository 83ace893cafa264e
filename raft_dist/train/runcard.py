"""The run card: what is really running, printed by the main process before the first step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raft_dist.config import Recipe
from raft_dist.train.accelerator import LiveSetup, compile_description


def render_run_card(
    recipe: Recipe,
    live: LiveSetup,
    *,
    model: Any,
    shards_per_rank: list[int],
    records: int,
    data_source: str,
    total_steps: int,
    resume_from: Path | None,
    start_step: int,
) -> str:
    t = recipe.training
    effective = t.micro_batch_size * t.gradient_accumulation_steps * live.world_size
    # Under ZeRO-3 a rank's parameters are empty placeholders: ds_numel is the whole size.
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(
        getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad
    )
    engine = live.engine + (f" (ZeRO-{live.zero_stage})" if live.zero_stage is not None else "")
    rows = [
        ("world size", f"{live.world_size} process(es) on {live.num_machines} machine(s)"),
        ("engine", f"{engine}, backend {live.backend or 'none'}, device {live.device}"),
        ("precision", f"weights {recipe.model.dtype}, mixed precision {live.mixed_precision}"),
        ("quantization", recipe.quantization.mode),
        ("LoRA", f"r={recipe.lora.r}" if recipe.lora.enabled else "off"),
        *(
            [("compile", compiled)]
            if (compiled := compile_description(model, t.compile)) is not None
            else []
        ),
        ("model", f"{recipe.model.name_or_path}: {params:,} params, {trainable:,} trainable"),
        *(
            [("remote code", "ON: model.trust_remote_code runs the model repository's Python")]
            if recipe.model.trust_remote_code
            else []
        ),
        ("weights", f"{_footprint_mib(model):,.1f} MiB in memory (get_memory_footprint)"),
        (
            "batch",
            f"micro {t.micro_batch_size} x accumulation {t.gradient_accumulation_steps} x world "
            f"{live.world_size} = {effective} examples per optimizer step",
        ),
        (
            "tokens/step",
            f"up to {effective * recipe.data.max_seq_len:,} "
            f"(max_seq_len {recipe.data.max_seq_len})",
        ),
        ("rows", _row_layout(recipe.data, model)),
        (
            "data",
            f"{records:,} train records; shards per rank {shards_per_rank} (this epoch); "
            + ("checked by the launcher" if data_source == "stamp" else "checked at start"),
        ),
        (
            "schedule",
            f"{total_steps} optimizer steps, {t.lr_schedule} lr {t.lr:g}, warmup {t.warmup_steps}",
        ),
        ("resume", f"{resume_from} (step {start_step})" if resume_from else "fresh start"),
        ("output", recipe.output.dir),
    ]
    width = max(len(k) for k, _ in rows)
    lines = (
        ["=" * 72, "raft-dist run card"] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["=" * 72]
    )
    return "\n".join(lines)


def _footprint_mib(model: Any) -> float:
    footprint = getattr(model, "get_memory_footprint", None)
    if footprint is None:  # a peft wrapper: ask the base model
        footprint = model.get_base_model().get_memory_footprint
    return footprint() / 2**20


def _row_layout(data: Any, model: Any) -> str:
    """How examples become rows: what decides how much of each step is padding."""
    from raft_dist.evaluate import unwrapped
    from raft_dist.packed_attention import PER_EXAMPLE

    if data.format == "text":
        return f"plain text in full rows of {data.max_seq_len} tokens"
    if data.packing:
        config = getattr(unwrapped(model), "config", None)
        attention = getattr(config, "_attn_implementation", None)
        if attention == PER_EXAMPLE:
            return "packed: whole examples per row, attention per example (SDPA on its span)"
        return "packed: whole examples per row, block-diagonal attention mask"
    if data.group_by_length:
        return (
            f"one example per row, grouped by length in windows of {data.group_by_length} batches"
        )
    return "one example per row, padded to the longest in its batch"
