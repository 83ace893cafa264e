"""A rank that hangs (rather than dies) is named, within the recipe's process-group timeout.

The hang is real: rank 1's process is stopped with SIGSTOP while the two-process run trains, so
rank 0 waits in the next collective. Nothing about torch.distributed is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import RAFT_DIST, ROOT, free_port, offline_env, write_dataset, write_recipe

pytestmark = pytest.mark.distributed


def _worker(marker: str, rank: int) -> int | None:
    """The pid of the training process of `rank` whose command line mentions `marker`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            marker in cmdline
            and "launch/train.py" in cmdline
            and f"RANK={rank}".encode() in environ
        ):
            return int(entry.name)
    return None


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_hung_rank_is_named_when_the_collective_times_out(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [64])
    out = tmp_path / "run"
    training = {"max_steps": 40, "process_group_timeout_s": 10}
    recipe = write_recipe(tmp_path / "hang.yaml", tmp_path / "data", out, training=training)
    launch = subprocess.Popen(
        [*RAFT_DIST, "launch", "--profile", "cpu", "--config", str(recipe)]
        + ["--main_process_port", str(free_port())],
        cwd=ROOT,
        env=offline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    stopped = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and stopped is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count("\n") >= 2:
                stopped = _worker(str(recipe), 1)
            time.sleep(0.2)
        assert stopped is not None, "rank 1 never started training"
        waiting = _worker(str(recipe), 0)
        assert waiting is not None, "rank 0 is not running"
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        while _alive(waiting) and time.monotonic() - started < 180:
            time.sleep(0.2)
        waited = time.monotonic() - started
        # Rank 0 has given up: wake rank 1, so that it takes the agent's SIGTERM now instead of
        # the agent waiting out its 30 s grace before SIGKILL (torch's teardown, not ours).
        os.kill(stopped, signal.SIGCONT)
        output, _ = launch.communicate(timeout=180)
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
    assert launch.returncode != 0, output[-4000:]
    assert "training.process_group_timeout_s=10" in output, output[-4000:]
    assert "Ranks 1 failed to pass monitoredBarrier" in output, output[-4000:]
    assert waited < 120, f"took {waited:.0f} s to notice"
