"""Checkpoints that can be trusted: a manifest written last, verification before loading, and a
fallback to the previous intact checkpoint when the newest one is damaged.

One real training run (tiny model, checkpoints at steps 2, 4 and 6, then final/) is shared by
every test here; each test damages its own copy.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, offline_env, run_cli, seen_ids, write_dataset, write_recipe
from safetensors.torch import load_file

from raft_dist.errors import ConfigError
from raft_dist.rundir import RunDir
from raft_dist.train.manifest import MANIFEST
from raft_dist.train.resume import changed_keys, choose_checkpoint

# An evaluation at step 4 (inside the run) and the final one at step 6 (after the last save).
TRAINING = {"max_steps": 6, "save_every": 2, "keep_last": 3, "seed": 3, "eval_every": 4}
DATA = {"record_audit": True}
NEWEST, PREVIOUS = "step-00000006", "step-00000004"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("trained")
    write_dataset(base / "data", [24], eval_sizes=(4,))
    recipe = write_recipe(
        base / "recipe.yaml", base / "data", base / "run", training=TRAINING, data=DATA
    )
    result = run_cli("train", "--config", str(recipe), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return base


def _copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the run; returns (its recipe, its run folder)."""
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    recipe = write_recipe(
        tmp_path / "recipe.yaml", trained / "data", run, training=TRAINING, data=DATA
    )
    return recipe, run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "model.safetensors": _truncate,
    "optimizer.bin": _truncate,
    "trainer_state.json": _truncate,
    "data_train_rank0.json": _truncate,
    "lr_schedule.json": lambda p: p.unlink(),
    "random_states_0.pkl": lambda p: p.write_bytes(b""),  # Accelerate would load this silently
    MANIFEST: lambda p: p.unlink(),  # a save killed before its last file
}


def test_each_checkpoint_has_a_manifest_of_its_files(trained: Path) -> None:
    checkpoint = trained / "run/checkpoints" / NEWEST
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {MANIFEST}
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (checkpoint / rel).stat().st_size
        assert len(entry["sha256"]) == 64  # a periodic save hashes
    assert manifest["world_size"] == 1 and manifest["step"] == 6
    assert json.loads((checkpoint / "recipe.json").read_text())["training"]["max_steps"] == 6
    assert not list((trained / "run/checkpoints").glob(".*"))  # no temporary folder left


