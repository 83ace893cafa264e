"""Training step time with and without the prompt's logits, on the demo's own batches.

A RAFT example is mostly prompt (documents and question) and the loss never looks at it, so
`token_loss_sum` asks the model only for the logits from the first position that predicts a
target on (`logits_to_keep`). This measures what that saves in the demo's training step: the
embedded SmolLM2-135M-Instruct with LoRA on every linear layer and bf16 autocast
(configs/demo.yaml), micro-batches of 2 demo examples, forward + loss + backward + AdamW step.

Both variants train the same model copy from the same weights on the same batches; repetitions
alternate them (full, trimmed, trimmed, full, ...) so drift hits both alike, and the ratio
full/trimmed step time is taken per repetition: the table gives the median and the range. The
loss of both variants is printed too: it must agree (the logits that are left out carry no
target).

    python bench/prompt_logits_bench.py [--reps 5] [--steps 4] [--quiet-wait 30]
        [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
from throughput import materialize_batches

DEFAULT_REPS = 5
DEFAULT_STEPS = 4  # timed micro-batch steps per variant and repetition
TARGET_SPEEDUP = 1.10  # the prompt is ~85% of a demo row; the output matrix ~20% of a forward


def demo_recipe(overrides: Sequence[str] = ()) -> Any:
    """configs/demo.yaml on the shipped training data, micro-batch 2, plus `overrides`."""
    from raft_dist.config import load_recipe

    return load_recipe(
        common.ROOT / "configs/demo.yaml",
        [
            f"data.train={common.DEMO_TRAIN}",
            "data.eval=null",
            "training.micro_batch_size=2",
            *overrides,
        ],
    )


def demo_batches(count: int) -> tuple[Any, list[dict[str, Any]]]:
    """The demo recipe and `count` micro-batches of its training data, as the loop makes them."""
    recipe = demo_recipe()
    return recipe, materialize_batches(recipe, count)


def lora_model(recipe: Any) -> Any:
    from accelerate.utils import set_seed

    from raft_dist.adapters import wrap_with_lora
    from raft_dist.model import load_model, load_tokenizer

    set_seed(recipe.training.seed)
    model = load_model(recipe.model, load_tokenizer(recipe.model))
    return wrap_with_lora(model, recipe.lora, gradient_checkpointing=False).train()


def timed_steps(base: Any, lr: float, batches: list[dict[str, Any]], trim: bool) -> tuple:
    """A fresh copy of `base` and its optimizer, then one step per batch: (seconds, losses)."""
    import copy

    import torch

    from raft_dist.evaluate import token_loss_sum

    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, started = [], time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, count = token_loss_sum(model, batch, trim=trim)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach() / count))
    return time.perf_counter() - started, losses


def measure(
    reps: int = DEFAULT_REPS,
    steps: int = DEFAULT_STEPS,
    quiet_wait_s: float = 30.0,
    log: Any = None,
) -> dict[str, Any]:
    from raft_dist.evaluate import target_count

    say = log or (lambda _line: None)
    recipe, batches = demo_batches(steps)
    base = lora_model(recipe)
    rows = [
        {"tokens": int(b["attention_mask"].sum()), "targets": int(target_count(b))} for b in batches
    ]
    ratios, timings, losses = [], {"full": [], "trimmed": []}, {}
    for rep in range(reps):
        common.wait_for_quiet(quiet_wait_s, say)
        order = ("full", "trimmed") if rep % 2 == 0 else ("trimmed", "full")
        seconds = {}
        before = common.cpu_reading()
        for variant in order:
            # Same starting weights and optimizer state for both variants, every repetition.
            trim, lr = variant == "trimmed", recipe.training.lr
            timed_steps(base, lr, batches[:1], trim)  # warm-up step, untimed
            seconds[variant], losses[variant] = timed_steps(base, lr, batches, trim)
            timings[variant].append(seconds[variant])
        load = common.other_load(before, common.cpu_reading())
        ratios.append(seconds["full"] / seconds["trimmed"])
        say(
            f"rep {rep + 1}/{reps}: full {seconds['full']:.1f} s, trimmed "
            f"{seconds['trimmed']:.1f} s, speedup {ratios[-1]:.3f}, other load {load:.0%}"
        )
    gap = max(abs(a - b) for a, b in zip(losses["full"], losses["trimmed"], strict=True))
    speedup = common.median(ratios)
    return {
        "settings": {"reps": reps, "steps": steps, "recipe": "configs/demo.yaml", "batches": rows},
        "median_s": {k: common.median(v) for k, v in timings.items()},
        "speedup": {"median": speedup, "min": min(ratios), "max": max(ratios)},
        "max_loss_gap": gap,
        "target": {
            "speedup_at_least": TARGET_SPEEDUP,
            "verdict": common.verdict(speedup >= TARGET_SPEEDUP and gap < 1e-2),
        },
        "command": common.command_line(),
        "environment": common.environment(),
    }


def report_rows(result: dict[str, Any]) -> list[common.Row]:
    s = result["speedup"]
    return [
        (
            "LoRA step, demo rows: all logits / prompt trimmed",
            f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})",
            f">= {result['target']['speedup_at_least']}x",
            result["target"]["verdict"],
        ),
        ("  loss gap between the two", f"{result['max_loss_gap']:.1e}", "", ""),
    ]


def step_bench_main(
    doc: str,
    measure_fn: Any,
    rows_fn: Any,
    out_name: str,
    reps: int,
    steps: int,
    argv: list[str] | None = None,
) -> int:
    """The command line shared by the benchmarks of the demo's step (this one and
    attention_bench.py): --reps, --steps, --quiet-wait, --out; a table, then OUT/out_name."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    result = measure_fn(args.reps, args.steps, args.quiet_wait, log=common.progress)
    print(common.markdown_table(("metric", "value", "target", "verdict"), rows_fn(result)))
    common.write_json(args.out / out_name, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    return step_bench_main(
        __doc__, measure, report_rows, "prompt_logits.json", DEFAULT_REPS, DEFAULT_STEPS, argv
    )


if __name__ == "__main__":
    sys.exit(main())
