"""ZeRO-1/2/3 (ZeRO-3 also built partitioned) and ZeRO-2 offload against DDP: memory and step time.

    .venv/bin/python bench/zero_bench.py [--steps 6] [--rounds 1] [--quiet-wait S] [--out DIR]
        [--precision fp32|bf16] [--profiles zero3,zero3_init]

Every run is a real 2-process `raft-dist launch` of the same recipe (a random 108M-parameter
Llama, CPU, short synthetic examples; fp32, or bf16 mixed precision with --precision bf16)
with only the profile changed. Step times come from
each run's metrics.jsonl, peak memory from the ranks' own ranks/rank{R}_peak.json, the memory
held between steps from sampling the ranks' RSS. Each stage's saving against DDP is printed
next to the saving the ZeRO paper's formula (Rajbhandari et al. 2020) predicts for parameters,
gradients and optimizer states, with the ratio measured / predicted. Target: ZeRO-3 built
partitioned (zero3_init_flag: true) saves at least 70 % of the predicted amount.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common
from common import MIB, ROOT

RAFT_DIST = ROOT / ".venv" / "bin" / "raft-dist"

# name -> launch profile; DDP is the reference every ratio is taken against.
PROFILES: dict[str, str] = {
    "ddp": "cpu",
    "zero1": "deepspeed_zero1",
    "zero2": "deepspeed_zero2",
    "zero3": "deepspeed_zero3",
    "zero3_init": "deepspeed_zero3_init",
    "zero2_offload": "deepspeed_zero2_offload",
}
# ZeRO stage each profile partitions with (DDP replicates everything: stage 0).
STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero3_init": 3, "zero2_offload": 2}
RANKS = 2
WARMUP_STEPS = 2
DEFAULT_STEPS = 6
DEFAULT_ROUNDS = 1
# bf16 matmuls run ~6x slower than fp32 on a CPU without bf16 instructions (a step ~45 s
# here): two warm-up steps and two sampled ones.
BF16_STEPS = 4
# ZeRO-3 built partitioned must save at least this share of what the formula predicts.
TARGET_SHARE_OF_PREDICTED = 0.70
TARGET_PROFILE = "zero3_init"
ZERO3_JSON = ROOT / "ds_configs" / "zero3.json"
SAMPLE_EVERY_S = 0.25

# Big enough that the savings (ZeRO-3: 8 bytes x 108M = 830 MiB per rank) stand far above
# the run-to-run noise of RSS (tens of MiB) and the ~0.5 GiB runtime every rank holds; the
# examples are short (below) so that 6 two-process launches fit in about 6 minutes on 2 cores.
# Untied embeddings: every parameter is partitioned once, the count the formulas assume.
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
# Short synthetic instruction/output examples (about 100-170 tokens with the tiny tokenizer):
# the activations stay small next to the model states, and a step takes seconds.
DATA_RECORDS = 64
MAX_SEQ_LEN = 256
WORDS = (
    "harbour tide mill ferry lantern cheese market bell library school weather station north "
    "south island reach wheel stone river festival ledger copper salt green red blue"
).split()
MODEL_SEED = 20240601

# Bytes per parameter: (parameters, gradients, optimizer states K).
PAPER_MIXED = (2, 2, 12)  # fp16 params + fp16 grads; fp32 master, momentum, variance
FP32_ADAM = (4, 4, 8)  # fp32 params + fp32 grads; Adam exp_avg + exp_avg_sq


@dataclass(frozen=True)
class Precision:
    """How the runs train, and the bytes per parameter the formula uses for each side."""

    mixed_precision: str  # the recipe's training.mixed_precision
    ddp_sizes: tuple[int, int, int]
    zero_sizes: tuple[int, int, int]
    note: str


PRECISIONS: dict[str, Precision] = {
    # Everything fp32: the formula with K = 8 on both sides. DeepSpeed 0.19.8 keeps an fp32
    # copy of each ZeRO-3 partition anyway (see bench/README.md), so ZeRO-3 falls short here.
    "fp32": Precision(
        "no", FP32_ADAM, FP32_ADAM, "fp32 weights, no mixed precision (P=4, G=4, K=8)"
    ),
    # What a GPU run uses and what the paper's formula describes: DeepSpeed holds bf16
    # weights and gradients and an fp32 master copy with Adam's moments (2, 2, 12). DDP under
    # Accelerate's autocast keeps fp32 weights and gradients plus the moments: 16 bytes too.
    "bf16": Precision(
        "bf16",
        FP32_ADAM,
        PAPER_MIXED,
        "bf16 mixed precision: DDP autocast over fp32 weights (4, 4, 8), ZeRO the paper's "
        "(P=2, G=2, K=12)",
    ),
}


# ---- the shared model and recipe ----------------------------------------------------------


def build_model(folder: Path) -> int:
    """Write the random model once (fixed seed) so every run starts from the same weights.

    Returns the parameter count. A folder built with the same shape and seed is reused.
    """
    marker = folder / "zero_bench.json"
    wanted = {"shape": MODEL_SHAPE, "seed": MODEL_SEED}
    if marker.is_file():
        stored = json.loads(marker.read_text(encoding="utf-8"))
        if {k: stored.get(k) for k in wanted} == wanted:
            return int(stored["parameters"])
    model = common.random_llama(MODEL_SHAPE, MODEL_SEED)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    for source in common.TINY_TOKENIZER.iterdir():
        shutil.copy2(source, folder / source.name)
    parameters = common.parameter_count(model)
    marker.write_text(json.dumps({**wanted, "parameters": parameters}), encoding="utf-8")
    return parameters


def write_data(path: Path) -> Path:
    """DATA_RECORDS seeded instruction/output examples in one JSONL file."""
    import random

    rng = random.Random(MODEL_SEED)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(DATA_RECORDS):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 70)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16)))
            record = {"id": f"z{index:03d}", "instruction": f"{words}\nQuestion: which?"}
            handle.write(json.dumps({**record, "output": answer}) + "\n")
    return path


def write_recipe(path: Path, model_dir: Path, steps: int, precision: str = "fp32") -> Path:
    """configs/tiny.yaml with the bench model, short examples and eval-free, save-free runs."""
    import yaml

    recipe = yaml.safe_load(common.TINY_RECIPE.read_text(encoding="utf-8"))
    recipe["model"] = {"name_or_path": str(model_dir), "dtype": "float32"}
    data = write_data(path.parent / "train.jsonl")
    recipe["data"].update({"train": str(data), "max_seq_len": MAX_SEQ_LEN})
    recipe["training"].update(
        {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_steps": steps,
            "eval_every": 0,
            "eval_at_start": False,
            "save_every": 0,
            "mixed_precision": PRECISIONS[precision].mixed_precision,
        }
    )
    recipe["output"] = {"dir": str(path.parent / "unused"), "save_final_model": False}
    recipe["logging"] = {"level": "warning", "tensorboard": False, "progress_bar": False}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


# ---- launching and reading back -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Run:
    name: str
    round: int
    run_dir: str
    returncode: int
    wall_s: float
    foreign_cpu_share: float
    step_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    floor_rss_mib: dict[str, float] = field(default_factory=dict)
    rss_samples: int = 0

    @property
    def median_step_s(self) -> float:
        return common.median(self.step_s)


# glibc serves blocks below its mmap threshold from the heap, and the threshold grows (up to
# 32 MiB) each time a larger mmapped block is freed; freed heap memory mostly stays resident.
# ZeRO-3 gathers and frees every weight (here up to 11 MiB each) twice a step, so with the
# default its between-step RSS holds the allocator's cache, not live tensors. A fixed 1 MiB
# threshold, the same for every profile, returns such blocks to the system when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def env_for_launch(malloc_default: bool = False) -> dict[str, str]:
    """The environment the tests launch with: offline, one thread per rank on 2 cores; glibc's
    mmap threshold fixed (MALLOC_ENV) unless malloc_default."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if not malloc_default:
        env.update(MALLOC_ENV)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // RANKS)))
    for key in [k for k in env if k.startswith("RAFT_DIST_EXPECT_")]:
        env.pop(key)
    return env


