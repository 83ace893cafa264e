"""`raft-dist eval`: answer held-out questions with one or more models and compare them."""

from __future__ import annotations

import click

from raft_dist.errors import ConfigError
from raft_dist.evaluation.items import ROBUSTNESS_COUNTS
from raft_dist.evaluation.models import DTYPES
from raft_dist.evaluation.run import AUTO_BUDGET_EXTRA, AUTO_BUDGET_FACTOR, AUTO_BUDGET_MAX

# Options `ask` and `pipeline` share with `eval` (one definition, one help text).
dtype_option = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="auto: bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else float32.",
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."
)
robustness_option = click.option(
    "--robustness",
    default=",".join(map(str, ROBUSTNESS_COUNTS)),
    show_default=True,
    help="Distractor counts for the robustness curve (oracle + k distractors re-sampled from "
    "the set's own documents), or 'off'.",
)
robustness_limit_option = click.option(
    "--robustness-limit",
    type=int,
    default=None,
    help="Pose the robustness variants for a seeded sample of N questions per set [all].",
)


def parse_counts(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    try:
        counts = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(
            f"--robustness {text}: give distractor counts like 0,1,2,4,8, or 'off'"
        ) from None
    if any(k < 0 for k in counts):
        raise ConfigError(f"--robustness {text}: counts must be 0 or more")
    return counts


def parse_data(values: tuple[str, ...]) -> list[tuple[str, str]]:
    """`PATH` or `NAME=PATH`; names label the sets in the report."""
    sets, names = [], set()
    for value in values:
        name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        name = name or path.rstrip("/").replace("\\", "/").split("/")[-1] or path
        if name in names:
            raise ConfigError(f"--data {value}: the name {name!r} is used twice; write NAME=PATH")
        names.add(name)
        sets.append((name, path))
    return sets


@click.command("eval")
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    help="Model folder, hub id or builtin:smollm2, optionally +ADAPTER_FOLDER (a LoRA run's "
    "final/). Repeat to compare; the first is the baseline, e.g. --model builtin:smollm2 "
    "--model builtin:smollm2+runs/demo/final.",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    help="Eval set: a data set folder (its eval/ split), a folder of .jsonl, a glob or one "
    "file, in any format the readers accept. NAME=PATH names it in the report; repeatable.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Report folder: report.md, report.json, predictions.jsonl, robustness.png.",
)
@click.option(
    "--max-new-tokens",
    type=int,
    default=None,
    help=f"Generation budget per answer [{AUTO_BUDGET_FACTOR} x the longest gold completion "
    f"+ {AUTO_BUDGET_EXTRA}, at most {AUTO_BUDGET_MAX}].",
)
@click.option(
    "--batch-size", type=int, default=8, show_default=True, help="Prompts per generate call."
)
@click.option(
    "--limit", type=int, default=None, help="Evaluate only the first N questions of each set."
)
@robustness_option
@robustness_limit_option
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds the distractor re-sampling."
)
@dtype_option
@device_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def eval_command(
    models: tuple[str, ...],
    data: tuple[str, ...],
    out: str,
    max_new_tokens: int | None,
    batch_size: int,
    limit: int | None,
    robustness: str,
    robustness_limit: int | None,
    seed: int,
    dtype: str,
    device: str,
    progress: bool,
) -> None:
    """Score models on questions with documents: EM/F1 on the final answer, answer contained,
    quote fidelity, oracle present vs absent, and the distractor robustness curve.

    \b
    Base vs fine-tuned on the demo's held-out questions:
      raft-dist eval --model builtin:smollm2 --model runs/demo/final \\
          --data data/demo/eval --out runs/demo/eval
    Several processes (each answers its own part):
      accelerate launch --num_processes 2 --cpu -m raft_dist.cli eval ...
    """
    from pathlib import Path

    from raft_dist.evaluation.models import ModelSpec
    from raft_dist.evaluation.report import render_markdown
    from raft_dist.evaluation.run import EvalOptions, run_eval

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    options = EvalOptions(
        models=[ModelSpec.parse(m) for m in models],
        data=parse_data(data),
        out=Path(out),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        limit=limit,
        robustness_counts=parse_counts(robustness),
        robustness_limit=robustness_limit,
        seed=seed,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    report = run_eval(options)
    if report is None:  # not the main process
        return
    click.echo(render_markdown(report))
    for kind, path in report["files"].items():
        click.echo(f"{kind:12} {path}")
