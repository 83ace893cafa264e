"""The `raft-dist` command line. Heavy libraries are imported inside commands, never at the top:
`raft-dist --help` must stay instant (a test checks that torch is not imported)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import click

from raft_dist import __version__
from raft_dist.cli_ask import ask
from raft_dist.cli_cache import cache
from raft_dist.cli_eval import eval_command
from raft_dist.cli_generate import convert, generate, validate
from raft_dist.cli_pipeline import pipeline
from raft_dist.errors import RaftDistError
from raft_dist.process import exit_now

RECIPE_HELP = "Training recipe (YAML), e.g. configs/tiny.yaml."
OVERRIDES_HELP = "Recipe overrides as section.key=value, e.g. training.max_steps=100."


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="raft-dist")
def cli() -> None:
    """RAFT fine-tuning of causal language models, from a laptop CPU to a Slurm cluster.

    \b
    Quick start (CPU, 2 processes):
      raft-dist launch --profile cpu --config configs/tiny.yaml
    One process, no launcher:
      raft-dist train --config configs/tiny.yaml training.max_steps=20
    """


@cli.command()
@click.option(
    "--config", "recipe_path", required=True, type=click.Path(dir_okay=False), help=RECIPE_HELP
)
@click.argument("overrides", nargs=-1)
def train(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Train in this process (alone, or as one rank started by `accelerate launch`).

    \b
    Examples:
      raft-dist train --config configs/tiny.yaml output.dir=runs/try training.seed=7
      raft-dist train --config configs/tiny.yaml training.resume=latest
    """
    from raft_dist.config import load_recipe
    from raft_dist.train.loop import train as run_training

    recipe = load_recipe(recipe_path, overrides)
    run_training(recipe)  # returns with files closed and synced, trackers and group closed


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--profile",
    default="cpu",
    show_default=True,
    help="Launch profile: a name from accelerate_configs/ (cpu, single_gpu, multi_gpu, "
    "multi_node, ...) or a path to any accelerate config file.",
)
@click.option(
    "--config", "recipe_path", required=True, type=click.Path(dir_okay=False), help=RECIPE_HELP
)
@click.option(
    "--dry-run", is_flag=True, help="Print the resolved recipe and the exact command, run nothing."
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch(profile: str, recipe_path: str, dry_run: bool, args: tuple[str, ...]) -> int:
    """Start `accelerate launch` with a profile and a recipe.

    ARGS are recipe overrides (section.key=value) and any other `accelerate launch` options,
    which are passed through (e.g. --num_processes 4 --machine_rank 1).

    \b
    Examples:
      raft-dist launch --profile cpu --config configs/tiny.yaml training.max_steps=50
      raft-dist launch --profile multi_gpu --config configs/demo.yaml --num_processes 8
      raft-dist launch --profile multi_node --config r.yaml --machine_rank 1 \\
          --main_process_ip 10.0.0.1
    """
    from raft_dist.adapters import check_combination
    from raft_dist.config import load_recipe
    from raft_dist.data.check import check_data, write_stamp
    from raft_dist.launcher import EXIT_STOPPED, describe, plan_launch, run, split_args
    from raft_dist.model import resolve_pretrained
    from raft_dist.rundir import RunDir

    overrides, accelerate_args = split_args(list(args))
    recipe = load_recipe(recipe_path, overrides)
    plan = plan_launch(profile, recipe_path, overrides, accelerate_args)
    # Before the ranks start (and in a dry run): a quantization the profile's engine cannot use.
    check_combination(recipe, plan.zero_stage)
    if dry_run:
        click.echo("# resolved recipe")
        click.echo(recipe.to_yaml())
        click.echo("# command")
        click.echo(describe(plan))
        return 0
    if plan.machine_rank == 0:
        # The one full check of the data; the stamp tells the ranks they need not repeat it.
        # Other machines skip it: global rank 0 runs on machine 0 and reads the stamp there.
        check = check_data(recipe.data)
        write_stamp(RunDir(Path(recipe.output.dir)).data_stamp, check, recipe.data)
        click.echo(f"data ok: {check.counts()}", err=True)
    resolve_pretrained(recipe.model.name_or_path)  # convert the bundled model once, not per rank
    click.echo(f"+ {describe(plan)}", err=True)
    run_dir = RunDir(Path(recipe.output.dir))
    code = run(plan, run_dir)
    if code == EXIT_STOPPED:
        stopped = json.loads(run_dir.stopped.read_text(encoding="utf-8"))
        click.echo(
            f"stopped after step {stopped['step']} ({stopped['detail'] or stopped['reason']}): "
            f"the checkpoint is saved; exit code {EXIT_STOPPED}. Continue with "
            "training.resume=latest (the sbatch templates requeue the job).",
            err=True,
        )
        return EXIT_STOPPED
    if code != 0:
        raise RaftDistError(f"training exited with code {code} (see the messages above)")
    return 0


@cli.command("recipe")
@click.option(
    "--config", "recipe_path", required=True, type=click.Path(dir_okay=False), help=RECIPE_HELP
)
@click.option("--get", "key", default=None, help="Print one value, e.g. output.dir.")
@click.argument("overrides", nargs=-1)
def recipe_command(recipe_path: str, key: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved recipe (YAML + overrides, validated), or one value of it.

    \b
    Examples:
      raft-dist recipe --config configs/tiny.yaml training.max_steps=50
      raft-dist recipe --config configs/tiny.yaml --get output.dir
    """
    from raft_dist.config import load_recipe
    from raft_dist.errors import ConfigError

    recipe = load_recipe(recipe_path, overrides)
    if key is None:
        click.echo(recipe.to_yaml(), nl=False)
        return
    value: object = recipe.to_dict()
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"--get {key}: no such key in the recipe")
        value = value[part]
    click.echo("null" if value is None else value)


@cli.command()
@click.option("--base", required=True, help="Full-precision base model: folder or hub id.")
@click.option(
    "--adapter",
    required=True,
    type=click.Path(file_okay=False),
    help="PEFT adapter folder (a LoRA/QLoRA run's final/).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for the merged model."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="dtype of the merged weights.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace --out if it already exists (refused otherwise)."
)
def merge(base: str, adapter: str, out: str, dtype: str, overwrite: bool) -> None:
    """Merge a LoRA/QLoRA adapter into its base and save a plain transformers model.

    The base is reloaded in full precision; a quantized base is refused (merging into 4-bit
    weights is lossy).

    \b
    Example:
      raft-dist merge --base models/base --adapter runs/lora/final --out models/merged
    """
    from raft_dist.merge import merge_adapter

    click.echo(f"merged model: {merge_adapter(base, adapter, out, dtype, overwrite=overwrite)}")


cli.add_command(generate)
cli.add_command(validate)
cli.add_command(convert)
cli.add_command(eval_command)
cli.add_command(ask)
cli.add_command(pipeline)
cli.add_command(cache)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user mistakes become one `error:` line and exit code 2."""
    try:
        result = cli.main(args=argv, prog_name="raft-dist", standalone_mode=False)
    except RaftDistError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    return result if isinstance(result, int) else 0


def run(argv: list[str] | None = None) -> NoReturn:
    """The process entry point (the `raft-dist` script, `python -m raft_dist.cli`, each rank's
    launch/train.py): main(), then an exit without interpreter finalization.

    With torch and transformers imported, finalization takes 1-2.5 s on 2 cores, after the
    command's work is done: every `raft-dist train`, every rank, every evaluation paid it (the
    launcher's accelerate agent skips it the same way, accelerate_agent.py). Under load, a
    library thread of the CPU collectives was also seen to abort a rank during it ("terminate
    called without an active exception"), turning a finished run into a failed launch. Nothing
    is left to do there: files are written whole and synced as they go (atomic.py), trackers
    and the process group are closed by the loop, and an unexpected exception still ends with
    its traceback and the usual exit. Only the standard streams need flushing.
    """
    exit_now(main(argv))


if __name__ == "__main__":
    run()