def launch(
    name: str, round_: int, recipe: Path, run_dir: Path, steps: int, malloc_default: bool = False
) -> Run:
    """One 2-process launch; its output goes to run_dir/launch.log."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [
        str(RAFT_DIST),
        "launch",
        "--profile",
        PROFILES[name],
        "--config",
        str(recipe),
        f"output.dir={run_dir}",
        "--main_process_port",
        str(free_port()),
    ]
    before = common.cpu_reading()
    with (run_dir / "launch.log").open("w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(
            command, cwd=ROOT, env=env_for_launch(malloc_default), stdout=log, stderr=log
        )
        sampler = RankMemorySampler(process.pid, run_dir / "metrics.jsonl", steps)
        sampler.start()
        returncode = process.wait()
        sampler.stop()
    after = common.cpu_reading()
    run = Run(name, round_, str(run_dir), returncode, after.wall_s - before.wall_s, 0.0)
    run.foreign_cpu_share = common.other_load(before, after)
    if returncode == 0:
        run.step_s, run.tokens_per_s = steady_steps(run_dir)
        run.peak_rss_mib = rank_peaks(run_dir)
        run.floor_rss_mib = {str(r): v for r, v in sorted(sampler.floor_mib.items())}
        run.rss_samples = sampler.samples
    return run


def descendants(root: int) -> set[int]:
    """Every process below root, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class RankMemorySampler:
    """Polls the RSS of the launch's rank processes while they train.

    ru_maxrss (what the ranks write) is a high-water mark: it holds the activations of the
    biggest micro-batch and any one-off copy made while DeepSpeed sets up, on top of the model
    states. The lowest RSS of a rank after the warm-up steps is what stays resident between
    steps (runtime, model states, communication buffers), the part the ZeRO formulas describe.
    """

    def __init__(self, root_pid: int, metrics: Path, steps: int) -> None:
        self.root_pid, self.metrics, self.steps = root_pid, metrics, steps
        self.ranks: dict[int, int] = {}  # pid -> global rank
        self.floor_mib: dict[int, float] = {}
        self.samples = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def loop(self) -> None:
        while not self.done.wait(SAMPLE_EVERY_S):
            self.poll()

    def find_ranks(self) -> None:
        """Training processes are the descendants that torchrun gave a RANK."""
        for pid in descendants(self.root_pid) - set(self.ranks):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(b"RANK="):
                    self.ranks[pid] = int(entry[5:])

    def poll(self) -> None:
        try:
            logged = len(self.metrics.read_text().splitlines())
        except OSError:
            logged = 0
        if len(self.ranks) < RANKS:
            self.find_ranks()
        if not WARMUP_STEPS <= logged < self.steps:  # only while steps 3..N run
            return
        for pid, rank in self.ranks.items():
            rss = common.status_bytes("VmRSS", pid)
            if rss is not None:
                now = rss / MIB
                self.floor_mib[rank] = min(now, self.floor_mib.get(rank, now))
                self.samples += 1


