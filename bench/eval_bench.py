"""Evaluation speed: examples/s with prompts generated in batches against one at a time.

    python bench/eval_bench.py [--eval-model builtin:tiny-llama] [--eval-examples 16]
        [--eval-new-tokens 32] [--eval-repeats 3] [--eval-batch-sizes 1 8 16] [--eval-dtype D]

The same model, the same prompts and the same generation budget go through the real evaluation
path, `raft_dist.evaluation.generation.generate_all`, once per batch size in every repeat; the
order of the batch sizes alternates from one repeat to the next, so that drift of the machine
hits all of them alike. Prompts come from `load_eval_set("data/demo")` and are tokenized with
`encode_prompt`, as `raft-dist eval` does; the model is loaded through `ModelCache`. The default
model, `builtin:tiny-llama`, is random and never writes the answer line that stops a row, so
every row generates the full budget and every batch size does the same work (the result counts
the generated tokens to show it). Target: batch 8 reaches at least 3x the examples/s of batch 1
(median of the per-repeat ratios) on the default model.

The result also holds the wall time per stage of the last demo pipeline (runs/demo/stages/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import common

from raft_dist.pipeline import STAGES

DEFAULT_MODEL = "builtin:tiny-llama"
EVAL_DATA = common.ROOT / "data" / "demo"
DEMO_STAGES = common.ROOT / "runs" / "demo" / "stages"
DEMO_NOTE = "run make demo first (the demo pipeline, --out runs/demo)"
DEFAULT_BATCH_SIZES = (1, 8, 16)
DEFAULT_REPEATS = 3
TARGET_BATCH = 8
TARGET_RATIO = 3.0
WARMUP_NEW_TOKENS = 2
# Per model: examples, new tokens per example, dtype. The random tiny model runs in fp32 (what
# the other benchmarks use) on 16 of the 40 demo questions (2 batches of 8, 1 of 16): a batch-1
# pass of all 40 alone takes about 20 s on 2 shared cores, and the whole run should stay within
# about a minute. 128 new tokens: the demo's evaluation budget (1.25 x its longest gold answer
# + 16 = 135), so decoding weighs as much as in the real evaluation; with 32, prefill (which
# batching helps less) dominated and the ratio read ~3.0 instead of ~3.4. A pretrained model
# gets `raft-dist eval`'s own default dtype, auto (bf16 only where the CPU runs it natively),
# and few examples: its prompts take seconds each on 2 cores.
MODEL_DEFAULTS: dict[str, tuple[int, int, str]] = {
    DEFAULT_MODEL: (16, 128, "float32"),
    "builtin:smollm2": (8, 32, "auto"),
}
OTHER_MODEL_DEFAULTS = (8, 32, "auto")


# ---- settings ---------------------------------------------------------------------------------


def resolve_settings(
    model: str,
    examples: int | None,
    new_tokens: int | None,
    dtype: str | None,
    batch_sizes: list[int] | None,
) -> tuple[int, int, str, list[int], list[str]]:
    """Fill in the per-model defaults; batch sizes above the example count are dropped (they
    would repeat the work of one batch holding every example)."""
    default_examples, default_tokens, default_dtype = MODEL_DEFAULTS.get(
        model, OTHER_MODEL_DEFAULTS
    )
    examples = examples or default_examples
    new_tokens = new_tokens or default_tokens
    dtype = dtype or default_dtype
    sizes = sorted(set(batch_sizes or DEFAULT_BATCH_SIZES) | {1})
    notes = []
    dropped = [b for b in sizes if b > examples]
    if dropped:
        sizes = [b for b in sizes if b <= examples]
        notes.append(
            f"batch sizes {', '.join(map(str, dropped))} dropped: above the {examples} examples"
        )
    return examples, new_tokens, dtype, sizes, notes


# ---- one timed pass -------------------------------------------------------------------------


@contextmanager
def counting_generate(model: Any) -> Iterator[list[tuple[Any, int]]]:
    """Keeps what each `model.generate` call returned after the prompt, so the generated tokens
    can be counted after the timing. The call itself is unchanged (an instance attribute in
    front of the method, removed afterwards)."""
    original = model.generate
    calls: list[tuple[Any, int]] = []

    def generate(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        calls.append((output[:, width:], len(output)))
        return output

    model.generate = generate
    try:
        yield calls
    finally:
        del model.generate


def count_tokens(calls: list[tuple[Any, int]], pad_id: int, budget: int) -> dict[str, int]:
    """Generated tokens per row: the new positions less the trailing padding that generate
    writes once a row has stopped (with pad == EOS the EOS itself is not counted)."""
    rows = tokens = positions = at_budget = 0
    for new, batch_rows in calls:
        positions += new.shape[1] * batch_rows
        for row in new.tolist():
            length = len(row)
            while length and row[length - 1] == pad_id:
                length -= 1
            rows += 1
            tokens += length
            at_budget += length == budget
    return {
        "rows": rows,
        "generate_calls": len(calls),
        "generated_tokens": tokens,
        "decode_positions": positions,  # rows x steps of each call: stopped rows included
        "rows_at_budget": at_budget,
    }


def timed_pass(
    model: Any, tokenizer: Any, rows: list[list[int]], batch_size: int, new_tokens: int
) -> tuple[dict[str, Any], list[str]]:
    """One generate_all over every row; wall time, CPU share of other processes, token counts."""
    from raft_dist.evaluation.generation import GenerationSettings, generate_all

    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=batch_size)
    with counting_generate(model) as calls:
        before = common.cpu_reading()
        outputs = generate_all(model, tokenizer, rows, settings)
        after = common.cpu_reading()
    seconds = after.wall_s - before.wall_s
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run = {
        "batch_size": batch_size,
        "seconds": seconds,
        "examples_per_s": len(rows) / seconds,
        "cpu_s": after.own_s - before.own_s,
        "other_load": common.other_load(before, after),
        **count_tokens(calls, pad_id, new_tokens),
    }
    run["tokens_per_s"] = run["generated_tokens"] / seconds
    return run, outputs


# ---- demo pipeline stages ------------------------------------------------------------------


def demo_stages(folder: Path = DEMO_STAGES) -> dict[str, Any] | None:
    """Seconds per stage from the pipeline's markers; None when there are none. A marker
    written before markers held "seconds", or a stage not run yet, reads None."""
    if not folder.is_dir():
        return None
    seconds: dict[str, float | None] = {}
    for stage in STAGES:
        try:
            marker = json.loads((folder / f"{stage}.json").read_text(encoding="utf-8"))
            value = marker["result"].get("seconds")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            value = None
        seconds[stage] = float(value) if isinstance(value, int | float) else None
    known = [v for v in seconds.values() if v is not None]
    return {
        "folder": str(folder),
        "seconds": seconds,
        "total_s": sum(known) if known else None,
        "missing": [stage for stage, value in seconds.items() if value is None],
    }


# ---- the benchmark --------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {"median": common.median(values), "min": min(values), "max": max(values)}


def measure(
    model_name: str = DEFAULT_MODEL,
    examples: int | None = None,
    new_tokens: int | None = None,
    repeats: int = DEFAULT_REPEATS,
    batch_sizes: list[int] | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    log: common.Log = print,
) -> dict[str, Any]:
    """Every batch size over the same rows in each repeat, alternating the order."""
    given = {"--eval-examples": [examples], "--eval-new-tokens": [new_tokens]}
    given.update({"--eval-repeats": [repeats], "--eval-batch-sizes": batch_sizes or []})
    for option, values in given.items():
        if any(v is not None and v < 1 for v in values):
            raise ValueError(f"{option} must be at least 1, got {values}")
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    examples, new_tokens, dtype, sizes, notes = resolve_settings(
        model_name, examples, new_tokens, dtype, batch_sizes
    )
    import torch

    from raft_dist.data.tokenize import encode_prompt
    from raft_dist.evaluation.items import load_eval_set
    from raft_dist.evaluation.models import ModelCache, ModelSpec, pick_dtype
    from raft_dist.model import pick_device

    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    items = load_eval_set(str(EVAL_DATA), limit=examples)
    if len(items) < examples:
        notes.append(f"{EVAL_DATA} holds {len(items)} examples, not {examples}")
    if common.is_busy(load_at_start):
        notes.append(
            f"load average {load_at_start[0]:.2f} at the start: other work on this machine "
            "slows the passes (see 'other load')"
        )
    for note in notes:
        log(f"note: {note}")
    cache = ModelCache(device, dtype)
    load_started = time.perf_counter()
    with cache.use(ModelSpec.parse(model_name)) as (model, tokenizer):
        load_s = time.perf_counter() - load_started
        rows = [encode_prompt(tokenizer, item.prompt) for item in items]
        lengths = sorted(len(r) for r in rows)
        log(
            f"{model_name} ({dtype}, {device}): {len(rows)} prompts of {lengths[0]}-"
            f"{lengths[-1]} tokens, {new_tokens} new tokens each, batch sizes "
            f"{', '.join(map(str, sizes))}, {repeats} repeats"
        )
        # Untimed: each batch size's first call pays for allocations and lazy set-up.
        for size in sizes:
            timed_pass(model, tokenizer, rows[:size], size, WARMUP_NEW_TOKENS)
        runs: list[dict[str, Any]] = []
        outputs: dict[int, list[str]] = {}
        for repeat in range(repeats):
            order = sizes if repeat % 2 == 0 else sizes[::-1]
            for size in order:
                run, texts = timed_pass(model, tokenizer, rows, size, new_tokens)
                run["repeat"] = repeat
                runs.append(run)
                outputs.setdefault(size, texts)
                log(
                    f"repeat {repeat + 1} batch {size:>2}: {run['examples_per_s']:6.2f} "
                    f"examples/s, {run['generated_tokens']} tokens, {run['seconds']:.2f} s, "
                    f"other load {run['other_load']:.0%}"
                )
    per_size: dict[str, Any] = {}
    for size in sizes:
        mine = [r for r in runs if r["batch_size"] == size]
        one = {r["repeat"]: r for r in runs if r["batch_size"] == 1}
        ratios = [r["examples_per_s"] / one[r["repeat"]]["examples_per_s"] for r in mine]
        tokens = sorted({r["generated_tokens"] for r in mine})
        per_size[str(size)] = {
            "examples_per_s": spread([r["examples_per_s"] for r in mine]),
            "ratio_to_batch_1": spread(ratios),
            "per_repeat_ratio": ratios,
            "generated_tokens": tokens[0] if len(tokens) == 1 else tokens,
            "rows_at_budget": mine[0]["rows_at_budget"],
            "decode_positions": mine[0]["decode_positions"],
            "outputs_same_as_batch_1": sum(
                a == b for a, b in zip(outputs[size], outputs[1], strict=True)
            ),
            "other_load": spread([r["other_load"] for r in mine]),
        }
    counts = {size: entry["generated_tokens"] for size, entry in per_size.items()}
    same_work = len({json.dumps(c) for c in counts.values()}) == 1
    target: dict[str, Any] = {
        "batch_size": TARGET_BATCH,
        "ratio_at_least": TARGET_RATIO,
        "applies": model_name == DEFAULT_MODEL and str(TARGET_BATCH) in per_size,
    }
    if target["applies"]:
        value = per_size[str(TARGET_BATCH)]["ratio_to_batch_1"]["median"]
        target.update(value=value, verdict=common.verdict(value >= TARGET_RATIO))
    stages = demo_stages()
    return {
        "model": model_name,
        "dtype": dtype,
        "device": device,
        "load_s": load_s,
        **common.thread_settings(torch.get_num_threads()),
        "eval_data": str(EVAL_DATA),
        "examples": len(rows),
        "prompt_tokens": {"min": lengths[0], "max": lengths[-1], "total": sum(lengths)},
        "max_new_tokens": new_tokens,
        "batch_sizes": sizes,
        "repeats": repeats,
        "notes": notes,
        "runs": runs,
        "per_batch_size": per_size,
        "same_work": same_work,
        "target": target,
        "demo_stages": stages,
        "demo_stages_note": None if stages is not None else DEMO_NOTE,
        "load_avg_at_start": load_at_start,
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
    }


# ---- report ---------------------------------------------------------------------------------


def report_rows(result: dict[str, Any]) -> list[common.Row]:
    """Rows (metric, value, target, verdict) for bench/run.py's combined table."""
    rows: list[common.Row] = []
    target = result["target"]
    for size, entry in result["per_batch_size"].items():
        eps = entry["examples_per_s"]
        rows.append(
            (
                f"eval batch {size} examples/s (median)",
                f"{eps['median']:.2f} ({eps['min']:.2f}-{eps['max']:.2f})",
                "",
                "",
            )
        )
    for size, entry in result["per_batch_size"].items():
        if size == "1":
            continue
        ratio = entry["ratio_to_batch_1"]
        applies = target["applies"] and size == str(TARGET_BATCH)
        rows.append(
            (
                f"eval batch {size}/batch 1 (median ratio)",
                f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})",
                f">= {TARGET_RATIO}" if applies else "",
                target["verdict"] if applies else "",
            )
        )
    tokens = "/".join(str(e["generated_tokens"]) for e in result["per_batch_size"].values())
    rows.append(
        (
            f"eval generated tokens (batch {'/'.join(result['per_batch_size'])})",
            tokens,
            "equal",
            common.verdict(result["same_work"]),
        )
    )
    loads = [r["other_load"] for r in result["runs"]]
    rows.append(
        ("eval other load (median, max)", f"{common.median(loads):.0%}, {max(loads):.0%}", "", "")
    )
    stages = result["demo_stages"]
    if stages is None:
        rows.append(("demo stages (s)", f"none: {result['demo_stages_note']}", "", ""))
    else:
        for stage, seconds in stages["seconds"].items():
            rows.append((f"demo {stage} (s)", "-" if seconds is None else f"{seconds:.1f}", "", ""))
        total, missing = stages["total_s"], stages["missing"]
        value = "-" if total is None else f"{total:.1f}"
        if total is not None and missing:
            value += f" (without {', '.join(missing)})"
        rows.append(("demo total (s)", value, "", ""))
    return rows


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"eval: {result['model']} ({result['dtype']}, {result['device']}), {result['examples']} "
        f"examples of {result['prompt_tokens']['min']}-{result['prompt_tokens']['max']} prompt "
        f"tokens, {result['max_new_tokens']} new tokens, {result['repeats']} repeats:"
    ]
    for size, entry in result["per_batch_size"].items():
        eps, ratio = entry["examples_per_s"], entry["ratio_to_batch_1"]
        lines.append(
            f"  batch {size:>2}: {eps['median']:6.2f} examples/s (x{ratio['median']:.2f}), "
            f"{entry['generated_tokens']} tokens, {entry['rows_at_budget']}/{result['examples']} "
            f"rows at the budget, outputs as batch 1: {entry['outputs_same_as_batch_1']}/"
            f"{result['examples']}"
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, shared by this script and bench/run.py."""
    parser.add_argument("--eval-model", default=DEFAULT_MODEL, help="BASE or BASE+ADAPTER")
    parser.add_argument(
        "--eval-examples", type=int, default=None, help="prompts (default 16; 8 for other models)"
    )
    parser.add_argument(
        "--eval-new-tokens", type=int, default=None, help="generation budget per prompt (32)"
    )
    parser.add_argument("--eval-repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument(
        "--eval-batch-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_BATCH_SIZES),
        help="batch sizes compared with 1 (1 is always run)",
    )
    parser.add_argument(
        "--eval-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default=None,
        help="default float32 for builtin:tiny-llama, auto for other models",
    )
    parser.add_argument("--eval-device", default="cpu", help="cpu, cuda, ... or auto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    try:
        result = measure(
            args.eval_model,
            args.eval_examples,
            args.eval_new_tokens,
            args.eval_repeats,
            args.eval_batch_sizes,
            args.eval_dtype,
            args.eval_device,
            log=common.progress,
        )
    except ValueError as exc:
        parser.error(str(exc))
    result["command"] = common.command_line()
    print()
    print("\n".join(report_lines(result)))
    print()
    print(common.markdown_table(("metric", "value", "target", "verdict"), report_rows(result)))
    print(f"total {result['wall_s']:.0f} s")
    path = common.write_json(args.out / "eval.json", result)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
