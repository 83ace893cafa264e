"""NaN/inf: the recipe refuses non-finite values, and a run whose loss or gradient goes
non-finite stops on that step without saving such weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, write_dataset, write_recipe
from safetensors.torch import load_file

from raft_dist.config import load_recipe
from raft_dist.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.lr=nan", "training.lr: nan is not a finite number"),
        ("training.lr=inf", "training.lr: inf is not a finite number"),
        ("training.max_grad_norm=.nan", "training.max_grad_norm: nan is not a finite number"),
        ("lora.dropout=nan", "lora.dropout: nan is not a finite number"),
        ("training.seed=-1", "training.seed: -1 is below the minimum 0"),
        ("training.nonfinite=ignore", "training.nonfinite: 'ignore' is not one of: stop, skip"),
    ],
)
def test_recipe_refuses_non_finite_and_out_of_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(ROOT / "configs/tiny.yaml", [override])


def test_a_diverging_run_stops_before_saving_non_finite_weights(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [12])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "run",
        training={"lr": 1e30, "max_steps": 8, "save_every": 1, "keep_last": 10},
    )
    result = run_cli("train", "--config", str(recipe), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = next(x for x in result.stderr.splitlines() if "non-finite" in x)
    assert line.startswith("error: non-finite ") and "at optimizer step" in line
    step = int(line.split("optimizer step ")[1].split()[0])
    assert 1 < step <= 8
    assert not (tmp_path / "run/final").exists()
    saved = sorted((tmp_path / "run/checkpoints").glob("step-*"))
    assert [int(p.name.split("-")[1]) for p in saved] == list(range(1, step))
    assert f"the last good checkpoint is {saved[-1]}" in line
    for checkpoint in saved:
        for name, tensor in load_file(checkpoint / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint.name, name)
