"""The training run: setup -> fit -> finish. Read it top to bottom.

Loss normalization: every optimizer step is a window of exactly `gradient_accumulation_steps`
micro-batches on every rank. Before the window runs, the ranks exchange how many target tokens
they hold, and each micro-batch's summed token loss is divided by that global count. The
gradient then equals the one of a single big batch, whatever the lengths and however the
examples fall on ranks. A rank whose data ran out runs zero-weight padding batches, so all ranks
run the same collectives and agree on when an epoch ends: nothing is dropped or duplicated.

Exit: `fit` returns None when the schedule is done, or a `Stop` when the run ends early after
saving a checkpoint: `training.stop_after_steps`, or a stop request (SIGTERM, SIGINT, SIGUSR1
or the run folder's request file; train/stopping.py) that all ranks learn at the same step.
`finish` is the one exit path for both: a full run evaluates and saves `final/`; a stopped run
does neither; both write summary.json (a stopped one with "stopped": {"reason", "step", ...})
and the per-rank files, and exit 0. A stop request also leaves the marker stopped.json, which
`raft-dist launch` turns into its exit code 75 ("stopped, checkpoint saved: requeue me").
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raft_dist.atomic import write_json_atomic
from raft_dist.config import Recipe
from raft_dist.distributed import (
    HangWatch,
    decided_on_rank0,
    is_collective_timeout,
    sum_over_ranks,
)
from raft_dist.errors import ConfigError, DataError, HungRankError, NonFiniteError, SaveError
from raft_dist.rundir import RunDir
from raft_dist.train.state import Stop, TrainState
from raft_dist.train.stopping import StopRequests


def estimate_total_steps(recipe: Recipe, total_records: int, world_size: int) -> int:
    """Without max_steps: the longest rank's batches per epoch, in optimizer steps."""
    t = recipe.training
    if t.max_steps is not None:
        return t.max_steps
    longest_rank = math.ceil(total_records / world_size)
    batches = math.ceil(longest_rank / t.micro_batch_size)
    return max(1, math.ceil(batches / t.gradient_accumulation_steps) * t.epochs)


@dataclass
class Run:
    """Everything setup builds and fit/finish use; `state` is what a checkpoint holds."""

    recipe: Recipe
    paths: RunDir
    accelerator: Any
    log: Any
    tokenizer: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_stream: Any
    eval_stream: Any
    metrics: Any
    total_steps: int
    pad: dict
    stops: StopRequests
    state: TrainState = field(default_factory=TrainState)
    seen_ids: list[str] | None = None  # record ids read since the last audit flush
    audit_lines: int | None = None  # lines in this rank's audit file after that flush
    hang_watch: HangWatch | None = None


def train(recipe: Recipe) -> dict[str, Any]:
    # First of all, so that a preemption during the (slow) setup is not lost.
    stops = StopRequests().install()
    watch = None
    try:
        run = setup(recipe, stops)
        watch = run.hang_watch
        stop = fit(run)
        return finish(run, stop)
    except RuntimeError as exc:
        if watch is None or not is_collective_timeout(exc):
            raise
        # A rank hung instead of dying: say which, instead of torch's bare timeout.
        who = watch.unresponsive() or "another rank stopped answering"
        raise HungRankError(
            f"a collective waited longer than training.process_group_timeout_s="
            f"{recipe.training.process_group_timeout_s} s: {who}. The last checkpoint is "
            "intact; resume with training.resume=latest."
        ) from None
    finally:
        stops.restore()


# ---- setup -------------------------------------------------------------------------------


