"""The demo's LoRA step on one core: fp32 or bf16 frozen weights, SDPA or eager attention.

Question: what do `model.dtype: bfloat16` and `model.attn_implementation: eager` (the demo
recipe, configs/demo.yaml) save in the step each of the demo's two CPU ranks runs? The step is
the one prompt_logits_bench.py times: the embedded SmolLM2-135M-Instruct with LoRA on every
linear layer, bf16 autocast, micro-batches of 2 demo examples, forward + loss (prompt logits
trimmed, as the loop does) + backward + AdamW step. torch uses one thread, as each demo rank
does (OMP_NUM_THREADS=1 for 2 processes on 2 cores).

Variants (the baseline first):
  fp32+sdpa    model.dtype float32, transformers' default attention (sdpa)
  bf16+sdpa    model.dtype bfloat16: the frozen base in bf16, the adapters fp32 (PEFT's default)
  bf16+eager   and eager attention: on CPU SDPA runs its flash kernel, whose backward took
               about a quarter of the step at these ~450-token rows

Each variant builds its own model from the same seed and trains it on the same batches;
repetitions rotate the order (a, b, c / c, b, a / ...) so that drift hits all alike, and the
ratio baseline/variant is taken per repetition: the table gives the median and the range. The
losses are printed too: bf16 weights round the frozen base, so they differ from fp32's in the
third decimal, not more.

    python bench/attention_bench.py [--reps 3] [--steps 3] [--quiet-wait 30] [--out bench/results]
"""

from __future__ import annotations

import sys
from typing import Any

import common
from prompt_logits_bench import (
    demo_batches,
    demo_recipe,
    lora_model,
    step_bench_main,
    timed_steps,
)

DEFAULT_REPS = 3
DEFAULT_STEPS = 3  # timed micro-batches per variant and repetition
VARIANTS = {  # name -> recipe overrides
    "fp32+sdpa": ["model.dtype=float32", "model.attn_implementation=sdpa"],
    "bf16+sdpa": ["model.dtype=bfloat16", "model.attn_implementation=sdpa"],
    "bf16+eager": ["model.dtype=bfloat16", "model.attn_implementation=eager"],
}
BASELINE = "fp32+sdpa"
TARGET_SPEEDUP = 1.15  # bf16+eager against the baseline: what the demo recipe relies on


def measure(
    reps: int = DEFAULT_REPS,
    steps: int = DEFAULT_STEPS,
    quiet_wait_s: float = 30.0,
    log: Any = None,
) -> dict[str, Any]:
    import torch

    say = log or (lambda _line: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipes = {name: demo_recipe(extra) for name, extra in VARIANTS.items()}
        _, batches = demo_batches(steps)
        models = {name: lora_model(recipe) for name, recipe in recipes.items()}
        names = list(VARIANTS)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        losses: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {name: [] for name in names if name != BASELINE}
        for rep in range(reps):
            common.wait_for_quiet(quiet_wait_s, say)
            order = names if rep % 2 == 0 else names[::-1]
            before = common.cpu_reading()
            took = {}
            for name in order:
                lr = recipes[name].training.lr
                timed_steps(models[name], lr, batches[:1], True)  # warm-up, untimed
                took[name], losses[name] = timed_steps(models[name], lr, batches, True)
                seconds[name].append(took[name])
            load = common.other_load(before, common.cpu_reading())
            for name in ratios:
                ratios[name].append(took[BASELINE] / took[name])
            say(
                f"rep {rep + 1}/{reps}: "
                + ", ".join(f"{n} {took[n]:.1f} s" for n in names)
                + f", other load {load:.0%}"
            )
    finally:
        torch.set_num_threads(threads)
    best = common.median(ratios["bf16+eager"])
    return {
        "settings": {"reps": reps, "steps": steps, "threads": 1, "variants": VARIANTS},
        "median_s": {name: common.median(v) for name, v in seconds.items()},
        "speedup": {
            name: {"median": common.median(r), "min": min(r), "max": max(r)}
            for name, r in ratios.items()
        },
        "losses": losses,
        "target": {
            "bf16_eager_speedup_at_least": TARGET_SPEEDUP,
            "verdict": common.verdict(best >= TARGET_SPEEDUP),
        },
        "command": common.command_line(),
        "environment": common.environment(),
    }


def report_rows(result: dict[str, Any]) -> list[common.Row]:
    rows = []
    for name, s in result["speedup"].items():
        is_target = name == "bf16+eager"
        rows.append(
            (
                f"demo LoRA step, 1 thread: {BASELINE} / {name}",
                f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})",
                f">= {result['target']['bf16_eager_speedup_at_least']}x" if is_target else "",
                result["target"]["verdict"] if is_target else "",
            )
        )
    first = {name: f"{values[0]:.4f}" for name, values in result["losses"].items()}
    rows.append(("  first step's loss", ", ".join(f"{n} {v}" for n, v in first.items()), "", ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    return step_bench_main(
        __doc__, measure, report_rows, "attention.json", DEFAULT_REPS, DEFAULT_STEPS, argv
    )


if __name__ == "__main__":
    sys.exit(main())
