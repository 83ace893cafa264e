"""Kill -9 anywhere, then resume: bench/faults.py at CI size (DDP, ZeRO-2, LoRA; 10 kills in all).

The harness kills chained 2-process runs at planned moments (a step, a checkpoint write, an
evaluation, startup), whole launch trees and single workers, resumes each time, and compares the
finished run with an uninterrupted reference: final weights torch.equal, the record audits equal
as a multiset, every metrics step logged once. About 5-8 minutes on a 2-core machine.

The seed is printed and comes from RAFT_DIST_FAULTS_SEED when set; replay a failure with
`RAFT_DIST_FAULTS_SEED=N pytest tests/test_faults.py` or `make faults FAULTS_ARGS='--seed N'`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, offline_env

pytestmark = pytest.mark.distributed

CONFIGS = "ddp,zero2,lora"
KILLS = 10


def test_kill_9_anywhere_then_resume_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("RAFT_DIST_FAULTS_SEED") or int(time.time()) % 1_000_000)
    print(f"faults seed: {seed} (replay: RAFT_DIST_FAULTS_SEED={seed})")
    command = [sys.executable, str(ROOT / "bench" / "faults.py"), "--configs", CONFIGS]
    command += ["--kills", str(KILLS), "--seed", str(seed), "--out", str(tmp_path)]
    result = subprocess.run(
        command, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=1800
    )
    print(result.stdout)
    output = result.stdout[-6000:] + result.stderr[-3000:]
    report_file = tmp_path / "faults.json"
    assert report_file.is_file(), f"seed {seed}: the harness wrote no report\n{output}"
    report = json.loads(report_file.read_text(encoding="utf-8"))
    assert report["seed"] == seed
    assert [c["config"] for c in report["configs"]] == CONFIGS.split(",")
    failures = [
        f"{c['config']} (kills: {c['sequence']}): {failure}"
        for c in report["configs"]
        for failure in c["failures"]
    ]
    replay = f"seed {seed}, replay: {report['replay']}"
    assert not failures, f"{replay}\n" + "\n".join(failures) + f"\n{output}"
    assert report["kills"] >= KILLS, f"{replay}: only {report['kills']} kills fired\n{output}"
    assert result.returncode == 0, f"{replay}\n{output}"
