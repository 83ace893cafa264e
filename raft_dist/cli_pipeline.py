"""`raft-dist pipeline`: your documents in, a fine-tuned model and its comparison out."""

from __future__ import annotations

from typing import Any

import click

from raft_dist.cli_eval import robustness_limit_option, robustness_option
from raft_dist.cli_generate import generation_options


@click.command("pipeline")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCES... [OVERRIDES]...")
@click.option(
    "--config", "recipe", required=True, type=click.Path(dir_okay=False), help="Training recipe."
)
@click.option(
    "--profile",
    default="cpu",
    show_default=True,
    help="Launch profile for training (cpu, single_gpu, multi_gpu, multi_node, a path).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Pipeline folder: data/, train-data/, run/, eval/, stages/.",
)
@click.option(
    "--train-extra",
    multiple=True,
    help="More training data (any format the readers accept) mixed into the generated train "
    "split, e.g. hand-written questions; repeatable.",
)
@click.option(
    "--eval-data",
    multiple=True,
    help="Eval set as NAME=PATH (repeatable) instead of the generated eval split; the first "
    "is also the eval loss during training.",
)
@click.option("--eval-limit", type=int, default=None, help="Questions per eval set [all].")
@click.option(
    "--eval-batch-size",
    type=int,
    default=8,
    show_default=True,
    help="Prompts per generate call in eval; on CPU larger batches save decoding steps.",
)
@robustness_option
@robustness_limit_option
@click.option(
    "--launch-arg",
    "launch_args",
    multiple=True,
    help="Passed to `accelerate launch` as is, e.g. --launch-arg=--num_processes=4.",
)
@generation_options
@click.option("--progress/--no-progress", default=True, show_default=True)
def pipeline(
    sources: tuple[str, ...],
    recipe: str,
    profile: str,
    out: str,
    train_extra: tuple[str, ...],
    eval_data: tuple[str, ...],
    eval_limit: int | None,
    eval_batch_size: int,
    robustness: str,
    robustness_limit: int | None,
    launch_args: tuple[str, ...],
    progress: bool,
    **params: Any,
) -> None:
    """Generate RAFT data from SOURCES, fine-tune through `raft-dist launch`, then evaluate the
    base model against the fine-tuned one. Recipe overrides (section.key=value) may follow the
    sources. Each stage leaves a marker in OUT/stages/: a re-run skips finished stages and
    resumes an interrupted one.

    \b
    Example (the demo, `make demo`):
      raft-dist pipeline data/demo_source/trained --config configs/demo.yaml --profile cpu \\
          --out runs/demo --train-extra data/demo/train \\
          --eval-data held-out=data/demo --eval-data unseen=data/demo/unseen
    """
    from pathlib import Path

    from raft_dist.cli_eval import parse_counts, parse_data
    from raft_dist.cli_generate import generation_settings
    from raft_dist.pipeline import PipelineOptions, run_pipeline

    # Recipe overrides look like sources to click (both are bare words): split them here.
    given = list(sources)
    generation, backend = generation_settings(params)
    options = PipelineOptions(
        sources=[s for s in given if "=" not in s],
        recipe=recipe,
        out=Path(out),
        profile=profile,
        overrides=[s for s in given if "=" in s],
        train_extra=list(train_extra),
        eval_data=parse_data(eval_data),
        eval_limit=eval_limit,
        eval_batch_size=eval_batch_size,
        robustness=parse_counts(robustness),
        robustness_limit=robustness_limit,
        launch_args=list(launch_args),
        progress=progress,
        generation=generation,
        backend=backend,
    )
    result = run_pipeline(options, echo=lambda text: click.echo(text, err=True))
    if result.get("earlier"):  # nothing ran: show the comparison made then
        click.echo(Path(result["report"]["markdown"]).read_text(encoding="utf-8"))
    click.echo(f"{'run':12} {result['run']}")
