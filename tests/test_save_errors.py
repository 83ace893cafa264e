"""A full disk while saving: one clear line (what, where, space needed vs free), the partial
output removed, what was saved before intact and resumable. The disk is a real small tmpfs."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli, write_dataset, write_recipe
from test_generate import write_corpus

from raft_dist.train.manifest import problem_with


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of the size the test's `disk_kib` marker asks for."""
    size = request.node.get_closest_marker("disk_kib").args[0]
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _one_clean_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.disk_kib(5 * 1024)  # one tiny-model checkpoint (~3 MB) fits, two do not
def test_a_checkpoint_that_does_not_fit_is_reported_and_removed(
    small_disk: Path, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "data", [24])
    training = {"max_steps": 6, "save_every": 2, "keep_last": 3}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "data", small_disk, training=training)
    result = run_cli("train", "--config", str(recipe))
    assert result.returncode == 2, result.stderr[-3000:]
    line = _one_clean_line(result.stderr)
    assert "writing checkpoint" in line and "step-00000004" in line
    assert "no space left" in line and "MiB free" in line and "needed about" in line
    assert "the previous checkpoint step-00000002 is intact" in line
    checkpoints = small_disk / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000002"]  # no .tmp left
    assert problem_with(checkpoints / "step-00000002", ["trainer_state.json"]) is None

    # Resumable once there is room: the same run folder on a roomier disk.
    roomy = tmp_path / "roomy"
    shutil.copytree(small_disk, roomy)
    recipe = write_recipe(tmp_path / "r2.yaml", tmp_path / "data", roomy, training=training)
    resumed = run_cli("train", "--config", str(recipe), "training.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (roomy / "final/model.safetensors").is_file()


@pytest.mark.disk_kib(768)  # the run's small files fit; the 1.2 MB final model does not
def test_a_final_model_that_does_not_fit_is_reported_and_removed(
    small_disk: Path, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "data", [8])
    recipe = write_recipe(
        tmp_path / "r.yaml", tmp_path / "data", small_disk, training={"max_steps": 2}
    )
    result = run_cli("train", "--config", str(recipe), "logging.tensorboard=false")
    assert result.returncode == 2, result.stderr[-3000:]
    line = _one_clean_line(result.stderr)
    assert "writing the final model" in line and "no space left" in line
    assert not (small_disk / "final").exists()
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".final")]


@pytest.mark.disk_kib(32)
def test_generated_shards_that_do_not_fit_are_reported(small_disk: Path, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", sentences=400)
    out = small_disk / "data"
    result = run_cli("generate", str(corpus), "--out", str(out), "--no-progress")
    assert result.returncode == 2, result.stderr[-3000:]
    line = _one_clean_line(result.stderr)
    assert "writing generated data to" in line and "no space left" in line
    assert "rerun the same command to resume" in line
