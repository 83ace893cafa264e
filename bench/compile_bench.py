"""training.compile on the CPU: tokens/s of the compiled tiny model against eager, per shape regime.

Two regimes, each an eager model against a compiled one (same seed, so the same initial
weights, same batches in the same order), the training step the raft-dist loop runs (token-summed
loss from raft_dist.evaluate.token_loss_sum, backward, clipping, AdamW):

  fixed     packed rows (data.packing=true) padded to max_seq_len: one shape for every batch;
            compiled as training.compile=true does (torch's default shapes)
  variable  unpacked examples padded per batch (widths vary); compiled with dynamic=True as
            training.compile=dynamic does

Compilation happens once per model, in the first steps; that time is reported on its own (the
first two steps' wall time minus the eager model's first two) and is outside every timed window.
Then repetitions alternate the models (eager, compiled, compiled, eager, ...) over the same
batches; each timed window is `--steps` steps, and the ratio compiled/eager is taken per
repetition; the table gives the median and the range. Other processes' share of the CPU is
measured over every window (common.other_load).

    python bench/compile_bench.py [--reps 5] [--steps 8] [--quiet-wait 30] [--out bench/results]
        [--warm-cache]

The compile time is a cold one by default: inductor's on-disk caches go to a fresh temporary
folder, as on a machine that never compiled this model (a second run in torch's default cache
folder reuses the kernels and takes a fraction of the time: --warm-cache measures that).

Packed rows are padded to max_seq_len here because raft-dist's packing pads a batch only to its
longest row: widths differ by a few tokens, and training.compile=true recompiles once with
dynamic shapes on the first change (the second compile is in the reported compile time of the
loop, not of this benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

MAX_SEQ_LEN = 1024
MICRO_BATCH = 4
DEFAULT_REPS = 5
DEFAULT_STEPS = 8
DEFAULT_QUIET_WAIT_S = 30.0
REGIMES = {
    # name: (packed, compile mode of the compiled model, what training.compile value it is)
    "fixed": (True, None, "true"),
    "variable": (False, True, "dynamic"),
}


def bench_recipe(packed: bool) -> Any:
    from raft_dist.config import load_recipe

    return load_recipe(
        common.TINY_RECIPE,
        [
            f"data.train={common.DEMO_TRAIN}",
            f"data.packing={str(packed).lower()}",
            f"data.max_seq_len={MAX_SEQ_LEN}",
            "training.max_steps=1000",
            f"training.micro_batch_size={MICRO_BATCH}",
            "training.gradient_accumulation_steps=1",
            "model.dtype=float32",
            "output.dir=/tmp/unused",
        ],
    )


def batches_for(recipe: Any, count: int, pad_to: int | None) -> list[dict[str, Any]]:
    """The batches the loop's own streams make; packed ones padded to pad_to columns."""
    import torch

    from raft_dist.data.check import check_data
    from raft_dist.data.streaming import build_streams
    from raft_dist.model import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    with contextlib.redirect_stdout(io.StringIO()):
        stream, _ = build_streams(
            recipe, tokenizer, check_data(recipe.data), rank=0, world_size=1, seen_ids=None
        )
    out: list[dict[str, Any]] = []
    while len(out) < count:
        batch = stream.next_batch()
        if batch is None:
            stream.start_epoch(stream.state.epoch + 1)
            continue
        batch = dict(batch)
        if pad_to is not None:
            fill = {"input_ids": tokenizer.pad_token_id, "labels": -100, "sequence_ids": -1}
            extra = pad_to - batch["input_ids"].size(1)
            for key, value in batch.items():
                pad = torch.full((value.size(0), extra), fill.get(key, 0), dtype=value.dtype)
                batch[key] = torch.cat([value, pad], dim=1)
        out.append(batch)
    return out