def setup(recipe: Recipe, stops: StopRequests) -> Run:
    from accelerate.utils import gather_object, set_seed

    from raft_dist.adapters import build_training_model, check_combination
    from raft_dist.contract import Contract
    from raft_dist.cpu import cpu_warnings
    from raft_dist.data.check import checked_data_for_run
    from raft_dist.data.streaming import build_streams, padding_batch
    from raft_dist.model import load_tokenizer
    from raft_dist.packed_attention import (
        check_packing,
        use_per_example_attention,
        verify_packing,
    )
    from raft_dist.train.accelerator import (
        check_compile,
        compile_model,
        live_setup,
        make_accelerator,
        quantized_device_map,
    )
    from raft_dist.train.checkpoint import load_checkpoint, register_adapter_checkpointing
    from raft_dist.train.deepspeed import fill_deepspeed_batch, model_init_context
    from raft_dist.train.metrics import MetricsLog, configure_logging
    from raft_dist.train.optim import build_optimizer
    from raft_dist.train.resume import trim_audit
    from raft_dist.train.runcard import render_run_card
    from raft_dist.train.schedule import build_scheduler

    t, d = recipe.training, recipe.data
    paths = RunDir(Path(recipe.output.dir))
    # The Accelerator comes first: it starts the process group every later step talks over.
    accelerator = make_accelerator(recipe, project_dir=str(paths.root))
    log = configure_logging(recipe.logging.level, accelerator.is_main_process)
    live = live_setup(accelerator)
    # Refuse a launch that became something else before anything expensive happens.
    Contract.from_env().check(live)
    if t.nonfinite == "skip" and live.engine == "deepspeed":
        raise ConfigError(
            "training.nonfinite=skip under DeepSpeed: its optimizer step runs inside backward, "
            "before a non-finite gradient can be seen; use training.nonfinite=stop"
        )
    check_compile(recipe, live)  # refused before anything loads (applied after the model)
    for warning in cpu_warnings(live) if accelerator.is_main_process else []:
        log.warning(warning)
    rank, world = accelerator.process_index, accelerator.num_processes
    # Before anything is written to the folder: lock it, pick the checkpoint (checked, with
    # fallback) and drop what a killed attempt logged after it. Rank 0 decides for all.
    resume_from = decided_on_rank0(lambda: _claim_run_folder(recipe, paths, world, log))
    if accelerator.is_main_process:
        stops.watch(paths.stop_request)
    _write_rank_facts(paths, live)
    _check_shared_run_dir(accelerator, paths)

    # Data before the model: a bad shard stops every rank in seconds, not after a model load.
    data = checked_data_for_run(accelerator, d, paths.data_stamp)

    set_seed(t.seed)
    tokenizer = load_tokenizer(recipe.model)
    check_combination(recipe, live.zero_stage)
    with model_init_context(accelerator):
        model = build_training_model(recipe, tokenizer, device_map=quantized_device_map(live))
    if recipe.lora.enabled:
        register_adapter_checkpointing(accelerator)
    # training.compile: the forward compiled in place, before prepare wraps the model (DDP) and
    # without a wrapper module, so checkpoints and exports keep their plain parameter names.
    compiled = compile_model(model, recipe, live)
    # Packed rows on the CPU: attention on each example's own span, not a row-wide block mask
    # that costs the whole row's L x L (packed_attention.py); not under compile, where every
    # batch's spans would be a new graph. Before prepare, like compile, on the bare model.
    if d.packing:
        check_packing(model, d.max_seq_len, recipe.model.name_or_path)
        if live.device_type == "cpu" and not compiled:
            use_per_example_attention(model)

    seen_ids: list[str] | None = [] if d.record_audit else None
    audit_lines = trim_audit(paths, rank, resume_from) if d.record_audit else None
    train_stream, eval_stream = build_streams(
        recipe, tokenizer, data, rank=rank, world_size=world, seen_ids=seen_ids
    )
    total_steps = estimate_total_steps(recipe, train_stream.total, world)

    optimizer = build_optimizer(accelerator, model, recipe)
    scheduler = build_scheduler(optimizer, t, total_steps)
    fill_deepspeed_batch(accelerator, recipe)  # before prepare: DeepSpeed reads it there
    model, optimizer = accelerator.prepare(model, optimizer)
    if d.packing:
        # On the prepared model, so the probe runs where training will: on the device, under
        # the same autocast, and with ZeRO-3 gathering its parameters on every rank.
        verify_packing(model, recipe.model.name_or_path, accelerator.device)
    # The scheduler is not prepared (a prepared one steps num_processes times per optimizer
    # step) nor registered for checkpointing (Accelerate would pickle it): checkpoints keep its
    # state as JSON (train/checkpoint.py).

    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(
            accelerator, resume_from, {"train": train_stream}, scheduler, recipe.lora.enabled
        )
        log.info("resumed from %s at step %d", resume_from, state.step)
    shards_per_rank = gather_object([train_stream.shard_count])
    accelerator.print(
        render_run_card(
            recipe,
            live,
            model=accelerator.unwrap_model(model),
            shards_per_rank=list(shards_per_rank),
            records=train_stream.total,
            data_source=data.source,
            total_steps=total_steps,
            resume_from=resume_from,
            start_step=state.step,
        ),
        flush=True,
    )
    if recipe.logging.tensorboard or recipe.logging.wandb:
        accelerator.init_trackers("raft-dist", config=_flat_config(recipe))
    metrics = MetricsLog(
        accelerator, paths.metrics, total_steps, state.step, recipe.logging.progress_bar
    )
    return Run(
        recipe=recipe,
        paths=paths,
        accelerator=accelerator,
        log=log,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_stream=train_stream,
        eval_stream=eval_stream,
        metrics=metrics,
        total_steps=total_steps,
        pad=padding_batch(tokenizer),
        stops=stops,
        state=state,
        seen_ids=seen_ids,
        audit_lines=audit_lines,
        hang_watch=HangWatch(),
    )


