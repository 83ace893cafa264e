"""Run every benchmark, print one table, keep the numbers and a plot in bench/results/.

    python bench/run.py [--pairs 5] [--steps 12] [--runs 7] [--out bench/results]
        [--eval-model builtin:tiny-llama] [--eval-examples 16] [--eval-repeats 3] ...

A benchmark is a name, a function that measures and returns a JSON-able dict, and a function that
turns that dict into table rows (metric, value, target, verdict). Add new ones to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attention_bench  # noqa: E402
import cli_startup  # noqa: E402
import common  # noqa: E402
import compile_bench  # noqa: E402
import eval_bench  # noqa: E402
import lora_bench  # noqa: E402
import memory_bench  # noqa: E402
import packing_bench  # noqa: E402
import prefill_bench  # noqa: E402
import process_exit  # noqa: E402
import prompt_logits_bench  # noqa: E402
import throughput  # noqa: E402
import zero_bench  # noqa: E402
from common import Row  # noqa: E402


@dataclass
class Benchmark:
    name: str
    measure: Callable[[argparse.Namespace], dict[str, Any]]
    rows: Callable[[dict[str, Any]], list[Row]]


def cli_rows(result: dict[str, Any]) -> list[Row]:
    med = result["median_s"]
    target = result["target"]
    return [
        (
            "raft-dist --help (s)",
            f"{med['raft_dist_help']:.3f}",
            f"< {target['raft_dist_help_below_s']}",
            target["verdict"],
        ),
        ("python -c pass (s)", f"{med['python_pass']:.3f}", "", ""),
        ("added by raft-dist (s)", f"{result['added_by_raft_dist_s']:.3f}", "", ""),
        (
            "launch --dry-run, answers kept (s)",
            f"{med['launch_dry_run_kept']:.3f}",
            f"< {target['launch_kept_below_s']}",
            target["launch_verdict"],
        ),
        ("launch --dry-run, Accelerate asked (s)", f"{med['launch_dry_run_asked']:.3f}", "", ""),
        (
            "launch asked/kept",
            "{median:.1f} ({min:.1f}-{max:.1f})".format(**result["launch_asked_over_kept"]),
            "",
            "",
        ),
    ]


def throughput_rows(result: dict[str, Any]) -> list[Row]:
    model = result["settings"].get("model", "builtin:tiny-llama").removeprefix("builtin:")
    rows: list[Row] = [
        (f"{loop} tok/s, {model} (median)", f"{result['median_tokens_per_s'][loop]:.0f}", "", "")
        for loop in throughput.LOOPS
    ]
    for name, verdict in result["targets"].items():
        rows.append(
            (
                f"{name}, {model} (median ratio)",
                f"{verdict['median']:.3f} ({verdict['range'][0]:.2f}-{verdict['range'][1]:.2f})",
                f">= {verdict['target']}",
                verdict["verdict"],
            )
        )
    return rows


BENCHMARKS = [
    Benchmark("cli_startup", lambda a: cli_startup.measure(a.runs), cli_rows),
    Benchmark(
        # Whole tiny runs (one process, and a 2-process launch) ended by os._exit against the
        # same runs ended by the interpreter's teardown.
        "process_exit",
        lambda a: process_exit.measure(a.exit_pairs),
        process_exit.report_rows,
    ),
    Benchmark(
        "throughput",
        lambda a: throughput.run_pairs(a.pairs, a.steps, a.quiet_wait, log=common.progress),
        throughput_rows,
    ),
    Benchmark(
        # Where users live: the embedded SmolLM2 at RAFT lengths (fewer, shorter pairs: a step
        # costs ~100 tiny ones).
        "throughput_smollm2",
        lambda a: throughput.run_pairs(
            a.smollm2_pairs,
            throughput.MODELS["smollm2"].steps,
            a.quiet_wait,
            log=common.progress,
            model="smollm2",
        ),
        throughput_rows,
    ),
    Benchmark(
        "zero",
        lambda a: zero_bench.measure(a.zero_steps, a.zero_rounds, out=a.out, log=common.progress),
        zero_bench.report_rows,
    ),
    # The layout the ZeRO paper's formula describes (bf16 weights and gradients, fp32 master
    # and moments); bf16 matmuls are slow on this CPU, so only DDP and the target profile run.
    Benchmark(
        "zero_bf16",
        lambda a: zero_bench.measure(
            a.zero_bf16_steps,
            a.zero_rounds,
            out=a.out,
            log=common.progress,
            precision="bf16",
            profiles=zero_bench.chosen_profiles(zero_bench.TARGET_PROFILE),
        ),
        zero_bench.report_rows,
    ),
    Benchmark("lora", lambda a: lora_bench.measure(log=common.progress), lora_bench.report_rows),
    Benchmark(
        "eval",
        lambda a: eval_bench.measure(
            a.eval_model,
            a.eval_examples,
            a.eval_new_tokens,
            a.eval_repeats,
            a.eval_batch_sizes,
            a.eval_dtype,
            a.eval_device,
            log=common.progress,
        ),
        eval_bench.report_rows,
    ),
    Benchmark(
        # One rank's share of the demo's evaluation: each prompt prefilled alone vs padded.
        "prefill",
        lambda a: prefill_bench.measure(quiet_wait_s=a.quiet_wait, log=common.progress),
        prefill_bench.report_rows,
    ),
    Benchmark(
        "compile",
        lambda a: compile_bench.measure(quiet_wait_s=a.quiet_wait, log=common.progress),
        compile_bench.report_rows,
    ),
    Benchmark(
        "packing",
        lambda a: packing_bench.measure(log=common.progress),
        packing_bench.report_rows,
    ),
    Benchmark(
        # The demo's LoRA step with all logits against the prompt's trimmed (logits_to_keep).
        "prompt_logits",
        lambda a: prompt_logits_bench.measure(quiet_wait_s=a.quiet_wait, log=common.progress),
        prompt_logits_bench.report_rows,
    ),
    Benchmark(
        # The same step on one core: fp32/bf16 frozen weights, SDPA/eager attention.
        "attention",
        lambda a: attention_bench.measure(quiet_wait_s=a.quiet_wait, log=common.progress),
        attention_bench.report_rows,
    ),
    Benchmark(
        # Peak RSS of a SmolLM2 step with/without gradient checkpointing (fp32), and of the
        # token loss with/without chunking at a 128k vocabulary; a fresh process per figure.
        "memory",
        lambda a: memory_bench.measure(log=common.progress),
        memory_bench.report_rows,
    ),
]


def plot_throughput(result: dict[str, Any], path: Path) -> None:
    """Per-pair tokens/s of each loop: the spread shows how far to trust the medians."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(range(1, len(result["runs"]) + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    for loop in throughput.LOOPS:
        speeds = [run[loop]["tokens_per_s"] for run in result["runs"]]
        ax.plot(pairs, speeds, marker="o", label=loop)
    for pair, load in enumerate(result["other_load_per_pair"], start=1):
        if load > common.QUIET_SHARE:
            ax.axvspan(pair - 0.4, pair + 0.4, color="grey", alpha=0.2, lw=0)
            ax.annotate(f"other load {load:.0%}", (pair, 0), ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("pair (runs in the order " + ", ".join(throughput.LOOPS) + ")")
    ax.set_ylabel("non-pad input tokens / s")
    ax.set_xticks(pairs)
    ax.set_ylim(bottom=0)
    ratio = result["median_ratio"]
    ax.set_title(
        "tiny-llama, fp32, CPU: "
        + ", ".join(f"{name} {value:.2f}" for name, value in ratio.items())
        + " (median)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=throughput.DEFAULT_PAIRS)
    parser.add_argument("--steps", type=int, default=throughput.DEFAULT_STEPS)
    parser.add_argument(
        "--smollm2-pairs", type=int, default=throughput.MODELS["smollm2"].pairs, metavar="N"
    )
    parser.add_argument("--runs", type=int, default=cli_startup.DEFAULT_RUNS)
    parser.add_argument("--exit-pairs", type=int, default=process_exit.DEFAULT_PAIRS, metavar="N")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=throughput.DEFAULT_QUIET_WAIT_S,
        metavar="S",
        help="seconds in all to wait for other load to leave the CPU",
    )
    parser.add_argument("--zero-steps", type=int, default=zero_bench.DEFAULT_STEPS)
    parser.add_argument("--zero-rounds", type=int, default=zero_bench.DEFAULT_ROUNDS)
    parser.add_argument("--zero-bf16-steps", type=int, default=zero_bench.BF16_STEPS)
    eval_bench.add_arguments(parser)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument(
        "--only", nargs="*", choices=[b.name for b in BENCHMARKS], help="run only these benchmarks"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    env = common.environment()
    if common.is_busy(env["load_avg_at_start"]):
        print(
            f"note: load average {env['load_avg_at_start'][0]:.2f} at the start; other work "
            "on this machine makes the figures noisy",
            flush=True,
        )
    results: dict[str, Any] = {}
    rows: list[Row] = []
    for bench in BENCHMARKS:
        if args.only and bench.name not in args.only:
            continue
        print(f"== {bench.name}", flush=True)
        bench_started = time.perf_counter()
        results[bench.name] = bench.measure(args)
        results[bench.name]["bench_wall_s"] = time.perf_counter() - bench_started
        rows.extend(bench.rows(results[bench.name]))
    for name in ("throughput", "throughput_smollm2"):
        if name in results:
            print("\n".join(throughput.report_lines(results[name])))
    for name in ("zero", "zero_bf16"):
        if name in results:
            print("\n\n".join(zero_bench.report_lines(results[name])))
    if "eval" in results:
        print("\n".join(eval_bench.report_lines(results["eval"])))
    wall = time.perf_counter() - started
    env["load_avg_at_end"] = os.getloadavg()
    print()
    print(common.markdown_table(("metric", "value", "target", "verdict"), rows))
    print(f"\ntotal {wall:.0f} s")

    payload = {
        "command": common.command_line(),
        "environment": env,
        "wall_s": wall,
        "results": results,
    }
    written = [common.write_json(args.out / "latest.json", payload)]
    if "throughput" in results:
        plot = args.out / "throughput.png"
        plot_throughput(results["throughput"], plot)
        written.append(plot)
    if "lora" in results:
        print(lora_bench.tables(results["lora"]))
        written.append(common.write_json(args.out / "lora.json", results["lora"]))
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
