"""Crash-safe checkpoints: Accelerate state + every rank's own data position + a manifest.

A checkpoint is written into a hidden temporary folder: every rank writes its part and fsyncs
the folder, rank 0 writes the manifest (train/manifest.py) last, and only then renames the
folder into place and fsyncs its parent. A kill at any moment leaves the previous checkpoint
untouched; a save that fails (disk full) is removed and reported on every rank. Which checkpoint
a resume loads, and what it checks first, is train/resume.py's job.

    step-XXXXXXXX/
      model.safetensors | adapter/    weights (LoRA: the adapter only)
      optimizer.bin, random_states_N.pkl, ...   Accelerate's (or DeepSpeed's) own files
      data_train_rankN.json           rank N's data position
      audit_rankN.json                rank N's record audit length (data.record_audit)
      lr_schedule.json                the LR schedule's state
      recipe.json                     the recipe this checkpoint was trained with
      trainer_state.json              TrainState
      checkpoint-manifest.json        every file above with its size (and sha256), written last
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from raft_dist.atomic import folder_size, save_failure, write_json_atomic
from raft_dist.distributed import sum_over_ranks
from raft_dist.errors import ConfigError, SaveError
from raft_dist.train.deepspeed import deepspeed_plugin
from raft_dist.train.manifest import fsync_dir, fsync_tree, write_manifest
from raft_dist.train.state import TrainState

STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.json"
RECIPE = "recipe.json"
# The LR schedule's state as JSON. It used to go through Accelerate's register_for_checkpointing,
# which loads custom_checkpoint_N.pkl with weights_only=False: a crafted checkpoint could run
# code on resume. raft-dist registers nothing, so Accelerate loads no such pickle.
LR_SCHEDULE = "lr_schedule.json"


def data_state_file(checkpoint: Path, name: str, rank: int) -> Path:
    return checkpoint / f"data_{name}_rank{rank}.json"


def audit_state_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"audit_rank{rank}.json"


def list_checkpoints(root: Path) -> list[Path]:
    """Renamed-into-place checkpoints, oldest first (intact or not: resume.py checks)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=str)


def save_checkpoint(
    accelerator: Any,
    root: Path,
    step: int,
    streams: dict[str, Any],
    trainer_state: TrainState,
    scheduler: Any,
    keep_last: int,
    *,
    recipe: dict[str, Any],
    adapters_only: bool = False,
    audit_lines: int | None = None,
    hashes: bool = True,
) -> Path:
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # DeepSpeed saves through its engine, not the pre-hook: tell it to skip the frozen base.
    engine_kwargs = (
        {"exclude_frozen_parameters": True}
        if adapters_only and deepspeed_plugin(accelerator) is not None
        else {}
    )
    failure: BaseException | None = None
    try:
        accelerator.save_state(str(tmp), **engine_kwargs)
        for name, stream in streams.items():
            write_json_atomic(data_state_file(tmp, name, rank), stream.state_dict())
        if audit_lines is not None:
            write_json_atomic(audit_state_file(tmp, rank), {"lines": audit_lines})
        if accelerator.is_main_process:
            write_json_atomic(tmp / LR_SCHEDULE, scheduler.state_dict())
            write_json_atomic(tmp / RECIPE, recipe)
            write_json_atomic(tmp / TRAINER_STATE, trainer_state.to_dict())
        fsync_tree(tmp)
    except Exception as exc:  # classified below: disk errors become one line
        failure = exc
    # Every rank learns whether any rank failed (instead of a plain barrier): a rank that hit
    # a full disk must not leave the others waiting, nor let rank 0 publish a partial folder.
    failed_ranks = sum_over_ranks(accelerator, [float(failure is not None)])[0]
    if failed_ranks == 0 and accelerator.is_main_process:
        try:
            write_manifest(tmp, step, accelerator.num_processes, hashes)
        except OSError as exc:
            failure = exc
    failed_ranks = sum_over_ranks(accelerator, [float(failure is not None)])[0]
    if failed_ranks:
        _give_up(accelerator, root, tmp, final, failure)
    if accelerator.is_main_process:
        if final.exists():  # a damaged copy of this step, or a rerun of it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _give_up(
    accelerator: Any, root: Path, tmp: Path, final: Path, failure: BaseException | None
) -> None:
    """Remove the partial checkpoint and raise the same kind of error on every rank."""
    previous = list_checkpoints(root)[-1:]
    # About what the save needs: the size of the last complete one, or what it wrote so far.
    needed = max([folder_size(tmp), *map(folder_size, previous)])
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    kept = (
        f"the previous checkpoint {previous[0].name} is intact"
        if previous
        else "no earlier checkpoint exists"
    )
    if failure is None:
        raise SaveError(f"checkpoint {final} not saved: another rank failed to write it; {kept}")
    error = save_failure("writing checkpoint", final, failure, needed)
    if error is None:
        raise failure
    raise SaveError(f"{error}; the partial checkpoint was removed and {kept}") from None


def load_checkpoint(
    accelerator: Any,
    path: Path,
    streams: dict[str, Any],
    scheduler: Any,
    adapters_only: bool = False,
) -> TrainState:
    engine_kwargs = (
        {"load_module_strict": False}
        if adapters_only and deepspeed_plugin(accelerator) is not None
        else {}
    )
    pickles = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise ConfigError(
            f"training.resume: {path} holds {', '.join(pickles)}, a pickle raft-dist does not "
            "load (loading it could run any code); it is not part of the checkpoint's "
            "manifest. Delete the file to resume."
        )
    accelerator.load_state(str(path), **engine_kwargs)
    rank = accelerator.process_index
    for name, stream in streams.items():
        state_file = data_state_file(path, name, rank)
        if not state_file.is_file():
            raise ConfigError(
                f"training.resume: {path} has no data position for rank {rank}; it was written "
                "by a run with fewer processes. Resume with the same world size."
            )
        stream.load_state_dict(json.loads(state_file.read_text(encoding="utf-8")))
    state = TrainState.from_dict(json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")))
    scheduler.load_state_dict(json.loads((path / LR_SCHEDULE).read_text(encoding="utf-8")))
    return state


ADAPTER_DIR = "adapter"


def register_adapter_checkpointing(accelerator: Any) -> None:
    """LoRA checkpoints hold the adapter only: the frozen base is rebuilt from the recipe.

    Accelerate's save_state writes the whole model unless a pre-hook takes the weights out of
    its list; the load hook restores the adapter and tells Accelerate there is no model file.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            if accelerator.is_main_process:
                unwrapped.save_pretrained(Path(output_dir) / ADAPTER_DIR)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        folder = Path(input_dir) / ADAPTER_DIR
        for model in models:
            state = load_file(folder / "adapter_model.safetensors")
            set_peft_model_state_dict(accelerator.unwrap_model(model), state)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