def _claim_run_folder(recipe: Recipe, paths: RunDir, world: int, log: Any) -> Path | None:
    """Rank 0: the lock, the checkpoint to resume from, and a folder that agrees with it."""
    from raft_dist.train.lock import lock_run_folder
    from raft_dist.train.resume import checkpoint_state, choose_checkpoint, trim_metrics

    if not lock_run_folder(paths.lock):
        log.warning(
            "%s: this filesystem has no file locks; nothing keeps a second run out", paths.root
        )
    resume_from = choose_checkpoint(recipe.training.resume, paths, world, recipe.to_dict(), log)
    trim_metrics(paths, checkpoint_state(resume_from))
    paths.recipe.write_text(recipe.to_yaml(), encoding="utf-8")
    paths.stopped.unlink(missing_ok=True)  # a marker describes the previous attempt only
    return resume_from


# ---- fit ---------------------------------------------------------------------------------


def fit(run: Run) -> Stop | None:
    from raft_dist.data.prefetch import Prefetcher, prefetch_depth

    if run.eval_stream is not None and run.recipe.training.eval_at_start and run.state.step == 0:
        _evaluate(run, 0)
    # The next batches are read, tokenized and collated in a thread while a step runs (thread
    # budget: data/prefetch.py). On a GPU the thread also pins them, so that their copy to the
    # device does not wait for the kernels queued before it.
    feed = Prefetcher(
        run.train_stream,
        prefetch_depth(run.recipe.data.prefetch_batches),
        pin_memory=run.accelerator.device.type == "cuda",
    )
    try:
        return _fit_steps(run, feed)
    finally:
        # Also on an error: the stream is put back at the last batch taken, so the summary
        # counts what was trained on, not what the thread read ahead.
        feed.close()
        # What the streams tokenized (that the end of a range has not written already) is
        # kept for the next run on this data (data/token_cache.py); never fails the run.
        for stream in (run.train_stream, run.eval_stream):
            if stream is not None:
                stream.save_token_cache()


