"""bench/gpu_check.sh --dry-run: every GPU check's code path on the CPU with tiny shapes, one
line per check and well-formed JSON; and the script imports nothing the GPU machine lacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from helpers import offline_env

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {
    "a": "full_ft_mfu",
    "d": "packed_attn",
    "b": "qlora_8b",
    "c": "lora_8b",
    "e": "deepspeed",
}
# Not installed on the GPU machine the script is for.
ABSENT_THERE = ("datasets", "deepspeed", "bitsandbytes", "flash_attn", "hjson", "pydantic")


def test_dry_run_prints_a_line_and_writes_json_for_every_check(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # deepspeed is hidden: the SKIP path runs (as on the GPU machine) and no DeepSpeed op builds;
    # bitsandbytes, when installed here, runs the QLoRA path on the CPU.
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out), "--peak-tflops", "1"]
        + ["--without", "deepspeed"],
        cwd=ROOT,
        env=offline_env(OMP_NUM_THREADS="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for letter, name in CHECKS.items():
        found = [ln for ln in lines if re.match(rf"(RESULT|SKIP|ERROR) +\({letter}\) {name}: ", ln)]
        assert len(found) == 1, (name, done.stdout)
        assert not found[0].startswith("ERROR"), found[0]
    assert any(ln.startswith("SKIP   (e) deepspeed: deepspeed is not importable") for ln in lines)

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["dry_run"] is True
    assert list(summary["checks"]) == list(CHECKS.values())  # ordered by value
    for name, record in summary["checks"].items():
        assert json.loads((out / f"{name}.json").read_text(encoding="utf-8")) == record
        assert record["status"] in ("result", "skip")

    full = summary["checks"]["full_ft_mfu"]
    assert full["finite"] and full["tokens_per_s"] > 0
    # MFU = (6 P T + 12 L H S^2 B) / (step time x peak), with the --peak-tflops given.
    shape, batch, seq = full["shape"], full["batch"], full["seq"]
    flops = 6 * full["matmul_params"] * batch * seq
    flops += 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq**2 * batch
    assert full["model_flops_per_step"] == flops
    assert abs(full["mfu"] - flops / full["step_s"] / 1e12) < 1e-9
    assert summary["checks"]["packed_attn"]["verdict"] == "PASS"
    for name in ("qlora_8b", "lora_8b"):
        record = summary["checks"][name]
        if record["status"] == "result":
            assert record["finite"] and 0 < record["trainable"] < record["params"]
    if summary["checks"]["qlora_8b"]["status"] == "result":
        assert summary["checks"]["qlora_8b"]["quantized_linears"] == 2 * 7  # 7 per layer


def test_the_check_imports_nothing_the_gpu_machine_lacks() -> None:
    """The script's own imports and the raft_dist modules it uses; optional libraries are
    imported only inside their checks, after a find_spec."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); import gpu_check; "
        "import raft_dist.evaluate, raft_dist.data.batching"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in done.stderr.splitlines() if "|" in ln}
    assert "raft_dist.evaluate" in imported
    for name in ABSENT_THERE:
        assert not any(m == name or m.startswith(name + ".") for m in imported), name
