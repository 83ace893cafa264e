"""The sbatch templates on a real Slurm cluster (slurm/local/start.sh: slurmctld, two slurmd
simulating two nodes, munge), with preemption and requeue done the way Slurm does them.

Every wait is bounded. The cluster is started once for the module (idempotent: `.ci/run`
starts it before the tests and stops it after them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    launch,
    launch_two_machines,
    offline_env,
    rank_facts,
    seen_ids,
    train_losses,
    write_dataset,
)
from helpers import write_recipe as _write_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.slurm

STATE = Path(os.environ.get("RAFT_DIST_SLURM_DIR", "/tmp/raft-dist-slurm"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
# A job asking for more than the cluster has pends forever with one of these reasons.
NEVER_RUNS = {"PartitionConfig", "PartitionNodeLimit", "BadConstraints", "ReqNodeNotAvail"}


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("the local Slurm cluster needs root to install and start its daemons")
    started = subprocess.run(
        ["bash", str(ROOT / "slurm/local/start.sh"), "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    env = offline_env(SLURM_CONF=str(STATE / "slurm.conf"), RAFT_DIST_HOME=str(ROOT))
    env["VENV"] = sys.prefix
    yield env
    if not os.environ.get("RAFT_DIST_SLURM_EXTERNAL"):
        subprocess.run(["bash", str(ROOT / "slurm/local/stop.sh")], timeout=120, check=False)


def sbatch(env: dict, cwd: Path, template: str, *args: str, **knobs: str) -> str:
    exports = ",".join(["ALL", *(f"{k}={v}" for k, v in knobs.items())])
    result = subprocess.run(
        ["sbatch", "--parsable", f"--export={exports}", *args, str(ROOT / "slurm" / template)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(env: dict, job_id: str, timeout: float = 240) -> dict[str, str]:
    def done() -> dict[str, str] | None:
        fields = job(env, job_id)
        if fields.get("JobState") == "PENDING" and fields.get("Reason") in NEVER_RUNS:
            raise AssertionError(f"job {job_id} can never run here: {fields['Reason']}")
        return fields if fields.get("JobState") in FINAL_STATES else None

    try:
        return wait_for(done, timeout, f"job {job_id} to finish")
    except AssertionError:  # never leave a job behind
        subprocess.run(["scancel", job_id], env=env, check=False)
        raise


def log_of(cwd: Path, job_id: str) -> str:
    files = list(cwd.glob(f"slurm-*-{job_id}.out"))
    return files[0].read_text(errors="replace") if files else ""


def steps_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()]
    return max(steps, default=0)


def write_recipe(path: Path, data: Path, out: Path, **sections: dict) -> Path:
    sections.setdefault("data", {}).update(record_audit=True)
    return _write_recipe(path, data, out, **sections)


def same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].equal(right[name]), name


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm-data")
    write_dataset(root, [9, 7, 8, 6], eval_sizes=(3,), seed=11)
    return root


def test_cpu_template_completes(cluster: dict, data: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", training={"max_steps": 4})
    job_id = sbatch(cluster, tmp_path, "cpu.sbatch", RECIPE=str(recipe))
    fields = wait_done(cluster, job_id)
    log = log_of(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert (tmp_path / f"slurm-raft-dist-cpu-{job_id}.out").is_file()  # where the header says
    assert "done: 4 optimizer steps" in log
    assert (tmp_path / "run/final/model.safetensors").is_file()
    assert steps_done(tmp_path / "run") == 4
    assert [f["world_size"] for f in rank_facts(tmp_path / "run")] == [2, 2]


@pytest.mark.parametrize("profile", ["multi_node", "multi_node_deepspeed_zero3"])
def test_multi_node_template_on_two_nodes(
    cluster: dict, data: Path, tmp_path: Path, profile: str
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", training={"max_steps": 3})
    knobs = {"RECIPE": str(recipe), "PROFILE": profile, "PROCS_PER_NODE": "1", "CPU_ONLY": "1"}
    job_id = sbatch(
        cluster,
        tmp_path,
        "multi_node.sbatch",
        "--nodes=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        **knobs,
    )
    fields = wait_done(cluster, job_id, timeout=400)
    log = log_of(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    facts = rank_facts(tmp_path / "run")
    assert [f["world_size"] for f in facts] == [2, 2]
    assert sorted(f["machine_rank"] for f in facts) == [0, 1]
    assert {f["engine"] for f in facts} == {"ddp" if profile == "multi_node" else "deepspeed"}
    per_rank = [
        set((tmp_path / f"run/audit/seen_ids_rank{r}.txt").read_text().split()) for r in (0, 1)
    ]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_time_limit_and_preemption_requeue_and_end_equal_to_the_reference(
    cluster: dict, data: Path, tmp_path: Path
) -> None:
    """One job, two interruptions: the time-limit warning (USR1 to the batch shell), then a
    preemption the way Slurm sends it (SIGTERM to every process of the step), twice 0.2 s apart,
    both while the step is stopping (the second must not turn into a hard stop). Each stop saves
    at the next step (the periodic checkpoint is older), the job requeues and resumes, and the
    run ends at exactly max_steps, equal to an uninterrupted reference."""
    steps = 160
    training = {"max_steps": steps, "save_every": 1000, "keep_last": 1, "micro_batch_size": 1}
    reference = write_recipe(tmp_path / "ref.yaml", data, tmp_path / "ref", training=training)
    launch(reference, "cpu")
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", training=training)
    run_dir = tmp_path / "run"
    job_id = sbatch(cluster, tmp_path, "cpu.sbatch", RECIPE=str(recipe))

    wait_for(lambda: steps_done(run_dir) >= 10, 180, "the first 10 steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster, check=True)
    wait_for(lambda: job(cluster, job_id).get("Restarts") == "1", 120, "the first requeue")
    first_stop = wait_for(lambda: _stopped_at(run_dir), 60, "the first stop's checkpoint")
    wait_for(lambda: steps_done(run_dir) >= first_stop + 10, 180, "progress after resume")
    # Both SIGTERMs must reach this incarnation while it is still stopping: the ranks of a tiny
    # model can stop, save and exit within 0.2 s, and a signal Slurm cannot deliver to a step
    # that is gone lands on the next incarnation. So the ranks are held (SIGSTOP) until the
    # first signal is pending in both; everything else of the step (raft-dist launch, the
    # agent) gets both signals while the ranks still run.
    ranks = _rank_pids(recipe)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    try:
        subprocess.run(["scancel", "--signal=TERM", job_id], env=cluster, check=True)
        wait_for(lambda: all(_term_pending(pid) for pid in ranks), 60, "SIGTERM at both ranks")
        time.sleep(0.2)
        subprocess.run(["scancel", "--signal=TERM", job_id], env=cluster, check=True)
        time.sleep(1)
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    fields = wait_done(cluster, job_id, timeout=300)
    log = log_of(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert fields["Restarts"] == "2", log[-4000:]
    assert log.count("stopped with a checkpoint; requeueing") == 2
    assert "resume        " in log and "(step " in log

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["stopped"] is None
    assert train_losses(run_dir) == train_losses(tmp_path / "ref")
    assert sorted(seen_ids(run_dir)) == sorted(seen_ids(tmp_path / "ref"))
    same_weights(run_dir / "final", tmp_path / "ref/final")


def _rank_pids(recipe: Path) -> list[int]:
    """The rank processes training `recipe` (the agent's command line names the script too)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if str(recipe) in argv and any(a.endswith("launch/train.py") for a in argv):
            if "raft_dist.accelerate_agent" not in argv:
                pids.append(int(entry.name))
    return pids


def _term_pending(pid: int) -> bool:
    """SIGTERM is waiting in `pid`'s signal queue (a held process cannot take it yet)."""
    status = Path(f"/proc/{pid}/status").read_text()
    pending = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(pending & (1 << (signal.SIGTERM - 1)))


def _stopped_at(run_dir: Path) -> int | None:
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    return int(checkpoints[-1].name.split("-")[1]) if checkpoints else None


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"PROFILE": "gpu8"}, "unknown profile 'gpu8'"),
        ({"RECIPE": "no/such.yaml"}, "RECIPE=no/such.yaml: no such file"),
        ({"OVERRIDES": "training.max_stepz=3"}, "unknown key training.max_stepz"),
    ],
)
def test_bad_settings_fail_fast_with_a_clear_message(
    cluster: dict, data: Path, tmp_path: Path, knobs: dict, message: str
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", training={"max_steps": 2})
    job_id = sbatch(cluster, tmp_path, "cpu.sbatch", **{"RECIPE": str(recipe), **knobs})
    fields = wait_done(cluster, job_id, timeout=120)
    log = log_of(tmp_path, job_id)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", log
    assert message in log, log[-3000:]
    assert "Traceback" not in log


def test_a_run_folder_not_shared_by_all_machines_is_refused(data: Path, tmp_path: Path) -> None:
    """Two machines on loopback whose output.dir are two different folders (what a node-local
    disk looks like): every rank stops at start and says which rank cannot see rank 0's."""
    recipe = write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", training={"max_steps": 2})
    codes, outputs = launch_two_machines(
        recipe,
        "multi_node",
        offline_env(ACCELERATE_USE_CPU="1"),
        ([f"output.dir={tmp_path / 'node0'}"], [f"output.dir={tmp_path / 'node1'}"]),
    )
    assert all(code != 0 for code in codes), outputs
    assert "is not one folder for all ranks: rank 1 on" in outputs[0] + outputs[1]
    assert not (tmp_path / "node0/final").exists()