def _fit_steps(run: Run, feed: Any) -> Stop | None:
    import torch

    from raft_dist.evaluate import predicting_positions, token_loss_sum
    from raft_dist.train.checkpoint import save_checkpoint

    recipe, accelerator, state = run.recipe, run.accelerator, run.state
    t = recipe.training
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    accum, world = t.gradient_accumulation_steps, accelerator.num_processes
    device = accelerator.device
    pad = {k: v.to(device) for k, v in run.pad.items()}  # copied once, not once per use
    # Found on the CPU copy, as Fed's: from the device copy they would wait for the device.
    pad_positions = predicting_positions(run.pad["labels"]).to(device)
    # The checkpoint saves the position of the last batch the loop took (Prefetcher.state_dict).
    streams = {"train": feed}
    steps_this_run = 0
    model.train()
    while state.step < run.total_steps:
        started = time.perf_counter()
        window = [feed.next_batch() for _ in range(accum)]
        real = [fed for fed in window if fed is not None]
        local = [sum(fed.target_tokens for fed in real), float(len(real))]
        global_tokens, global_batches = sum_over_ranks(accelerator, local)
        if global_batches == 0:  # every rank finished its range: the epoch is over
            if state.epoch_steps == 0:
                raise DataError(
                    recipe.data.train, None, "no example left to train on (all dropped?)"
                )
            epoch = feed.epoch + 1
            if t.max_steps is None and epoch >= t.epochs:
                break
            feed.start_epoch(epoch)
            state.epoch_steps = 0
            continue

        # Summed on the device, in float64 as the reported loss always was, and read once per
        # step below: a .cpu() per micro-batch would wait for the device every time.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        input_tokens = sum(fed.input_tokens for fed in real)
        # micro_loss is a sum over a micro-batch's target tokens; dividing by the window's
        # target tokens on all ranks weighs every token the same. backward() divides by accum
        # (Accelerate; DeepSpeed's engine with scale_wrt_gas) and DDP averages over world
        # ranks, so multiply both back: the step's gradient is then the gradient of the mean
        # token loss over the whole window.
        scale = accum * world / max(global_tokens, 1.0)
        grad_norm, step_lr, scaler_skipped = None, float("nan"), False
        for index, fed in enumerate(window):
            batch = fed.to(device) if fed is not None else pad
            with accelerator.accumulate(model):
                # One gradient-sync mechanism: accumulate() counts micro-batches and turns
                # sync_gradients on for every accum-th one, which is what makes DDP all-reduce
                # and, under DeepSpeed, what makes backward() run the optimizer step (DeepSpeed's
                # no_sync refuses ZeRO-2/3, so the loop cannot switch syncing itself). Every
                # window holds exactly accum micro-batches (padding fills a short one), so the
                # counter and the window agree; if they ever drift, stop instead of stepping
                # mid-window with a wrongly normalized gradient.
                if accelerator.sync_gradients != (index == accum - 1):
                    raise RuntimeError(
                        f"gradient sync on micro-batch {index + 1} of {accum}: Accelerate's "
                        "accumulation counter and the loop's window disagree"
                    )
                # Fixed-shape compile keeps every position: trimming the prompt's logits would
                # give each batch its own count, and each count its own compile.
                micro_loss, _ = token_loss_sum(
                    model,
                    batch,
                    trim=t.compile is not True,
                    positions=fed.positions_to(device) if fed is not None else pad_positions,
                )
                accelerator.backward(micro_loss * scale)
                loss_sum += micro_loss.detach().double()
                if accelerator.sync_gradients:
                    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    step_lr = scheduler.get_last_lr()[0]
                    # The norm is global (all ranks hold the same value), so every rank skips
                    # or steps alike. Under DeepSpeed the step already ran inside backward().
                    if t.nonfinite == "skip" and not _finite(grad_norm):
                        state.skipped_steps += 1
                    else:
                        optimizer.step()
                        # fp16 loss scaling skips overflowing steps by itself: not our guard's.
                        scaler_skipped = accelerator.optimizer_step_was_skipped
                        if not scaler_skipped:
                            scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

        # The step's one wait for the device (nonfinite=skip and fp16 scaling add their own):
        # the loss and the norm that the NaN guard and the log need. The first read waits for
        # all the work the step queued, so the second one waits for nothing.
        local_loss = float(loss_sum)
        norm = float(grad_norm) if grad_norm is not None else None
        # The stop vote rides on the statistics the ranks exchange anyway: no extra collective.
        window_loss, window_inputs, stop_votes = sum_over_ranks(
            accelerator, [local_loss, input_tokens, float(run.stops.requested())]
        )
        state.step += 1
        state.target_tokens += global_tokens
        state.input_tokens += window_inputs
        state.epoch_steps += 1
        steps_this_run += 1
        step = state.step
        elapsed = time.perf_counter() - started
        if step % t.log_every == 0 or step == run.total_steps:
            run.metrics.log(
                step,
                {
                    "loss": window_loss / max(global_tokens, 1.0),
                    "lr": step_lr,
                    "grad_norm": norm if norm is not None else float("nan"),
                    "target_tokens": global_tokens,
                    "tokens_per_s": window_inputs / max(elapsed, 1e-9),
                    "epoch": feed.epoch,
                },
            )
        run.metrics.advance()
        _guard_nonfinite(run, step, window_loss, None if scaler_skipped else norm)

        stop_after = t.stop_after_steps is not None and steps_this_run >= t.stop_after_steps
        stop = None
        if step < run.total_steps and stop_votes > 0:
            stop = Stop("stop_requested", step, run.stops.reason())
        elif step < run.total_steps and stop_after:
            stop = Stop("stop_after_steps", step)
        # An evaluation would spend the grace time a preempted job has left: skip it then.
        evaluating = run.eval_stream is not None and t.eval_every and step % t.eval_every == 0
        if evaluating and stop_votes == 0:
            _evaluate(run, step)
        if (t.save_every and step % t.save_every == 0) or stop_after or stop is not None:
            path = save_checkpoint(
                accelerator,
                run.paths.checkpoints,
                step,
                streams,
                state,
                scheduler,
                t.keep_last,
                recipe=recipe.to_dict(),
                adapters_only=recipe.lora.enabled,
                audit_lines=_flush_audit(run),
                # A stop request leaves seconds of grace: sizes only, no hashing then.
                hashes=stop_votes == 0,
            )
            run.log.info("checkpoint %s", path)
        if stop is not None:
            run.log.info("stopping after step %d: %s", step, stop.detail or stop.reason)
            return stop
    return None


