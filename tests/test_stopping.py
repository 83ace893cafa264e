"""Graceful stops on a workstation (no Slurm): a signal to `raft-dist launch` becomes a stop
request for every rank, which saves at the next step, exits 0, and the launcher exits 75;
`training.resume=latest` continues to the end. The Slurm paths are in test_slurm.py."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import RAFT_DIST, ROOT, free_port, launch, offline_env, write_dataset, write_recipe

from raft_dist.launcher import EXIT_STOPPED

pytestmark = pytest.mark.distributed


def steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return max((json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()), default=0)


def test_sigterm_to_the_launcher_stops_saves_and_resumes(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [8, 8])
    training = {"max_steps": 400, "save_every": 1000, "micro_batch_size": 1}
    recipe = write_recipe(
        tmp_path / "r.yaml", tmp_path / "data", tmp_path / "run", training=training
    )
    command = [*RAFT_DIST, "launch", "--profile", "cpu", "--config", str(recipe)]
    process = subprocess.Popen(
        [*command, "--main_process_port", str(free_port())],
        cwd=ROOT,
        env=offline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while steps_logged(tmp_path / "run") < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert steps_logged(tmp_path / "run") >= 5, "the run did not start"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == EXIT_STOPPED, err[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    stopped = summary["stopped"]
    assert stopped == {
        **stopped,
        "reason": "stop_requested",
        "detail": "stop request (stop-request)",
    }
    assert 5 <= stopped["step"] < 400
    assert (tmp_path / f"run/checkpoints/step-{stopped['step']:08d}").is_dir()
    assert not (tmp_path / "run/final").exists()
    assert f"stopped after step {stopped['step']}" in err and "Traceback" not in err
    launch(recipe, "cpu", "training.resume=latest")
    done = json.loads((tmp_path / "run/summary.json").read_text())
    assert done["steps"] == 400 and done["stopped"] is None
    assert not (tmp_path / "run/stopped.json").exists()
