"""Evaluation prefill on CPU: each prompt alone against one padded batch.

Question: what does `raft-dist eval` save on CPU by prefilling each prompt of a batch alone and
joining the caches (`raft_dist.evaluation.generation.prefill_alone`), instead of running the
left-padded batch through the model? A CPU computes every padded position, and one evaluation
mixes prompts of very different lengths: the robustness curve re-poses a question with its oracle
alone and with 8 distractors.

The work is one rank's share of the demo's evaluation, as `make demo` runs it: the embedded
SmolLM2-135M-Instruct in `raft-dist eval`'s default dtype (auto: bf16 where the CPU runs it
natively), the held-out and unseen sets with the robustness variants of 3 questions each, every
second prompt in length order (the share of rank 0 of 2), batches of 16, one thread (each of the
demo's two ranks has one core). Each pass is the real `generate_all` with one new token, so it
times the prefill plus one step; only `use_prefill_alone` differs between the two variants.
Repetitions alternate the order; the ratio padded / alone is taken per repetition.

    python bench/prefill_bench.py [--reps 3] [--quiet-wait 30] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import common

MODEL = "builtin:smollm2"
SETS = [("held-out", "data/demo"), ("unseen", "data/demo/unseen")]
ROBUSTNESS_LIMIT = 3  # the Makefile's --robustness-limit
BATCH_SIZE = 16  # the Makefile's --eval-batch-size
WORLD = 2  # the cpu profile's processes
DEFAULT_REPS = 3
TARGET_SPEEDUP = 1.3


def demo_share() -> tuple[Any, Any, list[list[int]]]:
    """The model, its tokenizer and rank 0's prompts of the demo's evaluation."""
    from raft_dist.data.tokenize import encode_prompt
    from raft_dist.evaluation.models import ModelCache, ModelSpec, pick_dtype
    from raft_dist.evaluation.run import EvalOptions, load_sets

    sets = [(name, str(common.ROOT / path)) for name, path in SETS]
    options = EvalOptions(models=[], data=sets, out=Path("."), robustness_limit=ROBUSTNESS_LIMIT)
    cache = ModelCache("cpu", pick_dtype("auto", "cpu"))
    with cache.use(ModelSpec.parse(MODEL)) as (model, tokenizer):  # a base: nothing to undo
        pass
    rows = [encode_prompt(tokenizer, item.prompt) for s in load_sets(options) for item in s.items]
    rows.sort(key=len, reverse=True)
    return model, tokenizer, rows[::WORLD]


def padding_share(rows: list[list[int]], batch_size: int) -> float:
    """Padded positions over all positions of the length-ordered batches."""
    slots = sum(
        len(rows[i]) * len(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)
    )
    return 1 - sum(len(r) for r in rows) / slots


def measure(reps: int = DEFAULT_REPS, quiet_wait_s: float = 30.0, log: Any = None) -> dict:
    import torch

    from raft_dist.evaluation import generation

    say = log or (lambda _line: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    chosen = generation.use_prefill_alone
    settings = generation.GenerationSettings(max_new_tokens=1, batch_size=BATCH_SIZE)
    try:
        model, tokenizer, rows = demo_share()
        variants = {"padded": lambda model, rows: False, "alone": chosen}
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        first: dict[str, list[str]] = {}
        ratios = []
        for rep in range(reps):
            common.wait_for_quiet(quiet_wait_s, say)
            before = common.cpu_reading()
            took = {}
            for name in list(variants)[:: 1 if rep % 2 == 0 else -1]:
                generation.use_prefill_alone = variants[name]
                started = time.perf_counter()
                first[name] = generation.generate_all(model, tokenizer, rows, settings)
                took[name] = time.perf_counter() - started
                seconds[name].append(took[name])
            ratios.append(took["padded"] / took["alone"])
            load = common.other_load(before, common.cpu_reading())
            say(
                f"rep {rep + 1}/{reps}: padded {took['padded']:.1f} s, alone {took['alone']:.1f}"
                f" s, other load {load:.0%}"
            )
    finally:
        generation.use_prefill_alone = chosen
        torch.set_num_threads(threads)
    best = common.median(ratios)
    return {
        "settings": {
            "model": MODEL,
            "dtype": str(model.dtype).removeprefix("torch."),
            "prompts": len(rows),
            "prompt_tokens": sum(len(r) for r in rows),
            "batch_size": BATCH_SIZE,
            "padding_share": padding_share(rows, BATCH_SIZE),
            "reps": reps,
            "threads": 1,
        },
        "median_s": {name: common.median(v) for name, v in seconds.items()},
        "speedup": {"median": best, "min": min(ratios), "max": max(ratios)},
        # The first generated token of every prompt, both ways: bf16 rounding may differ.
        "same_first_token": sum(a == b for a, b in zip(*first.values(), strict=True)),
        "target": {
            "speedup_at_least": TARGET_SPEEDUP,
            "verdict": common.verdict(best >= TARGET_SPEEDUP),
        },
        "command": common.command_line(),
        "environment": common.environment(),
    }


def report_rows(result: dict[str, Any]) -> list[common.Row]:
    s, settings = result["speedup"], result["settings"]
    return [
        (
            "eval prefill, 1 thread: padded / alone",
            f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})",
            f">= {result['target']['speedup_at_least']}x",
            result["target"]["verdict"],
        ),
        (
            "  one rank's demo share",
            f"{settings['prompts']} prompts, {settings['prompt_tokens']} tokens, "
            f"{settings['padding_share']:.0%} of a padded batch is padding",
            "",
            "",
        ),
        (
            "  same first token",
            f"{result['same_first_token']} of {settings['prompts']}",
            "",
            "",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS)
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    result = measure(args.reps, args.quiet_wait, log=common.progress)
    print(common.markdown_table(("metric", "value", "target", "verdict"), report_rows(result)))
    common.write_json(args.out / "prefill.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