def _finite(value: Any) -> bool:
    return value is None or math.isfinite(float(value))


def _guard_nonfinite(run: Run, step: int, window_loss: float, grad_norm: Any) -> None:
    """Stop before non-finite weights can be saved. window_loss is summed over all ranks and
    the gradient norm is global, so every rank reaches the same verdict at the same step."""
    t = run.recipe.training
    if t.nonfinite == "skip":
        if run.state.skipped_steps > t.max_skipped_steps:
            raise NonFiniteError(
                f"step {step}: {run.state.skipped_steps} updates skipped for a non-finite "
                f"gradient, more than training.max_skipped_steps={t.max_skipped_steps}; "
                f"{_last_good(run)}"
            )
        return
    if math.isfinite(window_loss) and _finite(grad_norm):
        return
    what = "loss" if not math.isfinite(window_loss) else "gradient norm"
    raise NonFiniteError(
        f"non-finite {what} at optimizer step {step} (loss {window_loss}, gradient norm "
        f"{float(grad_norm) if grad_norm is not None else 'n/a'}): the run stops and saves "
        f"nothing; {_last_good(run)}. Lower training.lr, check the data, or set "
        "training.nonfinite=skip (not under DeepSpeed)."
    )


def _last_good(run: Run) -> str:
    from raft_dist.train.checkpoint import list_checkpoints

    latest = next(iter(list_checkpoints(run.paths.checkpoints)[-1:]), None)
    return f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"


def _evaluate(run: Run, step: int) -> None:
    from raft_dist.evaluate import evaluate_loss

    result = evaluate_loss(
        run.accelerator, run.model, run.eval_stream, run.pad, run.recipe.training.eval_batches
    )
    run.state.evals.append({"step": step, **result})
    run.metrics.log(step, result)


# ---- finish ------------------------------------------------------------------------------


def finish(run: Run, stop: Stop | None) -> dict[str, Any]:
    """The one exit path: full and stopped runs write the same summary and per-rank files."""
    accelerator, state, paths = run.accelerator, run.state, run.paths
    run.metrics.close()
    if stop is None:
        already_evaluated = bool(state.evals) and state.evals[-1]["step"] == state.step
        if run.eval_stream is not None and not already_evaluated:
            _evaluate(run, state.step)
        if run.recipe.output.save_final_model:
            save_final_model(accelerator, run.model, run.tokenizer, paths.final)
    summary = _summarize(run, stop)
    if accelerator.is_main_process:
        paths.summary.write_text(json.dumps(summary, indent=1), encoding="utf-8")
        if stop is not None and stop.resumable_interruption:
            write_json_atomic(paths.stopped, stop.to_dict())
            paths.stop_request.unlink(missing_ok=True)
    accelerator.print(_summary_text(summary, paths), flush=True)
    _flush_audit(run)
    _write_rank_peak_memory(paths, accelerator.process_index)
    teardown(accelerator)
    return summary


def save_final_model(accelerator: Any, model: Any, tokenizer: Any, final_dir: Path) -> None:
    """Every rank takes part in gathering the weights (ZeRO-3 deadlocks otherwise)."""
    import shutil

    from raft_dist.atomic import folder_size, save_failure, swap_in_dir, temp_dir_for

    state_dict = accelerator.get_state_dict(model)
    failure: BaseException | None = None
    if accelerator.is_main_process:
        tmp = temp_dir_for(final_dir)
        try:
            accelerator.unwrap_model(model).save_pretrained(
                tmp, state_dict=state_dict, safe_serialization=True
            )
            tokenizer.save_pretrained(tmp)
            swap_in_dir(tmp, final_dir)
        except Exception as exc:  # classified below: disk errors become one line
            failure = exc
            written = folder_size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            error = save_failure("writing the final model", final_dir, exc, written)
            if error is None:
                raise
            failure = error
    # Not a plain barrier: the other ranks learn that rank 0 failed instead of waiting for it.
    if sum_over_ranks(accelerator, [float(failure is not None)])[0]:
        if isinstance(failure, SaveError):
            raise SaveError(f"{failure}; the partial model was removed, checkpoints are intact")
        raise SaveError(f"the final model {final_dir} was not saved: rank 0 failed to write it")


