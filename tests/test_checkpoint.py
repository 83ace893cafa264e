"""Checkpoint discovery: only complete checkpoints count, whatever a kill left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from raft_dist.errors import ConfigError
from raft_dist.train.checkpoint import TRAINER_STATE, find_latest, resolve_resume


def make_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"partial")
    if complete:
        (path / TRAINER_STATE).write_text("{}")
    return path


def test_a_save_killed_halfway_leaves_the_previous_checkpoint_as_latest(tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path, "step-00000004")
    make_checkpoint(tmp_path, ".step-00000008.tmp", complete=False)  # killed mid-save
    make_checkpoint(tmp_path, "step-00000006", complete=False)  # no trainer state: incomplete
    assert find_latest(tmp_path) == good
    assert resolve_resume("latest", tmp_path) == good


def test_resume_rules(tmp_path: Path) -> None:
    assert resolve_resume("latest", tmp_path / "none-yet") is None  # requeued job, first run
    assert resolve_resume(None, tmp_path) is None
    make_checkpoint(tmp_path, "step-00000002")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        resolve_resume(None, tmp_path)
    with pytest.raises(ConfigError, match="not a complete raft-dist checkpoint"):
        resolve_resume(str(tmp_path / "step-00000009"), tmp_path)
    assert resolve_resume(str(tmp_path / "step-00000002"), tmp_path) == tmp_path / "step-00000002"
