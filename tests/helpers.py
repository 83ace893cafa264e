"""Shared test helpers: small synthetic RAFT data sets, recipes, and runners of the real CLI.

Distributed tests start real processes through `raft-dist launch` (accelerate launch, torchrun,
gloo); nothing about accelerate or torch.distributed is mocked. Tests import these from here
(`from helpers import ...`); fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

from raft_dist.contract import CONTRACT_VARIABLES

ROOT = Path(__file__).resolve().parent.parent
RAFT_DIST = [sys.executable, "-m", "raft_dist.cli"]
WORDS = (
    "harbour tide mill ferry lantern cheese market bell library school weather station north "
    "south island reach wheel stone river festival ledger copper salt green red blue"
).split()


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        # One cache for DeepSpeed's compiled ops across the whole test run (and later runs).
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
    )
    for name in CONTRACT_VARIABLES:  # a contract is the launcher's to set, never inherited
        env.pop(name, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RAFT_DIST, *args],
        cwd=cwd,
        env=env or offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch(recipe: Path, profile: str = "cpu", *overrides: str) -> subprocess.CompletedProcess:
    """`raft-dist launch` on a free port; fails the test with the ranks' output on error."""
    result = run_cli(
        "launch",
        "--profile",
        profile,
        "--config",
        str(recipe),
        *overrides,
        "--main_process_port",
        str(free_port()),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def launch_two_machines(
    recipe: Path, profile: str, env: dict[str, str], per_machine: tuple[list[str], list[str]]
) -> tuple[list[int], list[str]]:
    """Two `raft-dist launch` "machines" (machine ranks 0 and 1) on loopback, one process each;
    `per_machine` adds arguments to each. Returns the exit codes and the outputs."""
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                *RAFT_DIST,
                "launch",
                "--profile",
                profile,
                "--config",
                str(recipe),
                *per_machine[rank],
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    return [node.returncode for node in nodes], outputs


def rank_facts(run_dir: Path) -> list[dict]:
    """What each rank recorded about itself (world size, engine, backend, ZeRO stage)."""
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank?.json"))]


def seen_ids(run_dir: Path) -> list[str]:
    """Record ids every rank read (data.record_audit), in rank order."""
    files = sorted((run_dir / "audit").glob("seen_ids_rank*.txt"))
    return [i for file in files for i in file.read_text(encoding="utf-8").split()]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + "."


def raft_record(rng: random.Random, index: int) -> dict:
    """A native RAFT record whose length varies a lot (variable-length batches on purpose)."""
    oracle = sentence(rng, 4, 30)
    answer = oracle.split()[0]
    docs = [{"title": f"doc {index}-{k}", "text": sentence(rng, 3, 20)} for k in range(2)]
    oracle_index = rng.randint(0, 2)
    docs.insert(oracle_index, {"title": f"oracle {index}", "text": oracle})
    return {
        "id": f"rec-{index:05d}",
        "question": f"What comes first in record {index}?",
        "documents": docs,
        "oracle_index": oracle_index,
        "oracle": oracle,
        "cot_answer": f"It says ##begin_quote## {oracle} ##end_quote## so <ANSWER>: {answer}",
    }


def write_dataset(
    root: Path, shard_sizes: list[int], *, eval_sizes: tuple[int, ...] = (), seed: int = 0
) -> list[str]:
    """A data set folder (train/ and optional eval/ shards, no manifest); returns train ids."""
    rng = random.Random(seed)
    ids, index = [], 0
    for split, sizes in (("train", shard_sizes), ("eval", eval_sizes)):
        for shard, size in enumerate(sizes):
            folder = root / split
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / f"shard-{shard:05d}.jsonl").open("w", encoding="utf-8") as handle:
                for _ in range(size):
                    record = raft_record(rng, index)
                    index += 1
                    if split == "train":
                        ids.append(record["id"])
                    handle.write(json.dumps(record) + "\n")
    return ids


def write_recipe(path: Path, data_dir: Path, out: Path, **sections: dict) -> Path:
    """The tiny model with small batches; `sections` override keys per section."""
    recipe = {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train": str(data_dir), "max_seq_len": 256, "shuffle_shards": False},
        "training": {
            "seed": 7,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "lr": 1e-3,
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
        },
        "output": {"dir": str(out)},
        "logging": {"progress_bar": False, "tensorboard": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    import yaml

    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def one_step_recipe(
    tmp_path: Path, name: str, micro_batch: int, accumulation: int, **sections: dict
) -> Path:
    """One optimizer step over tmp_path/data without clipping: for gradient-norm comparisons."""
    training = {
        "micro_batch_size": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "max_steps": 1,
        "max_grad_norm": 0.0,
    }
    return write_recipe(
        tmp_path / f"{name}.yaml", tmp_path / "data", tmp_path / name, training=training, **sections
    )


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}