def _summarize(run: Run, stop: Stop | None) -> dict[str, Any]:
    stream, state = run.train_stream, run.state
    counts = [*stream.lengths.as_dict().values(), float(stream.skipped)]
    counts.append(float(stream.token_cache_hits))
    examples, truncated, dropped, skipped, cached = sum_over_ranks(run.accelerator, counts)
    saved_model = stop is None and run.recipe.output.save_final_model
    return {
        "steps": state.step,
        "stopped": stop.to_dict() if stop is not None else None,
        "epochs_started": stream.state.epoch + 1,
        "target_tokens": state.target_tokens,
        "input_tokens": state.input_tokens,
        "examples_tokenized": int(examples),
        "truncated": int(truncated),
        "dropped_overlong": int(dropped),
        "skipped_invalid": int(skipped),
        # Examples whose ids came from the token cache (read ahead by the prefetch thread too).
        "token_cache_hits": int(cached),
        "evals": state.evals,
        "model_dir": str(run.paths.final) if saved_model else None,
    }


def _summary_text(summary: dict, paths: RunDir) -> str:
    stopped = summary["stopped"]
    if stopped:
        lines = [
            f"stopped after optimizer step {stopped['step']} ({stopped['reason']}); the "
            "checkpoint is saved: continue with training.resume=latest"
        ]
    else:
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
    if summary["token_cache_hits"]:
        lines.append(
            f"  token cache    ids of {summary['token_cache_hits']} examples read from "
            "disk instead of tokenizing (data.token_cache)"
        )
    if summary["model_dir"]:
        lines.append(f"  model          {summary['model_dir']}")
    lines.append(f"  metrics        {paths.metrics} (TensorBoard: {paths.root})")
    return "\n".join(lines)


def teardown(accelerator: Any) -> None:
    """Close trackers and the process group before exit: a group left for interpreter
    teardown can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def _flush_audit(run: Run) -> int | None:
    """Append the ids read since the last flush to this rank's audit; its line count goes into
    the checkpoint, so a resume can cut what a killed attempt appended after it."""
    if run.seen_ids is None or run.audit_lines is None:
        return None
    import os

    audit = run.paths.audit(run.accelerator.process_index)
    audit.parent.mkdir(exist_ok=True)
    with audit.open("a", encoding="utf-8") as handle:
        handle.writelines(f"{i}\n" for i in run.seen_ids)
        handle.flush()
        os.fsync(handle.fileno())
    run.audit_lines += len(run.seen_ids)
    run.seen_ids.clear()
    return run.audit_lines


def _write_rank_peak_memory(paths: RunDir, rank: int) -> None:
    """Peak resident memory of this rank (Linux ru_maxrss is in KiB), for memory benchmarks."""
    import resource

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    paths.rank_peak(rank).write_text(
        json.dumps({"rank": rank, "peak_rss_mib": round(peak_mib, 1)}), encoding="utf-8"
    )


def _check_shared_run_dir(accelerator: Any, paths: RunDir) -> None:
    """Every rank must see one run folder: checkpoints are written by all ranks and a requeued
    job may land on other nodes. Rank 0 writes a nonce there; every rank reads it back."""
    import socket
    import uuid

    from accelerate.utils import broadcast_object_list, gather_object

    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)
    if accelerator.is_main_process:
        write_json_atomic(paths.nonce, token[0])
    accelerator.wait_for_everyone()
    try:
        seen = json.loads(paths.nonce.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        seen = None
    answers = gather_object([(accelerator.process_index, socket.gethostname(), seen == token[0])])
    blind = [(rank, host) for rank, host, ok in answers if not ok]
    if blind:
        where = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
        raise ConfigError(
            f"output.dir {paths.root} is not one folder for all ranks: {where} cannot see "
            "what rank 0 wrote there. Put output.dir on a filesystem every node mounts "
            "(checkpoints need every rank, and a requeued job may land on other nodes)."
        )


def _write_rank_facts(paths: RunDir, live: Any) -> None:
    """Each rank records what it really is, for audits and for the distributed tests."""
    paths.ranks.mkdir(parents=True, exist_ok=True)
    paths.rank_facts(live.rank).write_text(json.dumps(live.as_dict()), encoding="utf-8")


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    flat = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat
