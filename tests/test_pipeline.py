"""`raft-dist pipeline`: stages run once, a re-run skips finished stages and resumes an
interrupted training, changed settings of a finished stage are refused. Real launches (2 CPU
processes through `raft-dist launch`) on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import ROOT, run_cli, write_dataset, write_recipe

SOURCES = ("02-corran-point-lighthouse.md", "05-cheese-cooperative.md", "12-town-council.md")


def test_pipeline_stages_skip_resume_and_refuse_changes(tmp_path: Path) -> None:
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for name in SOURCES:
        shutil.copy(ROOT / "data/demo_source/trained" / name, corpus / name)
    write_dataset(tmp_path / "extra", [4])
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tmp_path / "unused",
        tmp_path / "unused-out",
        training={"max_steps": 2, "save_every": 1, "eval_batches": 1},
    )
    out = tmp_path / "pipe"
    command = [
        "pipeline", str(corpus), "--config", str(recipe), "--out", str(out),
        "--train-extra", str(tmp_path / "extra" / "train"),
        "--questions-per-chunk", "2", "--eval-fraction", "0.34", "--num-distractors", "1",
        "--robustness", "0,1", "--no-progress",
    ]  # fmt: skip

    # 1. Training is cut short after one step: the stages before it are marked done.
    first = run_cli(*command, "training.stop_after_steps=1")
    assert first.returncode == 2, first.stderr[-3000:]
    assert "run the same command again" in first.stderr
    assert sorted(p.stem for p in (out / "stages").glob("*.json")) == ["generate", "mix"]
    mixed = sorted((out / "train-data").glob("*.jsonl"))
    generated = json.loads((out / "stages/generate.json").read_text())["result"]["splits"]["train"]
    lines = sum(len(f.read_text().splitlines()) for f in mixed)
    assert lines == generated + 4  # the generated train split plus the extra records

    # 2. The same command again: finished stages are skipped, training resumes at step 1.
    second = run_cli(*command)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[1/4] generate: done earlier" in second.stderr
    assert "[2/4] mix: done earlier" in second.stderr
    assert "(step 1)" in second.stdout + second.stderr  # the run card's resume point
    report = json.loads((out / "eval/report.json").read_text())
    assert [m["model"] for m in report["models"]] == ["builtin:tiny-llama", str(out / "run/final")]
    assert "| model |" in second.stdout
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    assert sorted(markers) == ["eval", "generate", "mix", "train"]
    assert all(m["result"]["seconds"] >= 0 for m in markers.values())

    # 3. Once more: nothing runs.
    third = run_cli(*command)
    assert third.returncode == 0, third.stderr[-3000:]
    for stage in ("generate", "mix", "train", "eval"):
        assert f"{stage}: done earlier" in third.stderr
    assert "raft-dist run card" not in third.stdout + third.stderr

    # 4. A finished stage with other settings is refused, naming what changed.
    changed = run_cli(*[a if a != "2" else "3" for a in command])
    assert changed.returncode == 2
    assert "changed: questions_per_chunk" in changed.stderr
    assert "Traceback" not in changed.stderr