def _garble_header_of_unhashed(path: Path) -> None:
    """Same size, no hashes (as a stop save writes): only reading the header can tell."""
    manifest_file = path.parent / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    for entry in manifest["files"].values():
        entry["sha256"] = None
    manifest_file.write_text(json.dumps(manifest))
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", [*DAMAGE, "model.safetensors flipped", "model.safetensors header"]
)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_is_used(
    trained: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, run = _copy(trained, tmp_path)
    newest = run / "checkpoints" / NEWEST
    name = damage.split()[0]
    special = {"flipped": _flip_a_byte, "header": _garble_header_of_unhashed}
    special.get(damage.split()[-1], DAMAGE.get(name))(newest / name)
    recipe = json.loads((newest.parent / PREVIOUS / "recipe.json").read_text())
    paths = RunDir(run)

    with pytest.raises(ConfigError, match=f"{NEWEST} is damaged: {name}"):
        choose_checkpoint(str(newest), paths, 1, recipe, logging.getLogger("t"))
    with caplog.at_level(logging.WARNING):
        chosen = choose_checkpoint("latest", paths, 1, recipe, logging.getLogger("t"))
    assert chosen == run / "checkpoints" / PREVIOUS
    assert name in caplog.text and "damaged" in caplog.text
    assert not newest.exists() and (run / "checkpoints" / f"damaged-{NEWEST}").is_dir()


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(trained: Path, tmp_path: Path) -> None:
    _, run = _copy(trained, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "optimizer.bin").write_bytes(b"")
    recipe = json.loads((run / "checkpoints" / NEWEST / "recipe.json").read_text())
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        choose_checkpoint("latest", RunDir(run), 1, recipe, logging.getLogger("t"))
    assert len(list((run / "checkpoints").glob("step-*"))) == 3  # nothing moved


def test_resume_falls_back_and_ends_with_the_same_weights(trained: Path, tmp_path: Path) -> None:
    """The real command: a truncated newest model file, resume=latest, rc 0, the steps after
    the fallback checkpoint trained again (logged once) and the final weights unchanged."""
    recipe, run = _copy(trained, tmp_path)
    _truncate(run / "checkpoints" / NEWEST / "model.safetensors")
    result = run_cli("train", "--config", str(recipe), "training.resume=latest", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{NEWEST} is damaged (model.safetensors" in result.stderr
    assert _logged(run) == _logged(trained / "run")
    # The record audit was cut back to the checkpoint too: every record once, as in the run
    # that was never resumed.
    assert seen_ids(run) == seen_ids(trained / "run")
    assert len(seen_ids(run)) == 24
    fresh = load_file(run / "final/model.safetensors")
    reference = load_file(trained / "run/final/model.safetensors")
    assert fresh.keys() == reference.keys()
    assert all(fresh[k].equal(reference[k]) for k in fresh)


def _logged(run: Path) -> dict[str, list[int]]:
    """Steps of the training and evaluation lines in metrics.jsonl, in file order."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "train": [x["step"] for x in lines if "loss" in x],
        "eval": [x["step"] for x in lines if "eval_loss" in x],
    }


def test_resuming_a_finished_run_logs_nothing_twice(trained: Path, tmp_path: Path) -> None:
    """The final evaluation comes after the last checkpoint: a resume from that checkpoint
    (a job that died during the final save, or a finished one started again) evaluates again
    and must not leave the first evaluation's line behind."""
    assert _logged(trained / "run") == {"train": [1, 2, 3, 4, 5, 6], "eval": [4, 6]}
    recipe, run = _copy(trained, tmp_path)
    again = run_cli("train", "--config", str(recipe), "training.resume=latest")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _logged(run) == _logged(trained / "run")


def test_resume_refuses_a_changed_recipe_unless_told(trained: Path, tmp_path: Path) -> None:
    recipe, run = _copy(trained, tmp_path)
    refused = run_cli(
        "train", "--config", str(recipe), "training.resume=latest", "training.lr=0.01"
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "training.lr: 0.001 -> 0.01" in refused.stderr
    assert "training.resume_with_changed_recipe=true" in refused.stderr
    assert "Traceback" not in refused.stderr
    told = run_cli(
        "train",
        "--config",
        str(recipe),
        "training.resume=latest",
        "training.lr=0.01",
        "training.resume_with_changed_recipe=true",
    )
    assert told.returncode == 0, told.stderr[-2000:]
    saved = json.loads((run / "checkpoints" / NEWEST / "recipe.json").read_text())
    assert changed_keys(saved, saved) == []
    quiet = {**saved, "logging": {**saved["logging"], "level": "debug"}}
    assert changed_keys(saved, quiet) == []  # logging never changes the trajectory


def test_a_fresh_start_never_overwrites_a_finished_run(trained: Path, tmp_path: Path) -> None:
    recipe, run = _copy(trained, tmp_path)
    shutil.rmtree(run / "checkpoints")
    for resume in ("training.resume=null", "training.resume=latest"):
        refused = run_cli("train", "--config", str(recipe), resume)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "holds a finished run (final/)" in refused.stderr


def test_a_second_run_is_kept_out_of_a_folder_in_use(trained: Path, tmp_path: Path) -> None:
    recipe, run = _copy(trained, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from raft_dist.train.lock import lock_run_folder; "
            f"lock_run_folder(Path({str(run / 'run.lock')!r})); print('held', flush=True); "
            "time.sleep(600)",
        ],
        cwd=ROOT,
        env=offline_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_cli("train", "--config", str(recipe), "training.resume=latest")
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"in use by another run (pid {holder.pid} on" in refused.stderr
    finally:
        holder.kill()  # SIGKILL: the lock dies with its holder, nothing to clean up
        holder.wait()
    resumed = run_cli("train", "--config", str(recipe), "training.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