def steady_steps(run_dir: Path) -> tuple[list[float], list[float]]:
    """Seconds per step (between consecutive elapsed_s stamps) and tokens/s, warm-up left out.

    elapsed_s is wall clock since the loop started, stamped when a step is logged, so the
    difference holds everything the loop does per step, data and logging included.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "loss" in r}
    speed = {r["step"]: r["tokens_per_s"] for r in rows if "loss" in r}
    steps = [s for s in sorted(elapsed) if s > WARMUP_STEPS and s - 1 in elapsed]
    return [elapsed[s] - elapsed[s - 1] for s in steps], [speed[s] for s in steps]


def rank_peaks(run_dir: Path) -> dict[str, float]:
    """Peak RSS of every rank, as each rank wrote it at the end of its run."""
    peaks = {}
    for path in sorted((run_dir / "ranks").glob("rank*_peak.json")):
        record = json.loads(path.read_text())
        peaks[str(record["rank"])] = float(record["peak_rss_mib"])
    return peaks


def ops_compiled() -> bool:
    """True when DeepSpeed's CPU Adam is already built, so no timed run pays ~1 min for it."""
    cache = Path(
        os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions")
    )
    # The pattern raft_dist.train.deepspeed.announce_op_compilation checks: <cache>/<tag>/<op>/*.so
    return all(any(cache.glob(f"*/{op}/*.so")) for op in ("cpu_adam", "deepspeed_shm_comm"))


# ---- runtime baseline -----------------------------------------------------------------------


