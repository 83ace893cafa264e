"""`raft-dist pipeline`: generate -> (mix) -> train -> evaluate base vs fine-tuned, in one folder.

    <out>/data/          the generated RAFT data set (`generate`)
    <out>/train-data/    generated train split plus --train-extra, re-sharded (only with extras)
    <out>/run/           the training run (`raft-dist launch`): checkpoints, final/
    <out>/eval/          the comparison (`raft-dist eval`): report.md, report.json, plot
    <out>/stages/NAME.json  completion marker of each stage, with the settings it ran with

A re-run skips every stage whose marker holds the same settings and redoes the rest; an
interrupted stage resumes (generation and training resume by themselves). A finished stage
whose settings changed is refused, naming what changed: its outputs would no longer match.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raft_dist.atomic import swap_in_dir, temp_dir_for, write_json_atomic
from raft_dist.errors import ConfigError, RaftDistError
from raft_dist.evaluation.items import ROBUSTNESS_COUNTS

STAGES = ("generate", "mix", "train", "eval")  # in order; each leaves stages/NAME.json
MIX_SHARDS = 4  # enough for up to 4 ranks to read whole shards of similar size


@dataclass
class PipelineOptions:
    sources: list[str]
    recipe: str
    out: Path
    profile: str = "cpu"
    overrides: list[str] = field(default_factory=list)
    train_extra: list[str] = field(default_factory=list)
    eval_data: list[tuple[str, str]] = field(default_factory=list)  # (name, spec)
    eval_limit: int | None = None
    eval_batch_size: int = 8
    robustness: tuple[int, ...] = ROBUSTNESS_COUNTS
    robustness_limit: int | None = None
    launch_args: list[str] = field(default_factory=list)
    progress: bool = True
    generation: Any = None  # GenerateOptions
    backend: Any = None  # the question backend built from the generation options


class Stages:
    """Markers under <out>/stages/: a stage is done when its marker holds the same settings."""

    def __init__(self, out: Path) -> None:
        self.folder = out / "stages"
        self._started = time.perf_counter()

    def marker(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def done(self, name: str, settings: dict[str, Any]) -> bool:
        path = self.marker(name)
        if not path.is_file():
            return False
        recorded = json.loads(path.read_text(encoding="utf-8")).get("settings") or {}
        wanted = json.loads(json.dumps(settings))  # as the marker stores it (tuples -> lists)
        if recorded != wanted:
            changed = sorted(
                k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k)
            )
            raise ConfigError(
                f"stage {name} in {path.parent.parent} finished with other settings "
                f"(changed: {', '.join(changed)}); use a new --out, or delete {path} and the "
                "stages after it to redo them"
            )
        return True

    def start(self) -> None:
        self._started = time.perf_counter()

    def finish(self, name: str, settings: dict[str, Any], result: dict[str, Any]) -> None:
        """The marker, with the stage's wall time (this invocation's part of it)."""
        seconds = round(time.perf_counter() - self._started, 1)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.marker(name), {"settings": settings, "result": {**result, "seconds": seconds}}
        )

    def result(self, name: str) -> dict[str, Any]:
        return json.loads(self.marker(name).read_text(encoding="utf-8"))["result"]


def mix_training_data(generated: Path, extras: Sequence[str], out: Path, seed: int) -> int:
    """Generated train records and the extra sets, shuffled (seeded) into MIX_SHARDS shards of
    near-equal size, so every rank reads both kinds and no rank waits on a big shard."""
    from raft_dist.data.reader import iter_lines
    from raft_dist.data.sources import resolve_files

    lines: list[bytes] = []
    for spec in [str(generated), *extras]:
        for path in resolve_files(spec, "train"):
            lines += [line.raw for line in iter_lines(path)]
    random.Random(seed).shuffle(lines)
    tmp = temp_dir_for(out)
    tmp.mkdir(parents=True)
    count = min(MIX_SHARDS, max(1, len(lines)))
    for k in range(count):
        shard = b"".join(raw.rstrip(b"\r\n") + b"\n" for raw in lines[k::count])
        (tmp / f"shard-{k:05d}.jsonl").write_bytes(shard)
    swap_in_dir(tmp, out)
    return len(lines)


def model_under_test(recipe: Any, run_final: Path) -> tuple[str, str]:
    """(base spec, fine-tuned spec): a LoRA run's final/ is an adapter on the recipe's base."""
    base = recipe.model.name_or_path
    if (run_final / "adapter_config.json").is_file():
        return base, f"{base}+{run_final}"
    return base, str(run_final)


def run_pipeline(options: PipelineOptions, echo: Callable[[str], None] = print) -> dict:
    from raft_dist.config import load_recipe
    from raft_dist.generate.pipeline import generate
    from raft_dist.rundir import RunDir

    out = options.out
    stages = Stages(out)
    data_dir, mix_dir, run_dir, eval_dir = (
        out / "data",
        out / "train-data",
        out / "run",
        out / "eval",
    )
    gen_options, backend = options.generation, options.backend

    # ---- generate (resumes by itself; "up to date" when already complete)
    settings = {"sources": options.sources, **asdict(gen_options)}
    if stages.done("generate", settings):
        echo(f"[1/4] generate: done earlier ({data_dir})")
    else:
        echo(f"[1/4] generate -> {data_dir}")
        stages.start()
        result = generate(
            options.sources, data_dir, gen_options, progress=options.progress, backend=backend
        )
        echo(result.summary())
        stages.finish("generate", settings, {"splits": _split_counts(data_dir)})
    splits = stages.result("generate")["splits"]

    # ---- mix in hand-written or other extra training data
    train_spec = str(data_dir)
    if options.train_extra:
        settings = {"extra": options.train_extra, "seed": gen_options.seed}
        if stages.done("mix", settings):
            echo(f"[2/4] mix: done earlier ({mix_dir})")
        else:
            stages.start()
            records = mix_training_data(data_dir, options.train_extra, mix_dir, gen_options.seed)
            echo(f"[2/4] mix: {records} training records -> {mix_dir}")
            stages.finish("mix", settings, {"records": records})
        train_spec = str(mix_dir)
    else:
        echo("[2/4] mix: nothing to mix (no --train-extra)")

    # ---- train through the launcher, exactly as a user would
    eval_sets = options.eval_data or ([("eval", str(data_dir))] if splits.get("eval") else [])
    overrides = [
        f"data.train={train_spec}",
        f"output.dir={run_dir}",
        "training.resume=latest",
        *options.overrides,
    ]
    if eval_sets:  # the eval loss during training reads the first eval set
        overrides.insert(1, f"data.eval={eval_sets[0][1]}")
    recipe = load_recipe(options.recipe, overrides)
    settings = {"recipe": recipe.to_dict(), "profile": options.profile}
    final = RunDir(run_dir).root / "final"
    if stages.done("train", settings):
        echo(f"[3/4] train: done earlier ({final})")
    else:
        command = [
            sys.executable,
            "-m",
            "raft_dist.cli",
            "launch",
            "--profile",
            options.profile,
            "--config",
            options.recipe,
            *overrides,
            *options.launch_args,
        ]
        echo(f"[3/4] train: {' '.join(command[2:])}")
        stages.start()
        code = subprocess.call(command)
        if code != 0:
            error = RaftDistError(
                f"training stopped with exit code {code}; run the same pipeline command again "
                "to resume from the last checkpoint"
            )
            error.exit_code = code  # 75 (stopped, resumable) passes through to the caller
            raise error
        if not final.is_dir():
            raise RaftDistError(
                f"training ended without {final}: it stopped early (training.stop_after_steps) "
                "or output.save_final_model is false; run the same command again to continue"
            )
        stages.finish("train", settings, {"final": str(final)})

    # ---- evaluate base vs fine-tuned on the held-out questions
    if not eval_sets:
        echo("[4/4] eval: no eval set (give --eval-data, or generate with --eval-fraction > 0)")
        return {"run": str(run_dir)}
    base, tuned = model_under_test(recipe, final)
    settings = {
        "models": [base, tuned],
        "data": eval_sets,
        "limit": options.eval_limit,
        "batch_size": options.eval_batch_size,
        "robustness": list(options.robustness),
        "robustness_limit": options.robustness_limit,
    }
    if stages.done("eval", settings):
        echo(f"[4/4] eval: done earlier ({eval_dir})")
        return {**stages.result("eval"), "earlier": True}
    echo(f"[4/4] eval: {base} vs {tuned}")
    stages.start()
    report = evaluate_stage(options, [base, tuned], eval_sets, eval_dir)
    result = {"report": report["files"], "run": str(run_dir)}
    stages.finish("eval", settings, result)
    return result


def _split_counts(data_dir: Path) -> dict[str, int]:
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    return {name: int(info["records"]) for name, info in manifest["splits"].items()}


def evaluate_stage(
    options: PipelineOptions, models: list[str], eval_sets: list[tuple[str, str]], out: Path
) -> dict:
    """`raft-dist eval` over the training profile's processes (each answers its own part of
    the questions: on CPU, decoding gains more from two processes than from two threads), or
    in this process for one process and for DeepSpeed profiles (eval loads whole models)."""
    from raft_dist.launcher import plan_launch

    args = [arg for model in models for arg in ("--model", model)]
    args += [arg for name, spec in eval_sets for arg in ("--data", f"{name}={spec}")]
    args += ["--out", str(out), "--robustness", ",".join(map(str, options.robustness)) or "off"]
    args += ["--batch-size", str(options.eval_batch_size)]
    if options.eval_limit is not None:
        args += ["--limit", str(options.eval_limit)]
    if options.robustness_limit is not None:
        args += ["--robustness-limit", str(options.robustness_limit)]
    if not options.progress:
        args.append("--no-progress")
    entry = ["-m", "raft_dist.cli", "eval", *args]
    plan = plan_launch(options.profile, options.recipe, [], options.launch_args, entry=entry)
    if plan.world_size > 1 and plan.engine != "deepspeed":
        print(f"+ {' '.join(plan.command[2:])}", file=sys.stderr, flush=True)
        code = subprocess.call(plan.command, env={**os.environ, **plan.env})
    else:
        from raft_dist.cli import main as cli_main

        code = cli_main(entry[2:])
    if code != 0:
        raise RaftDistError(f"evaluation exited with code {code} (see the messages above)")
    return json.loads((out / "report.json").read_text(encoding="utf-8"))
