"""Where a run starts: which checkpoint it resumes from, checked before anything is loaded, and a
run folder made to agree with that checkpoint.

Rules, decided on rank 0 (every rank sees one folder: loop.py checks that) and shared:
- training.resume=null starts fresh, and refuses a folder that holds a previous run.
- training.resume=latest takes the newest intact checkpoint. A damaged newer one (a file
  missing, truncated or unreadable: train/manifest.py) is named, moved aside to
  `damaged-step-N` (kept for inspection, never pruned or loaded) and the one before is tried;
  with no checkpoint yet it starts fresh (a requeued job's first attempt).
- training.resume=PATH takes that checkpoint or fails naming the damaged file.
- The checkpoint's recipe must match the current one in everything that changes the training
  trajectory, unless training.resume_with_changed_recipe=true.
- Lines that metrics.jsonl and the record audits got after the checkpoint (a run killed between
  checkpoints) are dropped: the resumed run writes them again, once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raft_dist.atomic import write_atomic
from raft_dist.errors import ConfigError
from raft_dist.rundir import RunDir
from raft_dist.train.checkpoint import (
    LR_SCHEDULE,
    RECIPE,
    TRAINER_STATE,
    audit_state_file,
    data_state_file,
    list_checkpoints,
)
from raft_dist.train.manifest import problem_with, read_manifest

# Recipe keys a resume may change: they decide where output goes, what is logged or when the
# run pauses, never which updates the weights get (training.compile changes how the same
# updates are computed, at most their rounding).
MAY_CHANGE = (
    "training.compile",
    "training.resume",
    "training.resume_with_changed_recipe",
    "training.stop_after_steps",
    "training.save_every",
    "training.keep_last",
    "training.log_every",
    "training.eval_every",
    "training.eval_batches",
    "training.eval_at_start",
    "training.ops_cache_dir",
    "training.process_group_timeout_s",
    "data.eval",
    "data.record_audit",
    "data.prefetch_batches",
    "data.token_cache",
    "output.",
    "logging.",
)


def choose_checkpoint(
    resume: str | None, paths: RunDir, world_size: int, recipe: dict[str, Any], log: Any
) -> Path | None:
    """The checkpoint to load (None: start fresh). Raises ConfigError with the reason."""
    found = list_checkpoints(paths.checkpoints)
    if resume is None:
        if found:
            raise ConfigError(
                f"output.dir already holds checkpoints in {paths.checkpoints}; pass "
                "training.resume=latest to continue that run, or choose another output.dir"
            )
        _refuse_previous_run(paths)
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"training.resume: {resume} is not a checkpoint folder")
        problem = _check(path, world_size)
        if problem:
            raise ConfigError(f"training.resume: {path} is damaged: {problem}")
        _check_recipe(path, recipe)
        return path
    damaged: list[tuple[Path, str]] = []
    for path in reversed(found):
        problem = _check(path, world_size)
        if problem is None:
            for bad, why in damaged:
                aside = _move_aside(bad)
                log.warning(
                    "checkpoint %s is damaged (%s): moved to %s; resuming from %s instead",
                    bad,
                    why,
                    aside.name,
                    path.name,
                )
            _check_recipe(path, recipe)
            return path
        damaged.append((path, problem))
    if damaged:
        listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise ConfigError(
            f"training.resume=latest: no intact checkpoint in {paths.checkpoints} ({listing}). "
            "Nothing was loaded or changed; move them away to start over."
        )
    _refuse_previous_run(paths, finished_only=True)
    return None


def _check(path: Path, world_size: int) -> str | None:
    try:
        saved_world = read_manifest(path).get("world_size")
    except ValueError:
        saved_world = None
    if saved_world is not None and saved_world != world_size:
        raise ConfigError(
            f"training.resume: {path} was written by {saved_world} processes, this run has "
            f"{world_size}; every rank's data position is saved per rank, so resume with the "
            "same world size"
        )
    required = [TRAINER_STATE, RECIPE, LR_SCHEDULE]
    for rank in range(world_size):
        # Accelerate's RNG file name; it loads a broken one without a word (manifest.py).
        required += [data_state_file(path, "train", rank).name, f"random_states_{rank}.pkl"]
    return problem_with(path, required)


def checkpoint_state(path: Path | None) -> dict[str, Any]:
    """The checkpoint's TrainState as saved (an empty one for a fresh start)."""
    if path is None:
        return {"step": 0, "evals": []}
    return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))


def _move_aside(path: Path) -> Path:
    target = path.with_name(f"damaged-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}.{n}")
    os.replace(path, target)
    return target


def _refuse_previous_run(paths: RunDir, finished_only: bool = False) -> None:
    """A fresh start must not overwrite a finished model or mix two runs in one metrics log."""
    if paths.final.exists():
        raise ConfigError(
            f"output.dir {paths.root} holds a finished run ({paths.final.name}/) and no "
            "checkpoint to resume from; choose another output.dir, or move final/ away to "
            "train again there"
        )
    if not finished_only and paths.metrics.is_file() and paths.metrics.stat().st_size:
        raise ConfigError(
            f"output.dir {paths.root} holds a previous run's {paths.metrics.name}; choose "
            "another output.dir, or pass training.resume=latest to continue that run"
        )


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every trajectory-changing key that differs."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        if any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in MAY_CHANGE):
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_recipe(path: Path, recipe: dict[str, Any]) -> None:
    saved = json.loads((path / RECIPE).read_text(encoding="utf-8"))
    changes = changed_keys(saved, recipe)
    if changes and not recipe["training"]["resume_with_changed_recipe"]:
        raise ConfigError(
            f"training.resume: the recipe differs from the one {path.name} was trained with, "
            f"in keys that change the training: {'; '.join(changes)}. Resume with the same "
            "recipe, or pass training.resume_with_changed_recipe=true to accept the change."
        )


def trim_metrics(paths: RunDir, state: dict[str, Any]) -> None:
    """Keep the metrics.jsonl lines the checkpoint's state accounts for (rank 0): training lines
    up to its step and the evaluations it recorded. Later ones came from a killed attempt, and
    so does an evaluation logged at the checkpoint's own step after it was saved (the final
    evaluation of a run that then died, or that is resumed after finishing): the resumed run
    logs them again, once."""
    if not paths.metrics.is_file():
        return
    evaluated = {e.get("step") for e in state.get("evals", [])}
    kept = []
    for line in paths.metrics.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            logged = json.loads(line)
        except ValueError:  # a line torn by a kill
            continue
        step = logged.get("step")
        if not isinstance(step, int) or step > state["step"]:
            continue
        if "eval_loss" in logged and step not in evaluated:
            continue
        kept.append(line)
    write_atomic(paths.metrics, "".join(kept).encode("utf-8"))


def trim_audit(paths: RunDir, rank: int, checkpoint: Path | None) -> int:
    """Cut rank's record audit to what it held at the checkpoint; returns its line count."""
    audit = paths.audit(rank)
    keep = 0
    if checkpoint is not None and audit_state_file(checkpoint, rank).is_file():
        keep = json.loads(audit_state_file(checkpoint, rank).read_text(encoding="utf-8"))["lines"]
    if not audit.is_file():
        return 0
    lines = audit.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]
    write_atomic(audit, "".join(lines).encode("utf-8"))
    return len(lines)
