"""The training loop: setup, prepare, loop, checkpoint, finish. Read it top to bottom.

Loss normalization: every optimizer step is a window of exactly `gradient_accumulation_steps`
micro-batches on every rank. Before the window runs, the ranks exchange how many target tokens
they hold, and each micro-batch's summed token loss is divided by that global count. The
gradient then equals the one of a single big batch, whatever the lengths and however the
examples fall on ranks. A rank whose data ran out runs zero-weight padding batches, so all ranks
run the same collectives and agree on when an epoch ends: nothing is dropped or duplicated.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from raft_dist.config import Recipe
from raft_dist.errors import DataError

WINDOW_STATS = ("target_tokens", "real_batches")


def token_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed next-token cross entropy over target tokens, in fp32, and their count."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, (targets != -100).sum().to(torch.float64)


def target_count(batch: dict[str, Any]) -> float:
    """Tokens the loss is computed on: labels shifted by one, as in token_loss_sum."""
    return float((batch["labels"][:, 1:] != -100).sum())


def estimate_total_steps(recipe: Recipe, total_records: int, world_size: int) -> int:
    """Without max_steps: the longest rank's batches per epoch, in optimizer steps."""
    t = recipe.training
    if t.max_steps is not None:
        return t.max_steps
    longest_rank = math.ceil(total_records / world_size)
    batches = math.ceil(longest_rank / t.micro_batch_size)
    return max(1, math.ceil(batches / t.gradient_accumulation_steps) * t.epochs)