def probe_baseline(model_dir: Path) -> dict[str, float]:
    """What a rank holds before training: the libraries it imports, then the model it builds.

    Runs in a fresh process (see baseline_rss); the same loader as the training loop.
    """
    import accelerate  # noqa: F401
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from raft_dist.config import ModelConfig
    from raft_dist.model import load_model, load_tokenizer

    runtime = common.status_bytes("VmRSS")
    cfg = ModelConfig(name_or_path=str(model_dir), dtype="float32")
    model = load_model(cfg, load_tokenizer(cfg))
    # Weights loaded from safetensors can stay file-backed until first read, and RSS counts
    # only the pages a process touched: read every weight once so the model is resident, as
    # it is in a rank after its first step (without this the figure was 378 or 785 MiB).
    for param in model.parameters():
        param.detach().sum()
    return {
        "runtime_rss_mib": None if runtime is None else runtime / MIB,
        "runtime_and_model_peak_rss_mib": common.peak_rss_bytes() / MIB,
        "parameters": float(common.parameter_count(model)),
    }


def baseline_rss(model_dir: Path) -> dict[str, float]:
    """Run probe_baseline in a new interpreter, with the ranks' environment."""
    done = subprocess.run(
        [sys.executable, __file__, "--probe-baseline", str(model_dir)],
        cwd=ROOT,
        env=env_for_launch(),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- expected memory --------------------------------------------------------------------------


def model_state_bytes(params: int, stage: int, sizes: tuple[int, int, int], ranks: int) -> float:
    """Per-rank bytes of parameters, gradients and optimizer states (ZeRO paper, Figure 1)."""
    p, g, k = sizes
    if stage == 0:
        per_param = p + g + k
    elif stage == 1:
        per_param = p + g + k / ranks
    elif stage == 2:
        per_param = p + (g + k) / ranks
    else:
        per_param = (p + g + k) / ranks
    return per_param * params


def expected_mib(params: int, precision: str = "fp32") -> dict[str, dict[str, float]]:
    """Per profile: model states in fp32, in the paper's mixed precision, and in this run's
    precision (DDP's sizes for stage 0, the ZeRO sizes otherwise)."""
    mode = PRECISIONS[precision]
    return {
        name: {
            "fp32": model_state_bytes(params, stage, FP32_ADAM, RANKS) / MIB,
            "paper_mixed_precision": model_state_bytes(params, stage, PAPER_MIXED, RANKS) / MIB,
            "this_run": model_state_bytes(
                params, stage, mode.zero_sizes if stage else mode.ddp_sizes, RANKS
            )
            / MIB,
        }
        for name, stage in STAGE.items()
    }


# ---- summary, table, plot -------------------------------------------------------------------


def summarize(
    runs: list[Run], params: int, baseline: dict[str, float], precision: str = "fp32"
) -> dict[str, Any]:
    """Medians over rounds; the ratio to DDP is the median of per-round ratios, so each ratio
    compares runs taken minutes apart rather than across the whole invocation."""
    ok = [r for r in runs if r.returncode == 0 and r.step_s]
    by_round: dict[int, dict[str, Run]] = {}
    for run in ok:
        by_round.setdefault(run.round, {})[run.name] = run
    expected = expected_mib(params, precision)
    base = baseline["runtime_and_model_peak_rss_mib"]
    profiles: dict[str, Any] = {}
    for name in dict.fromkeys(r.name for r in runs):
        mine = [r for r in ok if r.name == name]
        ratios = [
            rnd[name].median_step_s / rnd["ddp"].median_step_s
            for rnd in by_round.values()
            if name in rnd and "ddp" in rnd
        ]
        peaks = [max(r.peak_rss_mib.values()) for r in mine if r.peak_rss_mib]
        peak = common.median(peaks)
        floors = [max(r.floor_rss_mib.values()) for r in mine if r.floor_rss_mib]
        floor = common.median(floors)
        profiles[name] = {
            "profile": PROFILES[name],
            "zero_stage": STAGE[name],
            "runs_ok": len(mine),
            "runs_failed": sum(1 for r in runs if r.name == name and r.returncode != 0),
            "median_step_s": common.median(r.median_step_s for r in mine),
            "step_s_per_round": [round(r.median_step_s, 4) for r in mine],
            "ratio_to_ddp": common.median(ratios),
            "ratio_to_ddp_per_round": [round(x, 4) for x in ratios],
            "median_tokens_per_s": common.median(t for r in mine for t in r.tokens_per_s),
            "peak_rss_mib_max_rank": peak,
            "peak_rss_mib_per_run": [r.peak_rss_mib for r in mine],
            "peak_minus_baseline_mib": peak - base,
            "floor_rss_mib_max_rank": floor,
            "floor_rss_mib_per_run": [r.floor_rss_mib for r in mine],
            "floor_minus_baseline_mib": floor - base,
            "expected_model_states_mib": expected[name],
        }
    return {
        "parameters": params,
        "precision": precision,
        "ranks": RANKS,
        "baseline": baseline,
        "profiles": profiles,
        "savings": savings(ok, expected),
        "persistence_threshold": persistence_threshold(),
        "partitioned_builds": partitioned_builds(ok),
    }


def savings(ok: list[Run], expected: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per profile: how much less each rank holds between steps than under DDP (floor RSS, max
    over ranks, DDP run of the same round) against the formula's prediction in the run's
    precision.

    predicted = (DDP's model states - the stage's model states), per rank, in MiB: the runtime,
    activations and buffers are in both floors and cancel out of the difference."""
    by_round: dict[int, dict[str, Run]] = {}
    for run in ok:
        if run.floor_rss_mib:
            by_round.setdefault(run.round, {})[run.name] = run
    ddp_states = expected["ddp"]["this_run"]
    result: dict[str, Any] = {}
    for name in dict.fromkeys(r.name for r in ok):
        if name == "ddp":
            continue
        predicted = ddp_states - expected[name]["this_run"]
        measured = [
            max(rnd["ddp"].floor_rss_mib.values()) - max(rnd[name].floor_rss_mib.values())
            for rnd in by_round.values()
            if name in rnd and "ddp" in rnd
        ]
        result[name] = {
            "measured_mib": common.median(measured),
            "measured_mib_per_round": [round(m, 1) for m in measured],
            "predicted_mib": predicted,
            "measured_over_predicted": common.median(measured) / predicted,
            "measured_over_predicted_per_round": [round(m / predicted, 3) for m in measured],
        }
    return result


def persistence_threshold() -> int:
    """stage3_param_persistence_threshold as ds_configs/zero3.json sets it (elements)."""
    zero = json.loads(ZERO3_JSON.read_text(encoding="utf-8"))["zero_optimization"]
    return int(zero.get("stage3_param_persistence_threshold", 100_000))


BUILD_LINE = re.compile(
    r"zero3 init: rank (\d+)/\d+ built the model partitioned, holds (\d+) of (\d+) parameter "
    r"elements .*?; (\d+) parameters \((\d+) elements\) are at most"
)


def partitioned_builds(ok: list[Run]) -> list[dict[str, int]]:
    """What each rank of the zero3_init runs said it held right after construction."""
    found = []
    for run in ok:
        if run.name != TARGET_PROFILE:
            continue
        text = (Path(run.run_dir) / "launch.log").read_text(encoding="utf-8", errors="replace")
        for rank, local, total, persistent, persistent_el in BUILD_LINE.findall(text):
            found.append(
                {
                    "round": run.round,
                    "rank": int(rank),
                    "local_elements": int(local),
                    "elements": int(total),
                    "persistent_parameters": int(persistent),
                    "persistent_elements": int(persistent_el),
                }
            )
    return found


def savings_table(summary: dict[str, Any]) -> str:
    header = ("profile", "saving vs DDP MiB", "predicted MiB", "measured / predicted", "per round")
    rows = [
        (
            name,
            f"{s['measured_mib']:.0f}",
            f"{s['predicted_mib']:.0f}",
            f"{s['measured_over_predicted']:.2f}",
            " / ".join(f"{r:.2f}" for r in s["measured_over_predicted_per_round"]),
        )
        for name, s in summary["savings"].items()
    ]
    return common.markdown_table(header, rows)


def target_verdict(summary: dict[str, Any]) -> tuple[float, bool]:
    share = summary["savings"][TARGET_PROFILE]["measured_over_predicted"]
    return share, share >= TARGET_SHARE_OF_PREDICTED


def table(summary: dict[str, Any]) -> str:
    """One markdown table for the terminal and for bench/README.md."""
    header = (
        "profile",
        "step s",
        "vs DDP",
        "peak RSS MiB",
        "- baseline",
        "floor - baseline",
        "states MiB (this run)",
        "fp32 MiB",
        "paper mixed MiB",
    )
    rows = []
    for name, p in summary["profiles"].items():
        exp = p["expected_model_states_mib"]
        rows.append(
            (
                name,
                f"{p['median_step_s']:.3f}",
                f"{p['ratio_to_ddp']:.2f}",
                f"{p['peak_rss_mib_max_rank']:.0f}",
                f"{p['peak_minus_baseline_mib']:+.0f}",
                f"{p['floor_minus_baseline_mib']:+.0f}",
                f"{exp['this_run']:.0f}",
                f"{exp['fp32']:.0f}",
                f"{exp['paper_mixed_precision']:.0f}",
            )
        )
    return common.markdown_table(header, rows)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Step time against DDP, and measured memory beside the expected model states."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["profiles"])
    prof = summary["profiles"]
    xs = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(xs, [prof[n]["ratio_to_ddp"] for n in names], color="tab:blue")
    left.axhline(1.0, color="grey", lw=1, ls="--")
    left.set_xticks(list(xs), names, rotation=20)
    left.set_ylabel("median step time / DDP")
    left.set_title("step time relative to DDP (lower is faster)", fontsize=9)
    width = 0.2
    series = [
        ("peak RSS - baseline (measured)", [prof[n]["peak_minus_baseline_mib"] for n in names]),
        ("floor RSS - baseline (measured)", [prof[n]["floor_minus_baseline_mib"] for n in names]),
        (
            f"{summary['precision']} model states (expected)",
            [prof[n]["expected_model_states_mib"]["this_run"] for n in names],
        ),
        (
            "paper mixed precision (expected)",
            [prof[n]["expected_model_states_mib"]["paper_mixed_precision"] for n in names],
        ),
    ]
    for i, (label, values) in enumerate(series):
        right.bar([x + (i - 1.5) * width for x in xs], values, width, label=label)
    right.set_xticks(list(xs), names, rotation=20)
    right.set_ylabel("MiB per rank (max over ranks)")
    right.set_title(
        f"{summary['parameters'] / 1e6:.1f}M params, {RANKS} ranks; baseline "
        f"{summary['baseline']['runtime_and_model_peak_rss_mib']:.0f} MiB = runtime + model",
        fontsize=9,
    )
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------


def round_order(round_: int, names: list[str]) -> list[str]:
    """DDP first in even rounds, last in odd ones: drift of a shared machine averages out."""
    return names if round_ % 2 == 0 else names[::-1]


def chosen_profiles(listed: str | None) -> list[str]:
    """--profiles as a list in PROFILES order; DDP (the reference) and the target always run."""
    if not listed:
        return list(PROFILES)
    wanted = {name.strip() for name in listed.split(",") if name.strip()}
    unknown = sorted(wanted - set(PROFILES))
    if unknown:
        known = ", ".join(PROFILES)
        raise ValueError(f"--profiles: unknown {', '.join(unknown)}; choose from {known}")
    wanted |= {"ddp", TARGET_PROFILE}
    return [name for name in PROFILES if name in wanted]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps a run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="runs per profile")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run, wait up to S seconds for other load to leave the CPU",
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc's dynamic mmap threshold on (see MALLOC_ENV): ZeRO-3's floor then "
        "includes the allocator's cache of freed gather buffers",
    )
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="fp32 (default) or bf16 mixed precision, the layout the paper's formula describes "
        "(bf16 matmuls are ~6x slower than fp32 on a CPU without bf16 instructions)",
    )
    parser.add_argument(
        "--profiles",
        metavar="A,B",
        help=f"comma-separated subset of {', '.join(PROFILES)}; ddp and {TARGET_PROFILE} "
        "always run",
    )
    parser.add_argument("--probe-baseline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.profiles = chosen_profiles(args.profiles)
    except ValueError as err:
        parser.error(str(err))
    if args.probe_baseline is None and args.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must be above {WARMUP_STEPS + 1} ({WARMUP_STEPS} are warm-up)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def measure(
    steps: int = DEFAULT_STEPS,
    rounds: int = DEFAULT_ROUNDS,
    quiet_wait: float = 0.0,
    out: Path = common.RESULTS,
    log: common.Log = print,
    malloc_default: bool = False,
    precision: str = "fp32",
    profiles: list[str] | None = None,
) -> dict[str, Any]:
    """All launches of one invocation; writes zero.json and zero.png (zero_bf16.* for bf16),
    returns what it wrote.

    Kept apart from main so that bench/run.py can call it like its other benchmarks.
    """
    started = time.perf_counter()
    stem = result_stem(precision)
    profiles = chosen_profiles(None) if profiles is None else profiles
    runs_root = out / f"{stem}_runs"
    shutil.rmtree(runs_root, ignore_errors=True)
    runs_root.mkdir(parents=True)
    params = build_model(out / "zero_model")
    recipe = write_recipe(runs_root / "recipe.yaml", out / "zero_model", steps, precision)
    log(f"model: {params / 1e6:.1f}M parameters in {out / 'zero_model'}")
    baseline = baseline_rss(out / "zero_model")
    log(
        f"baseline: runtime {baseline['runtime_rss_mib']:.0f} MiB, runtime + model "
        f"{baseline['runtime_and_model_peak_rss_mib']:.0f} MiB"
    )
    if "zero2_offload" in profiles and not ops_compiled():
        log("untimed warm-up launch of zero2_offload (DeepSpeed compiles its CPU ops)")
        warm = launch("zero2_offload", -1, recipe, runs_root / "warmup_zero2_offload", steps)
        log(f"  done in {warm.wall_s:.0f} s (rc {warm.returncode})")

    runs: list[Run] = []
    for round_ in range(rounds):
        for name in round_order(round_, profiles):
            waited = common.wait_for_quiet(quiet_wait)
            run_dir = runs_root / f"r{round_}_{name}"
            run = launch(name, round_, recipe, run_dir, steps, malloc_default)
            runs.append(run)
            status = "ok" if run.returncode == 0 else f"FAILED rc={run.returncode}"
            peak = max(run.peak_rss_mib.values()) if run.peak_rss_mib else float("nan")
            floor = max(run.floor_rss_mib.values()) if run.floor_rss_mib else float("nan")
            log(
                f"round {round_ + 1} {name:<14} {status}: median step {run.median_step_s:.3f} s, "
                f"peak RSS {peak:.0f} MiB, floor {floor:.0f} MiB, launch {run.wall_s:.0f} s, "
                f"other load {run.foreign_cpu_share:.0%}"
                + (f", waited {waited:.0f} s" if waited > 2 else "")
            )
            if run.returncode != 0:
                log(f"  see {run.run_dir}/launch.log")

    summary = summarize(runs, params, baseline, precision)
    payload = {
        "command": common.command_line(),
        "wall_s": time.perf_counter() - started,
        "steps": steps,
        "rounds": rounds,
        "warmup_steps_excluded": WARMUP_STEPS,
        "model_shape": MODEL_SHAPE,
        "model_seed": MODEL_SEED,
        "precision": precision,
        "bytes_per_param": {
            "ddp": PRECISIONS[precision].ddp_sizes,
            "zero": PRECISIONS[precision].zero_sizes,
            "paper_mixed_precision": PAPER_MIXED,
        },
        "load_avg_at_end": os.getloadavg(),
        "malloc_env": {} if malloc_default else MALLOC_ENV,
        "contended_runs": [
            f"r{r.round + 1} {r.name}" for r in runs if r.foreign_cpu_share > common.QUIET_SHARE
        ],
        "failed_runs": [f"r{r.round + 1} {r.name}" for r in runs if r.returncode != 0],
        "summary": summary,
        "runs": [{**asdict(r), "median_step_s": r.median_step_s} for r in runs],
    }
    common.write_json(out / f"{stem}.json", payload)
    plot(summary, out / f"{stem}.png")
    return payload


def result_stem(precision: str) -> str:
    """zero for fp32 (the default), zero_bf16 for bf16: both can sit in bench/results."""
    return "zero" if precision == "fp32" else f"zero_{precision}"


def report_lines(payload: dict[str, Any]) -> list[str]:
    """The table and what its columns mean."""
    summary, steps = payload["summary"], payload["steps"]
    baseline = summary["baseline"]
    lines = [table(summary), savings_table(summary)]
    share, met = target_verdict(summary)
    precision = payload.get("precision", "fp32")
    lines.append(
        f"target ({precision}): {TARGET_PROFILE} (ZeRO-3, model built partitioned) saves at least "
        f"{TARGET_SHARE_OF_PREDICTED:.0%} of the predicted saving: measured / predicted = "
        f"{share:.2f}, " + ("met" if met else "NOT met")
    )
    builds = summary["partitioned_builds"]
    if builds:
        b = builds[0]
        lines.append(
            f"{TARGET_PROFILE}: right after construction each rank held "
            + ", ".join(f"{x['local_elements'] / x['elements']:.1%}" for x in builds)
            + f" of the {b['elements'] / 1e6:.1f}M parameter elements"
        )
    lines.append(
        "saving = DDP's floor RSS minus the profile's (max over ranks, same round); predicted = "
        "the ZeRO paper's per-rank model states, (P+G+K)Ψ for DDP minus the stage's (ZeRO-1: "
        "(P+G)Ψ + KΨ/N, ZeRO-2: PΨ + (G+K)Ψ/N, ZeRO-3: (P+G+K)Ψ/N, N = 2), bytes per "
        f"parameter: {PRECISIONS[precision].note}; the runtime, activations and buffers are "
        "in both floors and cancel. stage3_param_persistence_threshold = "
        f"{summary['persistence_threshold']} elements (ds_configs/zero3.json): ZeRO-3 holds "
        "parameters up to that size whole on every rank while training"
        + (
            f" ({b['persistent_parameters']} parameters, {b['persistent_elements']} elements "
            "in this model)"
            if builds
            else ""
        )
    )
    if payload["contended_runs"]:
        lines.append(
            f"other processes took over {common.QUIET_SHARE:.0%} of the CPU during: "
            + ", ".join(payload["contended_runs"])
        )
    if payload["failed_runs"]:
        lines.append("failed: " + ", ".join(payload["failed_runs"]))
    lines.append(
        f"{precision} on CPU, {RANKS} ranks, {summary['parameters'] / 1e6:.1f}M parameters; "
        "'step s' = "
        f"median over rounds of each run's median step (steps {WARMUP_STEPS + 1}-{steps}); "
        "'- baseline': minus the peak RSS of a process that imported the libraries and built "
        f"the model ({baseline['runtime_and_model_peak_rss_mib']:.0f} MiB; imports alone "
        f"{baseline['runtime_rss_mib']:.0f} MiB); peak = ranks' ru_maxrss, floor = lowest RSS "
        f"sampled every {SAMPLE_EVERY_S} s during steps {WARMUP_STEPS + 1}-{steps}; "
        "states = parameters + gradients + optimizer states per rank; glibc: "
        + (
            " ".join(f"{k}={v}" for k, v in payload["malloc_env"].items())
            if payload.get("malloc_env")
            else "defaults (--malloc-default)"
        )
        + " in every rank"
    )
    return lines


def report_rows(payload: dict[str, Any]) -> list[common.Row]:
    """(metric, value, target, verdict) rows for bench/run.py's table."""
    share, met = target_verdict(payload["summary"])
    precision = payload.get("precision", "fp32")
    rows = [
        (
            f"{TARGET_PROFILE} saving vs DDP / predicted ({precision})",
            f"{share:.2f}",
            f">= {TARGET_SHARE_OF_PREDICTED:.2f}",
            "met" if met else "NOT met",
        )
    ]
    for name, p in payload["summary"]["profiles"].items():
        exp = p["expected_model_states_mib"]
        rows.append((f"{name} step time / DDP ({precision})", f"{p['ratio_to_ddp']:.2f}", "", ""))
        rows.append(
            (
                f"{name} peak RSS MiB (max rank, {precision})",
                f"{p['peak_rss_mib_max_rank']:.0f} (states: {exp['this_run']:.0f}, "
                f"paper {exp['paper_mixed_precision']:.0f})",
                "",
                "",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_baseline is not None:
        print(json.dumps(probe_baseline(args.probe_baseline)))
        return 0
    payload = measure(
        args.steps,
        args.rounds,
        args.quiet_wait,
        args.out,
        common.progress,
        args.malloc_default,
        args.precision,
        args.profiles,
    )
    print()
    print("\n\n".join(report_lines(payload)))
    print(f"total {payload['wall_s']:.0f} s")
    stem = result_stem(args.precision)
    print(f"written: {args.out / (stem + '.json')}, {args.out / (stem + '.png')}")
    return 1 if payload["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
