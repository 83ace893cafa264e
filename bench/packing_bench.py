"""Useful tokens per second with plain padding, length grouping and packing.

Question: how much training throughput do data.group_by_length and data.packing buy over plain
right-padded batches? Useful tokens are target tokens (label != -100, counted as the loss
counts them, `raft_dist.evaluate.target_count`): the work the step is for. Pad tokens cost the
same compute as real ones, and so do prompt tokens, so the figure moves with how much padding a
mode leaves and with nothing else.

Each mode trains the tiny model (configs/tiny.yaml: builtin:tiny-llama, fp32) on the same
examples in one process: the real RankStream (tokenize, group or pack, collate), token_loss_sum
(block-diagonal attention for packed rows), backward, clipping and an AdamW step, one micro
batch per step, from the same seeded initial weights. The timed window is the whole pass, from
the stream's first batch to the last optimizer step, so grouping and packing pay for their own
data work. Modes alternate (a, b, c, a, b, c, ...) so that drift and other load hit all alike;
the per-repetition ratio to padding is what the report's medians are taken over.

Two data sets:
  demo   the shipped data/demo/train (its first records) at max_seq_len 1024;
  wide   synthetic RAFT records whose token lengths are log-uniform between 64 and 2048,
         at max_seq_len (packed row length) 2048.

    python bench/packing_bench.py [--demo-examples 16] [--wide-examples 32] [--reps 3]
        [--window 8] [--out bench/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# packed: what the training loop runs on the CPU (attention per example, packed_attention.py);
# packed-mask: the same rows through the block-diagonal mask (GPU kernels, torch.compile)
MODES = ("padding", "grouped", "packed", "packed-mask")
DEFAULT_EXAMPLES = {"demo": 16, "wide": 32}  # per data set; the demo one is nearly padding-free
DEFAULT_REPS = 3
DEFAULT_WINDOW = 8  # data.group_by_length: micro batches per window
MICRO_BATCH_SIZE = 4
SEED = 42
# data set -> max_seq_len (the packed row length)
DATASETS = {"demo": 1024, "wide": 2048}
WIDE_LENGTHS = (64, 2048)  # tokens per example, log-uniform
# Target: packing's median useful tok/s over padding's on the wide-spread data.
TARGET_WIDE_PACKED = 1.5
WORDS = (
    "harbour tide mill ferry lantern cheese market bell library school weather station north "
    "south island reach wheel stone river festival ledger copper salt green red blue"
).split()


@dataclass
class ModeRun:
    """One timed pass of one mode over one data set."""

    dataset: str
    mode: str
    rep: int
    useful_tokens_per_s: float
    wall_s: float  # the whole pass: stream + steps
    cpu_s: float  # CPU time this process used in the pass, all its threads
    step_s: float  # forward, backward, clip and optimizer step only
    steps: int
    examples: int
    target_tokens: int
    real_tokens: int  # attention-mask sum
    cells: int  # batch rows x width: what the model computes on
    other_load: float  # CPU share other processes took during the pass

    @property
    def fill(self) -> float:
        return self.real_tokens / self.cells

    @property
    def useful_tokens_per_cpu_s(self) -> float:
        """Less sensitive to other load than the wall-clock figure (a process that waits for
        its core uses no CPU time meanwhile), though OpenMP threads spinning at a barrier still
        count: a cross-check, not the headline."""
        return self.target_tokens / self.cpu_s


# ---- data -------------------------------------------------------------------------------------


def demo_subset(folder: Path, examples: int) -> Path:
    """The first `examples` records of the demo train split, as one shard."""
    lines: list[str] = []
    for shard in sorted(common.DEMO_TRAIN.glob("*.jsonl")):
        lines += [x for x in shard.read_text(encoding="utf-8").splitlines() if x.strip()]
    if len(lines) < examples:
        raise SystemExit(f"--examples {examples}: the demo data has only {len(lines)} records")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shard-00000.jsonl").write_text("\n".join(lines[:examples]) + "\n", encoding="utf-8")
    return folder


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, count))) + "."


def wide_record(rng: random.Random, index: int, body_words: int) -> dict[str, Any]:
    """A RAFT record whose documents hold about `body_words` words; the quoted oracle (the
    answer's bulk, so the target) is a tenth of them."""
    oracle = words(rng, max(3, body_words // 10))
    rest = max(2, body_words - body_words // 10)
    docs = [{"title": f"doc {index}-{k}", "text": words(rng, rest // 2)} for k in range(2)]
    slot = rng.randint(0, 2)
    docs.insert(slot, {"title": f"oracle {index}", "text": oracle})
    return {
        "id": f"wide-{index:05d}",
        "question": f"What comes first in record {index}?",
        "documents": docs,
        "oracle_index": slot,
        "oracle": oracle,
        "cot_answer": f"It says ##begin_quote## {oracle} ##end_quote## so <ANSWER>: "
        + oracle.split()[0],
    }


def example_length(tokenizer: Any, record: dict[str, Any]) -> int:
    from raft_dist.data.records import parse_record, to_example
    from raft_dist.data.tokenize import LengthStats, encode_example

    example = to_example(parse_record(record, "bench", 1))
    encoded = encode_example(
        tokenizer,
        example.prompt,
        example.completion,
        max_len=10**9,
        overlong="truncate",
        stats=LengthStats(),
    )
    assert encoded is not None
    return len(encoded.input_ids)


def write_wide(folder: Path, examples: int, tokenizer: Any, seed: int) -> list[int]:
    """Records whose token lengths are log-uniform over WIDE_LENGTHS: each record's word count
    is fitted to its drawn length (a few tries), then its true length is measured."""
    rng = random.Random(seed)
    low, high = WIDE_LENGTHS
    lengths, lines = [], []
    for index in range(examples):
        want = int(math.exp(rng.uniform(math.log(low), math.log(high))))
        body = max(4, want // 2)
        for _ in range(6):  # tokens per word vary little: this converges in two or three
            state = rng.getstate()
            record = wide_record(rng, index, body)
            got = example_length(tokenizer, record)
            if abs(got - want) <= max(8, want // 50) or (got > high and body <= 4):
                break
            rng.setstate(state)
            body = max(4, round(body * want / got))
        if got > high:  # only a too-long record is regenerated shorter
            record = wide_record(rng, index, max(4, body * high // got - 4))
            got = example_length(tokenizer, record)
        lengths.append(got)
        lines.append(json.dumps(record))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shard-00000.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lengths


# ---- one pass -----------------------------------------------------------------------------------


def stream_for(dataset_dir: Path, mode: str, max_seq_len: int, window: int, tokenizer: Any):
    from raft_dist.data.sources import load_shards
    from raft_dist.data.streaming import RankStream, StreamSettings

    settings = StreamSettings(
        max_seq_len=max_seq_len,
        micro_batch_size=MICRO_BATCH_SIZE,
        packing=mode.startswith("packed"),
        group_by_length=window if mode == "grouped" else 0,
        seed=SEED,
    )
    return RankStream(load_shards(str(dataset_dir)), tokenizer, settings, rank=0, world_size=1)


def fresh_model(recipe: Any, tokenizer: Any, mode: str) -> Any:
    import gc

    import torch

    from raft_dist.model import load_model
    from raft_dist.packed_attention import use_per_example_attention

    gc.collect()  # the previous pass's garbage is not collected inside this one
    torch.manual_seed(SEED)
    model = load_model(recipe.model, tokenizer)
    if mode == "packed" and not use_per_example_attention(model):
        raise RuntimeError("per-example attention needs the model's SDPA attention")
    model.train()
    return model


def one_pass(
    recipe: Any,
    tokenizer: Any,
    dataset: str,
    dataset_dir: Path,
    mode: str,
    window: int,
    rep: int,
    max_batches: int | None = None,
) -> ModeRun:
    """Train one epoch of `dataset_dir` in `mode`; returns its timing and token counts."""
    import torch

    from raft_dist.evaluate import target_count, token_loss_sum

    model = fresh_model(recipe, tokenizer, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.training.lr)
    stream = stream_for(dataset_dir, mode, DATASETS[dataset], window, tokenizer)
    steps = target = real = cells = 0
    step_s = 0.0
    before = common.cpu_reading()
    started, cpu_started = time.perf_counter(), time.process_time()
    while max_batches is None or steps < max_batches:
        batch = stream.next_batch()
        if batch is None:
            break
        begin = time.perf_counter()
        loss_sum, count = token_loss_sum(model, batch)
        (loss_sum / float(count)).backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s += time.perf_counter() - begin
        steps += 1
        target += int(target_count(batch))
        real += int(batch["attention_mask"].sum())
        cells += batch["input_ids"].numel()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return ModeRun(
        dataset=dataset,
        mode=mode,
        rep=rep,
        useful_tokens_per_s=target / wall,
        wall_s=wall,
        cpu_s=cpu,
        step_s=step_s,
        steps=steps,
        examples=stream.lengths.examples,
        target_tokens=target,
        real_tokens=real,
        cells=cells,
        other_load=common.other_load(before, common.cpu_reading()),
    )


# ---- the benchmark ------------------------------------------------------------------------------


def measure(
    examples: dict[str, int] | None = None,
    reps: int = DEFAULT_REPS,
    window: int = DEFAULT_WINDOW,
    log: common.Log = print,
) -> dict[str, Any]:
    from raft_dist.config import load_recipe
    from raft_dist.model import load_tokenizer

    examples = {**DEFAULT_EXAMPLES, **(examples or {})}
    started = time.perf_counter()
    recipe = load_recipe(
        common.TINY_RECIPE, [f"data.train={common.DEMO_TRAIN}", "training.micro_batch_size=4"]
    )
    tokenizer = load_tokenizer(recipe.model)
    runs: list[ModeRun] = []
    with tempfile.TemporaryDirectory(prefix="raft-packing-bench-") as tmp:
        dirs = {
            "demo": demo_subset(Path(tmp) / "demo", examples["demo"]),
            "wide": Path(tmp) / "wide",
        }
        wide_lengths = write_wide(dirs["wide"], examples["wide"], tokenizer, SEED)
        # Untimed: the first calls of each mode and shape (lazy imports, allocator growth).
        for dataset, mode in itertools.product(DATASETS, MODES):
            one_pass(recipe, tokenizer, dataset, dirs[dataset], mode, window, 0, max_batches=2)
        for rep in range(1, reps + 1):
            for dataset in DATASETS:
                for mode in MODES:
                    run = one_pass(recipe, tokenizer, dataset, dirs[dataset], mode, window, rep)
                    runs.append(run)
                    log(
                        f"rep {rep} {dataset:<4} {mode:<7} {run.useful_tokens_per_s:7.0f} "
                        f"useful tok/s ({run.useful_tokens_per_cpu_s:5.0f} per CPU s)  "
                        f"{run.steps:3d} steps  {run.cells:6d} cells  fill {run.fill:.3f}  "
                        f"{run.wall_s:5.1f} s  other load {run.other_load:.0%}"
                    )
    return summarize(runs, examples, reps, window, wide_lengths, time.perf_counter() - started)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": common.median(values), "min": min(values), "max": max(values)}


def summarize(
    runs: list[ModeRun],
    examples: dict[str, int],
    reps: int,
    window: int,
    wide_lengths: list[int],
    wall_s: float,
) -> dict[str, Any]:
    import torch

    by = {(r.dataset, r.mode, r.rep): r for r in runs}
    datasets: dict[str, Any] = {}
    for dataset in DATASETS:
        per_mode: dict[str, Any] = {}
        for mode in MODES:
            mine = [by[dataset, mode, rep] for rep in range(1, reps + 1)]
            per_mode[mode] = {
                "useful_tokens_per_s": spread([r.useful_tokens_per_s for r in mine]),
                "ratio_to_padding": spread(
                    [
                        r.useful_tokens_per_s / by[dataset, "padding", r.rep].useful_tokens_per_s
                        for r in mine
                    ]
                ),
                "ratio_to_padding_per_cpu_s": spread(
                    [
                        r.useful_tokens_per_cpu_s
                        / by[dataset, "padding", r.rep].useful_tokens_per_cpu_s
                        for r in mine
                    ]
                ),
                "step_share_of_wall": common.median(r.step_s / r.wall_s for r in mine),
                "steps": mine[0].steps,
                "fill": mine[0].fill,
                "target_tokens": mine[0].target_tokens,
                "cells": mine[0].cells,
            }
        targets = {per_mode[m]["target_tokens"] for m in MODES}
        if len(targets) != 1:  # the same examples must give the same useful tokens
            raise RuntimeError(f"{dataset}: the modes trained different targets {targets}")
        datasets[dataset] = {
            "max_seq_len": DATASETS[dataset],
            "examples": examples[dataset],
            "modes": per_mode,
        }
    packed_wide = datasets["wide"]["modes"]["packed"]["ratio_to_padding"]["median"]
    sorted_lengths = sorted(wide_lengths)
    return {
        "unit": "target (label != -100) tokens per second over the whole pass",
        "settings": {
            "examples": examples,
            "reps": reps,
            "group_by_length_window_batches": window,
            "micro_batch_size": MICRO_BATCH_SIZE,
            "gradient_accumulation_steps": 1,
            "model": "builtin:tiny-llama (configs/tiny.yaml), float32",
            "wide_lengths": {
                "min": sorted_lengths[0],
                "median": common.median(sorted_lengths),
                "max": sorted_lengths[-1],
                "all": wide_lengths,
            },
            **common.thread_settings(torch.get_num_threads()),
        },
        "datasets": datasets,
        "runs": [
            asdict(r) | {"fill": r.fill, "useful_tokens_per_cpu_s": r.useful_tokens_per_cpu_s}
            for r in runs
        ],
        "other_load": spread([r.other_load for r in runs]),
        "target": {
            "wide packed/padding (median)": TARGET_WIDE_PACKED,
            "median": packed_wide,
            "verdict": common.verdict(packed_wide >= TARGET_WIDE_PACKED),
        },
        "wall_s": wall_s,
    }


def fmt(s: dict[str, float], digits: int) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def report_lines(summary: dict[str, Any]) -> list[str]:
    settings = summary["settings"]
    rows = []
    for dataset, result in summary["datasets"].items():
        for mode, m in result["modes"].items():
            rows.append(
                (
                    f"{dataset} @{result['max_seq_len']}",
                    mode,
                    fmt(m["useful_tokens_per_s"], 0),
                    fmt(m["ratio_to_padding"], 2),
                    fmt(m["ratio_to_padding_per_cpu_s"], 2),
                    str(m["steps"]),
                    f"{m['fill']:.3f}",
                    f"{m['step_share_of_wall']:.2f}",
                )
            )
    header = (
        "data",
        "mode",
        "useful tok/s median (min-max)",
        "x padding median (min-max)",
        "x padding per CPU s",
        "steps",
        "fill",
        "step share",
    )
    lengths = settings["wide_lengths"]
    load = summary["other_load"]
    target = summary["target"]
    return [
        f"{summary['unit']}; examples {settings['examples']}, "
        f"{settings['reps']} alternating repetitions, micro batch {settings['micro_batch_size']}, "
        f"group_by_length window {settings['group_by_length_window_batches']} batches; "
        f"wide lengths {lengths['min']}-{lengths['max']} (median {lengths['median']:.0f})",
        common.markdown_table(header, rows),
        f"other load {fmt(load, 2)} of the CPU; total {summary['wall_s']:.0f} s",
        f"target: packed >= {TARGET_WIDE_PACKED}x padding on wide: "
        f"{target['median']:.2f} {target['verdict']}",
    ]


def report_rows(summary: dict[str, Any]) -> list[common.Row]:
    """bench/run.py's combined table: the ratios to padding."""
    rows: list[common.Row] = []
    for dataset, result in summary["datasets"].items():
        for mode in ("grouped", "packed", "packed-mask"):
            ratio = result["modes"][mode]["ratio_to_padding"]
            target, verdict = "", ""
            if dataset == "wide" and mode == "packed":
                target, verdict = f">= {TARGET_WIDE_PACKED}", summary["target"]["verdict"]
            rows.append((f"{dataset} {mode}/padding useful tok/s", fmt(ratio, 2), target, verdict))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in DEFAULT_EXAMPLES.items():
        parser.add_argument(f"--{name}-examples", type=int, default=default)
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS)
    parser.add_argument(
        "--window", type=int, default=DEFAULT_WINDOW, help="data.group_by_length (batches)"
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = common.environment()
    if common.is_busy(env["load_avg_at_start"]):
        print(
            f"note: load average {env['load_avg_at_start'][0]:.2f} at the start; other work "
            "on this machine makes the figures noisy (the ratios within one run still compare)",
            flush=True,
        )
    examples = {"demo": args.demo_examples, "wide": args.wide_examples}
    summary = measure(examples, args.reps, args.window, log=common.progress)
    print("\n".join(report_lines(summary)))
    env["load_avg_at_end"] = os.getloadavg()
    payload = {"command": common.command_line(), "environment": env, **summary}
    path = common.write_json(args.out / "packing.json", payload)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