def seeded_model(recipe: Any, compile_dynamic: bool | None, compiled: bool) -> Any:
    from accelerate.utils import set_seed

    from raft_dist.model import load_model, load_tokenizer

    set_seed(recipe.training.seed)
    model = load_model(recipe.model, load_tokenizer(recipe.model))
    model.train()
    if compiled:
        model.compile(dynamic=compile_dynamic)  # in place, as training.compile does
    return model


class Trainer:
    """One model, its optimizer, and the loop's step on a batch."""

    def __init__(self, recipe: Any, compiled: bool, dynamic: bool | None) -> None:
        import torch

        self.model = seeded_model(recipe, dynamic, compiled)
        # As the loop does: fixed-shape compile keeps every logit (no recompile per length).
        self.trim = not (compiled and dynamic is None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=recipe.training.lr)
        self.max_norm = recipe.training.max_grad_norm
        self.losses: list[float] = []

    def step(self, batch: dict[str, Any]) -> None:
        import torch

        from raft_dist.evaluate import token_loss_sum

        loss_sum, count = token_loss_sum(self.model, batch, trim=self.trim)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss_sum.detach() / count))

    def window(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        before = common.cpu_reading()
        for batch in batches:
            self.step(batch)
        after = common.cpu_reading()
        seconds = after.wall_s - before.wall_s
        return {
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
            "tokens": tokens,
            "other_load": common.other_load(before, after),
        }


def frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_regime(
    name: str, reps: int, steps: int, quiet_wait_s: float, log: common.Log
) -> dict[str, Any]:
    packed, dynamic, setting = REGIMES[name]
    recipe = bench_recipe(packed)
    batches = batches_for(recipe, steps, MAX_SEQ_LEN if packed else None)
    widths = sorted({b["input_ids"].size(1) for b in batches})
    eager = Trainer(recipe, compiled=False, dynamic=None)
    compiled = Trainer(recipe, compiled=True, dynamic=dynamic)
    # First two steps: the eager model warms up (allocator, first kernels), the compiled one
    # also compiles; the difference is the compile time. Both models take the same steps in the
    # same order throughout, so their losses stay comparable step by step.
    eager_first = eager.window(batches[:2])["seconds"]
    graphs_before = frames_compiled()
    first = compiled.window(batches[:2])["seconds"]
    compile_s = first - eager_first
    log(f"  {name}: compile {compile_s:.1f} s (first two steps {first:.1f} s); widths {widths}")
    # Every width once more, untimed: a shape the compiled model has not seen would recompile
    # inside a timed window.
    compiled.window(batches)
    eager.window(batches)
    graphs = frames_compiled() - graphs_before
    runs: list[dict[str, Any]] = []
    spent = 0.0
    for rep in range(reps):
        if spent < quiet_wait_s:
            spent += common.wait_for_quiet(quiet_wait_s - spent, log, pause_s=2.0)
        order = ("eager", "compiled") if rep % 2 == 0 else ("compiled", "eager")
        trainers = {"eager": eager, "compiled": compiled}
        result = {which: trainers[which].window(batches) for which in order}
        result["ratio"] = result["compiled"]["tokens_per_s"] / result["eager"]["tokens_per_s"]
        runs.append(result)
        log(
            f"  {name} rep {rep + 1}: eager {result['eager']['tokens_per_s']:.0f} tok/s, "
            f"compiled {result['compiled']['tokens_per_s']:.0f} tok/s, ratio "
            f"{result['ratio']:.3f}, other load {result['eager']['other_load']:.0%}/"
            f"{result['compiled']['other_load']:.0%}"
        )
    ratios = [r["ratio"] for r in runs]
    loss_gap = max(abs(a - b) for a, b in zip(eager.losses, compiled.losses, strict=True))
    return {
        "regime": name,
        "training_compile": setting,
        "torch_compile_dynamic": dynamic,
        "packed": packed,
        "micro_batch": MICRO_BATCH,
        "max_seq_len": MAX_SEQ_LEN,
        "widths": widths,
        "compile_s": compile_s,
        "first_two_steps_s": first,
        "graphs_compiled": graphs,
        "runs": runs,
        "median_tokens_per_s": {
            which: common.median(r[which]["tokens_per_s"] for r in runs)
            for which in ("eager", "compiled")
        },
        "median_ratio": common.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "other_load_range": [
            min(r[w]["other_load"] for r in runs for w in ("eager", "compiled")),
            max(r[w]["other_load"] for r in runs for w in ("eager", "compiled")),
        ],
        # Same weights, same batches, same updates: the losses may differ by float reordering.
        "max_loss_gap": loss_gap,
        "quiet_wait_spent_s": spent,
    }


def measure(
    reps: int = DEFAULT_REPS,
    steps: int = DEFAULT_STEPS,
    quiet_wait_s: float = DEFAULT_QUIET_WAIT_S,
    log: common.Log = print,
) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    results = {
        name: measure_regime(name, reps, steps, quiet_wait_s / len(REGIMES), log)
        for name in REGIMES
    }
    return {
        "regimes": results,
        "reps": reps,
        "steps_per_window": steps,
        **common.thread_settings(torch.get_num_threads()),
        "wall_s": time.perf_counter() - started,
    }


def report_rows(result: dict[str, Any]) -> list[common.Row]:
    rows: list[common.Row] = []
    for name, r in result["regimes"].items():
        low, high = r["ratio_range"]
        rows.append(
            (
                f"compile={r['training_compile']} / eager, {name} shapes (median ratio)",
                f"{r['median_ratio']:.3f} ({low:.2f}-{high:.2f})",
                "",
                "",
            )
        )
        rows.append(
            (f"compile={r['training_compile']} compile time (s)", f"{r['compile_s']:.1f}", "", "")
        )
    return rows


def report_lines(result: dict[str, Any]) -> list[str]:
    header = (
        "regime",
        "training.compile",
        "eager tok/s",
        "compiled tok/s",
        "ratio median (range)",
        "compile s",
        "graphs",
        "other load",
        "max loss gap",
    )
    rows = []
    for name, r in result["regimes"].items():
        med = r["median_tokens_per_s"]
        low, high = r["ratio_range"]
        load_low, load_high = r["other_load_range"]
        rows.append(
            (
                f"{name} (widths {r['widths'][0]}-{r['widths'][-1]})",
                r["training_compile"],
                f"{med['eager']:.0f}",
                f"{med['compiled']:.0f}",
                f"{r['median_ratio']:.3f} ({low:.2f}-{high:.2f})",
                f"{r['compile_s']:.1f}",
                str(r["graphs_compiled"]),
                f"{load_low:.0%}-{load_high:.0%}",
                f"{r['max_loss_gap']:.1e}",
            )
        )
    return [common.markdown_table(header, rows)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per window")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=DEFAULT_QUIET_WAIT_S,
        metavar="S",
        help="seconds in all to wait for other load to leave the CPU",
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="use torch's inductor cache folder (kernels compiled by an earlier run are reused)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cold_cache = None
    if not args.warm_cache:  # before torch compiles anything: inductor reads it on use
        cold_cache = tempfile.TemporaryDirectory(prefix="raft-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_cache.name
    env = common.environment()
    env["inductor_cache"] = "warm (torch's default folder)" if args.warm_cache else "cold (fresh)"
    if common.is_busy(env["load_avg_at_start"]):
        common.progress(
            f"note: load average {env['load_avg_at_start'][0]:.2f} at the start; other work "
            "on this machine makes the figures noisy"
        )
    result = measure(args.reps, args.steps, args.quiet_wait, log=common.progress)
    env["load_avg_at_end"] = os.getloadavg()
    print("\n".join(report_lines(result)))
    print(f"\ntotal {result['wall_s']:.0f} s")
    path = common.write_json(
        args.out / "compile.json",
        {"command": common.command_line(), "environment": env, "result": result},
    )
    print(f"written: {path}")
    if cold_cache is not None:
        cold_cache.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
