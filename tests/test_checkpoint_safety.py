"""Checkpoints hold no pickle that raft-dist loads: the LR schedule is JSON, and a pickle
planted in a checkpoint is refused with a clear message instead of being run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import run_cli, train_losses, write_dataset, write_recipe

TRAINING = {"max_steps": 6, "save_every": 3, "warmup_steps": 2, "lr_schedule": "cosine"}


class _Payload:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _run(tmp_path: Path, name: str, *overrides: str) -> None:
    recipe = tmp_path / f"{name}.yaml"
    if not recipe.exists():
        write_recipe(recipe, tmp_path / "data", tmp_path / name, training=TRAINING)
    result = run_cli("train", "--config", str(recipe), *overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_schedule_is_json_and_a_planted_pickle_is_never_loaded(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [16])
    _run(tmp_path, "whole")
    _run(tmp_path, "parts", "training.stop_after_steps=3")
    checkpoint = tmp_path / "parts/checkpoints/step-00000003"
    schedule = json.loads((checkpoint / "lr_schedule.json").read_text())
    assert schedule["last_epoch"] == 3
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # RNG states: weights_only=True

    marker = tmp_path / "code-ran"
    torch.save(_Payload(marker), checkpoint / "custom_checkpoint_0.pkl")
    recipe = tmp_path / "parts.yaml"
    refused = run_cli("train", "--config", str(recipe), "training.resume=latest", timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "custom_checkpoint_0.pkl, a pickle raft-dist does not load" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not marker.exists()

    # Removed, the checkpoint resumes and the run ends as the uninterrupted one did.
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    _run(tmp_path, "parts", "training.resume=latest")
    assert train_losses(tmp_path / "parts") == train_losses(tmp_path / "whole")
    lrs = {
        json.loads(x)["step"]: json.loads(x).get("lr")
        for x in (tmp_path / "parts/metrics.jsonl").read_text().splitlines()
    }
    whole = {
        json.loads(x)["step"]: json.loads(x).get("lr")
        for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()
    }
    assert lrs == whole