def train(recipe: Recipe) -> dict[str, Any]:
    import torch
    from accelerate.utils import gather_object, set_seed

    from raft_dist.adapters import build_training_model, check_combination
    from raft_dist.data.streaming import build_streams, padding_batch
    from raft_dist.model import load_tokenizer
    from raft_dist.train.checkpoint import (
        load_checkpoint,
        register_adapter_checkpointing,
        resolve_resume,
        save_checkpoint,
    )
    from raft_dist.train.metrics import MetricsLog, configure_logging
    from raft_dist.train.optim import build_optimizer
    from raft_dist.train.runcard import render_run_card
    from raft_dist.train.schedule import build_scheduler
    from raft_dist.train.setup import (
        check_expectations,
        fill_deepspeed_batch,
        live_setup,
        make_accelerator,
        model_init_context,
        quantized_device_map,
        setup_warnings,
    )

    # ---- setup ---------------------------------------------------------------------------
    t, d = recipe.training, recipe.data
    run_dir = Path(recipe.output.dir)
    checkpoint_root = run_dir / "checkpoints"
    accelerator = make_accelerator(recipe, project_dir=str(run_dir))
    log = configure_logging(recipe.logging.level, accelerator.is_main_process)
    live = live_setup(accelerator)
    check_expectations(live)
    for warning in setup_warnings(live) if accelerator.is_main_process else []:
        log.warning(warning)
    resume_from = resolve_resume(t.resume, checkpoint_root)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    accelerator.wait_for_everyone()
    _write_rank_facts(run_dir, live)

    set_seed(t.seed)
    tokenizer = load_tokenizer(recipe.model)
    check_combination(recipe, live.zero_stage)
    with model_init_context(accelerator):
        model = build_training_model(recipe, tokenizer, device_map=quantized_device_map(live))
    if recipe.lora.enabled:
        register_adapter_checkpointing(accelerator)

    seen_ids: list[str] | None = [] if d.record_audit else None
    train_stream, eval_stream = build_streams(recipe, tokenizer, rank, world, seen_ids)
    streams: dict[str, Any] = {"train": train_stream}
    for stream in (train_stream, eval_stream):
        if stream is not None:
            errors = [e for e in gather_object([stream.first_error()]) if e]
            if errors:
                raise DataError.relayed(errors[0])
    total_steps = estimate_total_steps(recipe, train_stream.total, world)

    # ---- prepare -------------------------------------------------------------------------
    optimizer = build_optimizer(accelerator, model, recipe)
    scheduler = build_scheduler(optimizer, t, total_steps)
    fill_deepspeed_batch(accelerator, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "epoch_steps": 0, "target_tokens": 0.0, "input_tokens": 0.0, "evals": []}
    if resume_from is not None:
        state.update(load_checkpoint(accelerator, resume_from, streams, recipe.lora.enabled))
        log.info("resumed from %s at step %d", resume_from, state["step"])
    shards_per_rank = gather_object([train_stream.shard_count])
    if accelerator.is_main_process:
        print(
            render_run_card(
                recipe,
                live,
                model=accelerator.unwrap_model(model),
                shards_per_rank=list(shards_per_rank),
                records=train_stream.total,
                total_steps=total_steps,
                resume_from=resume_from,
                start_step=state["step"],
            ),
            flush=True,
        )
    if recipe.logging.tensorboard or recipe.logging.wandb:
        accelerator.init_trackers("raft-dist", config=_flat_config(recipe))
    metrics = MetricsLog(
        accelerator, run_dir, total_steps, state["step"], recipe.logging.progress_bar
    )

    # ---- loop ----------------------------------------------------------------------------
    accum = t.gradient_accumulation_steps
    pad = padding_batch(tokenizer)
    if eval_stream is not None and t.eval_at_start and state["step"] == 0:
        _record_eval(
            state, 0, evaluate(accelerator, model, eval_stream, pad, t.eval_batches), metrics
        )
    steps_this_run = 0
    model.train()
    while state["step"] < total_steps:
        started = time.perf_counter()
        window = [train_stream.next_batch() for _ in range(accum)]
        local = [
            sum(target_count(b) for b in window if b is not None),
            sum(1.0 for b in window if b is not None),
        ]
        global_tokens, global_batches = _gather_sums(accelerator, local)
        if global_batches == 0:  # every rank finished its range: the epoch is over
            if state["epoch_steps"] == 0:
                raise DataError(d.train, None, "no example left to train on (all dropped?)")
            epoch = train_stream.state.epoch + 1
            if t.max_steps is None and epoch >= t.epochs:
                break
            train_stream.start_epoch(epoch)
            state["epoch_steps"] = 0
            continue

        loss_sum = torch.zeros((), dtype=torch.float64)
        input_tokens, grad_norm, step_lr = 0.0, None, float("nan")
        for batch in window:
            real = batch is not None
            batch = {k: v.to(accelerator.device) for k, v in (batch if real else pad).items()}
            with accelerator.accumulate(model):
                micro_loss, _ = token_loss_sum(model, batch)
                scale = accum * world / max(global_tokens, 1.0)
                accelerator.backward(micro_loss * scale)
                loss_sum += micro_loss.detach().double().cpu()
                input_tokens += float(batch["attention_mask"].sum()) if real else 0.0
                if accelerator.sync_gradients:
                    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    step_lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

        window_loss, window_inputs = _gather_sums(accelerator, [float(loss_sum), input_tokens])
        state["step"] += 1
        state["target_tokens"] += global_tokens
        state["input_tokens"] += window_inputs
        steps_this_run += 1
        state["epoch_steps"] += 1  # in the checkpoint: a resume may land on an epoch's end
        step = state["step"]
        elapsed = time.perf_counter() - started
        if step % t.log_every == 0 or step == total_steps:
            metrics.log(
                step,
                {
                    "loss": window_loss / max(global_tokens, 1.0),
                    "lr": step_lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "target_tokens": global_tokens,
                    "tokens_per_s": window_inputs / max(elapsed, 1e-9),
                    "epoch": train_stream.state.epoch,
                },
            )
        metrics.advance()

        if eval_stream is not None and t.eval_every and step % t.eval_every == 0:
            _record_eval(
                state, step, evaluate(accelerator, model, eval_stream, pad, t.eval_batches), metrics
            )
        stopping = t.stop_after_steps is not None and steps_this_run >= t.stop_after_steps
        if (t.save_every and step % t.save_every == 0) or stopping:
            path = save_checkpoint(
                accelerator, checkpoint_root, step, streams, state, t.keep_last, recipe.lora.enabled
            )
            log.info("checkpoint %s", path)
        if stopping and step < total_steps:
            log.info("stopping after %d steps as asked (training.stop_after_steps)", steps_this_run)
            metrics.close()
            _write_audit(run_dir, rank, seen_ids)
            finish(accelerator)
            return {"steps": step, "stopped_early": True}

    # ---- finish --------------------------------------------------------------------------
    metrics.close()
    already_evaluated = bool(state["evals"]) and state["evals"][-1]["step"] == state["step"]
    if eval_stream is not None and not already_evaluated:
        _record_eval(
            state,
            state["step"],
            evaluate(accelerator, model, eval_stream, pad, t.eval_batches),
            metrics,
        )
    final_dir = run_dir / "final"
    if recipe.output.save_final_model:
        save_final_model(accelerator, model, tokenizer, final_dir)
    summary = _summarize(accelerator, recipe, state, streams, final_dir)
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        print(_summary_text(summary, run_dir), flush=True)
    _write_audit(run_dir, rank, seen_ids)
    _write_rank_peak_memory(run_dir, rank)
    finish(accelerator)
    return summary


