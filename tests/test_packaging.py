"""A non-editable install carries the profiles, recipes, entry script and tokenizer."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import ROOT


def test_wheel_ships_profiles_entry_script_and_assets(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("raft_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    share = next(n for n in names if n.endswith("share/raft-dist/launch/train.py"))
    prefix = share[: -len("launch/train.py")]
    for profile in ("cpu", "single_gpu", "multi_gpu", "multi_node"):
        assert f"{prefix}accelerate_configs/{profile}.yaml" in names
    assert f"{prefix}configs/tiny.yaml" in names
    for template in ("common.sh", "cpu.sbatch", "multi_node.sbatch", "local/start.sh"):
        assert f"{prefix}slurm/{template}" in names
    assert "raft_dist/assets/tiny-tokenizer/tokenizer.json" in names
    assert "raft_dist/cli.py" in names