# ---- helpers used by the loop -------------------------------------------------------------


def _gather_sums(accelerator: Any, values: list[float]) -> list[float]:
    """Sum small per-rank statistics over all ranks (one collective)."""
    import torch

    local = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    return accelerator.gather(local).sum(dim=0).tolist()


def evaluate(accelerator: Any, model: Any, stream: Any, pad: dict, max_batches: int | None) -> dict:
    """Token-weighted loss over the held-out split; ranks step in lockstep until all are done."""
    import torch

    model.eval()
    stream.start_epoch(0)
    loss_sum, tokens, batches = 0.0, 0.0, 0
    with torch.no_grad():
        while max_batches is None or batches < max_batches:
            batch = stream.next_batch()
            (any_left,) = _gather_sums(accelerator, [1.0 if batch is not None else 0.0])
            if any_left == 0:
                break
            feed = {k: v.to(accelerator.device) for k, v in (batch or pad).items()}
            loss, count = token_loss_sum(model, feed)
            if batch is not None:
                loss_sum += float(loss)
                tokens += float(count)
            batches += 1
    model.train()
    total_loss, total_tokens = _gather_sums(accelerator, [loss_sum, tokens])
    mean = total_loss / max(total_tokens, 1.0)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens}


def _record_eval(state: dict, step: int, result: dict, metrics: Any) -> None:
    state["evals"].append({"step": step, **result})
    metrics.log(step, result)


def save_final_model(accelerator: Any, model: Any, tokenizer: Any, final_dir: Path) -> None:
    """Every rank takes part in gathering the weights (ZeRO-3 deadlocks otherwise)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(
            tmp, state_dict=state_dict, safe_serialization=True
        )
        tokenizer.save_pretrained(tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        tmp.rename(final_dir)
    accelerator.wait_for_everyone()


def _summarize(
    accelerator: Any, recipe: Recipe, state: dict, streams: dict, final_dir: Path
) -> dict:
    stream = streams["train"]
    counts = [*stream.lengths.as_dict().values(), float(stream.skipped)]
    examples, truncated, dropped, skipped = _gather_sums(accelerator, counts)
    return {
        "steps": state["step"],
        "epochs_started": stream.state.epoch + 1,
        "target_tokens": state["target_tokens"],
        "input_tokens": state["input_tokens"],
        "examples_tokenized": int(examples),
        "truncated": int(truncated),
        "dropped_overlong": int(dropped),
        "skipped_invalid": int(skipped),
        "evals": state["evals"],
        "model_dir": str(final_dir) if recipe.output.save_final_model else None,
    }


def _summary_text(summary: dict, run_dir: Path) -> str:
    lines = [f"done: {summary['steps']} optimizer steps"]
    evals = summary["evals"]
    if evals:
        trail = " -> ".join(f"{e['eval_loss']:.4f} (step {e['step']})" for e in evals)
        lines.append(f"  eval loss      {trail}")
    lines.append(
        f"  examples       {summary['examples_tokenized']} tokenized, "
        f"{summary['truncated']} truncated, {summary['dropped_overlong']} dropped as "
        f"overlong, {summary['skipped_invalid']} skipped as invalid"
    )
    if summary["model_dir"]:
        lines.append(f"  model          {summary['model_dir']}")
    lines.append(f"  metrics        {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir})")
    return "\n".join(lines)


def finish(accelerator: Any) -> None:
    """Close trackers and the process group before exit: a group left for interpreter
    teardown can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def _write_audit(run_dir: Path, rank: int, seen_ids: list[str] | None) -> None:
    if seen_ids is None:
        return
    audit = run_dir / "audit"
    audit.mkdir(exist_ok=True)
    with (audit / f"seen_ids_rank{rank}.txt").open("a", encoding="utf-8") as handle:
        handle.writelines(f"{i}\n" for i in seen_ids)


def _write_rank_peak_memory(run_dir: Path, rank: int) -> None:
    """Peak resident memory of this rank (Linux ru_maxrss is in KiB), for memory benchmarks."""
    import resource

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (run_dir / "ranks" / f"rank{rank}_peak.json").write_text(
        json.dumps({"rank": rank, "peak_rss_mib": round(peak_mib, 1)}), encoding="utf-8"
    )


def _write_rank_facts(run_dir: Path, live: Any) -> None:
    """Each rank records what it really is, for audits and for the distributed tests."""
    ranks = run_dir / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank{live.rank}.json").write_text(json.dumps(live.as_dict()), encoding="utf-8")


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    flat = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat
