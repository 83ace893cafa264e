"""Kill -9 fault injection: chained kill -> resume -> kill runs against an uninterrupted reference.

    .venv/bin/python bench/faults.py [--configs ddp,zero2,lora] [--kills 10] [--seed S]
        [--targets node,worker,group] [--max-steps 16] [--out bench/results/faults]
    make faults FAULTS_ARGS='--seed S'

Per configuration (ddp: `--profile cpu`; zero2: `--profile deepspeed_zero2` on the CPU; lora:
`--profile cpu` with lora.enabled=true), all 2 processes, fp32, the tiny built-in model:

1. a small synthetic RAFT data set (train and eval splits, tests/helpers.py makers) and one
   uninterrupted reference run (`ref/`);
2. a chained run (`chain/`) on the same recipe with training.resume=latest: every attempt is a
   `raft-dist launch` in its own process group (start_new_session), killed with SIGKILL at a
   planned moment, then started again; after its kills the last attempt runs to the end.

--kills is the total over the configs, shared out in order (10: 4, 3, 3); a config with at least
3 kills gets a step, a checkpoint and an evaluation kill, further ones at random (startup too),
with node and worker kills alternating from a random start.

Kill moments, each triggered by an event the harness watches (polling every millisecond):
* step:       a new train line for step t in metrics.jsonl (t odd, not an evaluation step),
              then a random share of half a reference step: the kill lands in step t+1;
* checkpoint: a new `checkpoints/.step-XXXXXXXX.tmp` folder (a checkpoint being written);
* eval:       a new train line for an evaluation step e (e % eval_every == 0), then a random
              share of half the reference's evaluation time: the evaluation after step e runs;
* startup:    a time offset, a random share of the reference's time to its first step (torch
              and model loading, the rank-0 resume checks and the checkpoint load).
Kill targets: `node` = SIGKILL to every process group of the launch tree at once (raft-dist
launch and the accelerate agent share one; torch elastic starts each worker in a session of
its own); `worker` = SIGKILL to one rank (the agent must tear down the rest); `group` =
os.killpg on the launch's own process group alone: the ranks, in sessions of their own, must
die with their agent (raft_dist.distributed.die_with_parent), not train on as orphans.

After every kill the launch must exit within a bound and leave no process of its run behind.
Where the kill landed is read back from what it left (a `.tmp` checkpoint folder, a train line
without its evaluation line, no line at all) and printed next to what was planned.

Checks on the finished chained run, each a failure naming config, seed and kill sequence:
final weights (final/*.safetensors) torch.equal to the reference's, tensor by tensor; the union
of the ranks' record audits (audit/seen_ids_rank*.txt) equal to the reference's as a multiset;
metrics.jsonl with each train and evaluation step at most once, every step present, and the
reference's losses; the summary says the schedule finished; no checkpoint moved aside as
damaged. The same --seed replays the same plan (moments, targets, ranks) and the same random
stream for the concrete steps and delays; which step a kill aims at also depends on where the
previous kill left the run, and where it lands on timing.

Writes <out>/faults.json (every kill, every check) and keeps each config's runs and launch logs
under <out>/<config>/. Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import RAFT_DIST, free_port, offline_env, write_dataset, write_recipe  # noqa: E402

MOMENTS = ("step", "checkpoint", "eval", "startup")
TARGETS = ("node", "worker", "group")
DEFAULT_TARGETS = ("node", "worker", "group")
DEFAULT_CONFIGS = "ddp,zero2,lora"
KILLS = 10  # in all: the CI size (tests/test_faults.py)
MAX_STEPS = 16
SAVE_EVERY = 2
EVAL_EVERY = 3
TRAIN_SHARDS = [7, 5, 6, 6]  # 24 records: 6 steps an epoch (2 ranks x micro 1 x accum 2)
EVAL_SHARDS = (4, 4)
POLL_S = 0.001
ATTEMPT_TIMEOUT_S = 600  # one launch, start to exit, killed or not
TEARDOWN_BOUND_S = 60  # a killed worker: the agent must end the launch within this
ORPHAN_GRACE_S = 2  # after the launch exited, its processes must be gone within this


@dataclass(frozen=True)
class Config:
    name: str
    profile: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)


CONFIGS = {
    "ddp": Config("ddp", "cpu"),
    "zero2": Config("zero2", "deepspeed_zero2"),
    "lora": Config(
        "lora",
        "cpu",
        {
            "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"lr": 1e-2},
        },
    ),
}


@dataclass
class Kill:
    """One kill: the plan, then what happened."""

    config: str
    attempt: int
    moment: str  # planned
    target: str
    rank: int | None  # the worker's rank (worker target)
    event: str = ""  # what triggers it, e.g. "train line 5"
    delay_s: float = 0.0  # after the event
    resumed_from: int = 0  # the newest checkpoint step when the attempt started
    pids: list[int] = field(default_factory=list)
    at_s: float | None = None  # seconds after the attempt's start
    landed: str = ""  # where it landed, read from what it left
    evidence: str = ""
    exit_code: int | None = None
    exit_after_s: float | None = None
    orphans: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        target = f"worker rank {self.rank}" if self.target == "worker" else self.target
        at = f"{self.at_s:.2f} s" if self.at_s is not None else "not fired"
        exited = (
            f"exit {self.exit_code} {self.exit_after_s:.1f} s later"
            if self.exit_after_s is not None
            else f"exit {self.exit_code}"
        )
        landed = f"landed: {self.landed}" + (f" ({self.evidence})" if self.evidence else "")
        return (
            f"config={self.config} attempt={self.attempt} moment={self.moment} "
            f"[{self.event}, +{self.delay_s * 1000:.0f} ms] target={target} "
            f"pids={self.pids} at {at} after start (resumed from step {self.resumed_from}); "
            f"{exited}; {landed}"
            + ("" if not self.problems else "; PROBLEM: " + "; ".join(self.problems))
        )


@dataclass
class ConfigResult:
    config: str
    profile: str
    seed: int
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0
    resumes: int = 0  # attempts that started from a checkpoint
    checks: dict[str, str] = field(default_factory=dict)  # name -> "ok" or the failure
    reference_s: float = 0.0
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        kill_problems = [f"kill {i + 1}: {p}" for i, k in enumerate(self.kills) for p in k.problems]
        return kill_problems + [f"{n}: {v}" for n, v in self.checks.items() if v != "ok"]

    @property
    def moments_hit(self) -> int:
        return sum(1 for k in self.kills if k.landed == k.moment)

    def sequence(self) -> str:
        return ", ".join(
            f"{k.moment}/{k.target}{'' if k.rank is None else k.rank}@{k.event}" for k in self.kills
        )


# ---- processes ---------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                kids += [int(k) for k in handle.read().split()]
        except OSError:
            pass
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (reparented orphans are not found: see run_processes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children(current)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def environ_rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            pairs = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for pair in pairs:
        if pair.startswith("RANK="):
            return int(pair[5:])
    return None


def run_processes(recipe: Path) -> list[int]:
    """Every live process started for this recipe (launcher, agent, ranks), orphans included."""
    needle = str(recipe)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and needle in cmdline(int(entry)):
            if alive(int(entry)):
                found.append(int(entry))
    return found


def workers(launch_pid: int) -> dict[int, int]:
    """rank -> pid of the launch's training processes."""
    ranks = {}
    for pid in process_tree(launch_pid):
        rank = environ_rank(pid)
        if rank is not None and any(a.endswith("train.py") for a in cmdline(pid)):
            ranks[rank] = pid
    return ranks


def kill_groups(pids: list[int]) -> list[int]:
    """SIGKILL every process group these processes belong to; returns the groups."""
    groups = []
    for pid in pids:
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            continue
        if group not in groups:
            groups.append(group)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return groups


# ---- the run folder ----------------------------------------------------------------------


def metric_lines(run_dir: Path) -> list[str]:
    try:
        return (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None  # a line torn by a kill
    return value if isinstance(value, dict) else None


def newest_checkpoint(run_dir: Path) -> int:
    steps = [
        int(p.name[5:])
        for p in (run_dir / "checkpoints").glob("step-*")
        if p.is_dir() and p.name[5:].isdigit()
    ]
    return max(steps, default=0)


def folder_state(run_dir: Path) -> tuple[Any, ...]:
    """What a live rank would change: the metrics log, the checkpoints, final/."""
    try:
        info = (run_dir / "metrics.jsonl").stat()
        metrics = (info.st_size, info.st_mtime_ns)
    except OSError:
        metrics = None
    try:
        saved = sorted(os.listdir(run_dir / "checkpoints"))
    except OSError:
        saved = []
    return metrics, saved, (run_dir / "final").exists()


def tmp_checkpoints(run_dir: Path) -> dict[str, tuple[int, int]]:
    """`.step-*.tmp` folders being written: name -> (inode, ctime), to tell new from stale."""
    found = {}
    try:
        with os.scandir(run_dir / "checkpoints") as entries:
            for entry in entries:
                if entry.name.startswith(".step-") and entry.name.endswith(".tmp"):
                    try:
                        info = entry.stat()
                    except OSError:
                        continue
                    found[entry.name] = (info.st_ino, info.st_ctime_ns)
    except OSError:
        pass
    return found


class Watch:
    """What an attempt adds to the run folder, told apart from what was there at its start."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stale_lines = set(metric_lines(run_dir))
        self.stale_tmps = tmp_checkpoints(run_dir)
        self._stamp: tuple[int, int, int] | None = None
        self._new: list[dict[str, Any]] = []

    def new_lines(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        try:
            info = path.stat()
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        except OSError:
            return self._new
        if stamp != self._stamp:
            self._stamp = stamp
            lines = [x for x in metric_lines(self.run_dir) if x not in self.stale_lines]
            self._new = [v for v in map(parse, lines) if v is not None]
        return self._new

    def new_tmps(self) -> list[str]:
        return [
            name
            for name, ident in tmp_checkpoints(self.run_dir).items()
            if self.stale_tmps.get(name) != ident
        ]

    def fired(self, moment: str, step: int) -> bool:
        if moment in ("step", "eval"):
            return any("loss" in v and v.get("step") == step for v in self.new_lines())
        if moment == "checkpoint":
            return f".step-{step:08d}.tmp" in self.new_tmps()
        return False

    def landed(self) -> tuple[str, str]:
        """Where the kill landed, from what the attempt left behind."""
        if (self.run_dir / "final").exists():
            return "after training", "final/ written"
        tmps = self.new_tmps()
        if tmps:
            return "checkpoint", f"{tmps[0]} left"
        lines = self.new_lines()
        if not lines:
            return "startup", "no metrics line"
        trained = [v["step"] for v in lines if "loss" in v]
        evaluated = {v["step"] for v in lines if "eval_loss" in v}
        last = max(trained, default=0)
        if last and last % EVAL_EVERY == 0 and last not in evaluated:
            return "eval", f"train line {last} without its eval line"
        return "step", f"last train line {last}"


# ---- planning ----------------------------------------------------------------------------


@dataclass
class Timings:
    """From the reference run: how long the phases a kill aims at take."""

    first_line_s: float  # launch start to the first metrics line
    step_s: float  # median optimizer step
    eval_s: float  # median evaluation


def plan(rng: random.Random, kills: int, targets: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """(moment, target, rank) per kill: every main moment once, then random ones."""
    moments = ["step", "checkpoint", "eval"][:kills]
    moments += [rng.choice(MOMENTS) for _ in range(kills - len(moments))]
    rng.shuffle(moments)
    offset = rng.randrange(len(targets))
    chosen = [targets[(i + offset) % len(targets)] for i in range(kills)]
    rng.shuffle(chosen)
    return [(m, t, rng.randint(0, 1)) for m, t in zip(moments, chosen, strict=True)]


def aim(
    rng: random.Random, moment: str, resumed_from: int, max_steps: int, timings: Timings
) -> tuple[str, int, float, str]:
    """The concrete event for a planned moment, given the step the attempt resumes from:
    (moment, step, delay_s, event). A moment no step is left for becomes a startup kill."""
    r = resumed_from
    if moment == "step":
        odd = [t for t in range(r + 1, min(r + 6, max_steps)) if t % 2 and t % EVAL_EVERY]
        if odd:
            step = rng.choice(odd)
            return moment, step, rng.uniform(0, 0.5) * timings.step_s, f"train line {step}"
    if moment == "checkpoint":
        saves = [s for s in (r + SAVE_EVERY, r + 2 * SAVE_EVERY) if s <= max_steps]
        if saves:
            step = rng.choice(saves)
            return moment, step, 0.0, f".step-{step:08d}.tmp appears"
    if moment == "eval":
        evals = [e for e in range(r + 1, max_steps + 1) if e % EVAL_EVERY == 0][:2]
        if evals:
            step = rng.choice(evals)
            return moment, step, rng.uniform(0, 0.5) * timings.eval_s, f"train line {step}"
    delay = rng.uniform(0.4, 1.0) * timings.first_line_s
    return "startup", 0, delay, "time offset"


# ---- one config --------------------------------------------------------------------------


class Harness:
    def __init__(self, config: Config, seed: int, out: Path, max_steps: int) -> None:
        self.config = config
        self.seed = seed
        self.root = out / config.name
        self.max_steps = max_steps
        self.logs = self.root / "logs"
        self.env = offline_env()
        self.result = ConfigResult(config.name, config.profile, seed)

    def recipe(self, name: str) -> Path:
        sections = {k: dict(v) for k, v in self.config.sections.items()}
        training = {
            "seed": 7,
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 2,
            "max_steps": self.max_steps,
            "save_every": SAVE_EVERY,
            "keep_last": 2,
            "eval_every": EVAL_EVERY,
            "process_group_timeout_s": 120,
            **sections.pop("training", {}),
        }
        return write_recipe(
            self.root / f"{name}.yaml",
            self.root / "data",
            self.root / name,
            model={"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
            data={"record_audit": True},
            training=training,
            **sections,
        )

    def start(self, recipe: Path, log_name: str, *overrides: str) -> subprocess.Popen:
        command = [*RAFT_DIST, "launch", "--profile", self.config.profile, "--config"]
        command += [str(recipe), *overrides, "--main_process_port", str(free_port())]
        with (self.logs / f"{log_name}.log").open("w") as log:
            return subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a node to kill
            )

    def reference(self) -> Timings:
        recipe = self.recipe("ref")
        started = time.monotonic()
        process = self.start(recipe, "ref")
        first = None
        while process.poll() is None and time.monotonic() - started < ATTEMPT_TIMEOUT_S:
            if first is None and metric_lines(self.root / "ref"):
                first = time.monotonic() - started
            time.sleep(0.01)
        if process.poll() is None:
            kill_groups(process_tree(process.pid))
            process.wait()
        self.result.reference_s = time.monotonic() - started
        if process.returncode != 0:
            raise RuntimeError(
                f"{self.config.name}: the reference run failed (exit {process.returncode}); "
                f"see {self.logs / 'ref.log'}"
            )
        lines = [v for v in map(parse, metric_lines(self.root / "ref")) if v]
        train = {v["step"]: v["elapsed_s"] for v in lines if "loss" in v}
        evals = {v["step"]: v["elapsed_s"] for v in lines if "eval_loss" in v}
        steps = [train[s] - train[s - 1] for s in train if s - 1 in train]
        eval_times = [evals[s] - train[s] for s in evals if s in train and s < self.max_steps]
        return Timings(
            first_line_s=first or self.result.reference_s,
            step_s=statistics.median(steps) if steps else 0.05,
            eval_s=statistics.median(eval_times) if eval_times else 0.05,
        )

    def chain(self, schedule: list[tuple[str, str, int]], timings: Timings) -> int | None:
        """The killed attempts, then the last one to the end. Returns its exit code."""
        rng = random.Random(f"{self.seed}/{self.config.name}/aim")
        recipe = self.recipe("chain")
        run_dir = self.root / "chain"
        for attempt, (moment, target, rank) in enumerate(schedule, start=1):
            resumed_from = newest_checkpoint(run_dir)
            moment, step, delay, event = aim(rng, moment, resumed_from, self.max_steps, timings)
            kill = Kill(self.config.name, attempt, moment, target, None, event, delay, resumed_from)
            if target == "worker":
                kill.rank = rank
            self.result.kills.append(kill)
            self.result.attempts += 1
            self.result.resumes += resumed_from > 0
            finished = self.killed_attempt(recipe, run_dir, kill, step)
            print(f"kill {attempt}/{len(schedule)}: {kill.line()}", flush=True)
            if finished:
                break
        resumed_from = newest_checkpoint(run_dir)
        self.result.attempts += 1
        self.result.resumes += resumed_from > 0
        process = self.start(recipe, f"attempt-{self.result.attempts}", "training.resume=latest")
        try:
            code = process.wait(timeout=ATTEMPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_groups(process_tree(process.pid))
            process.wait()
            self.result.checks["last attempt"] = f"still running after {ATTEMPT_TIMEOUT_S} s"
            return None
        print(
            f"attempt {self.result.attempts}: resumed from step {resumed_from}, ran to the end, "
            f"exit {code}",
            flush=True,
        )
        return code

    def killed_attempt(self, recipe: Path, run_dir: Path, kill: Kill, step: int) -> bool:
        """Start, wait for the event, kill, wait for the launch to end. True: the attempt
        finished on its own before the event (nothing left to kill)."""
        watch = Watch(run_dir)
        log_name = f"attempt-{kill.attempt}"
        started = time.monotonic()
        process = self.start(recipe, log_name, "training.resume=latest")
        worker_pids: dict[int, int] = {}
        fired_at = None
        while process.poll() is None:
            now = time.monotonic()
            if now - started > ATTEMPT_TIMEOUT_S:
                kill.problems.append(f"no kill moment within {ATTEMPT_TIMEOUT_S} s")
                break
            if kill.target == "worker" and kill.rank not in worker_pids:
                worker_pids = workers(process.pid)
            if fired_at is None:
                if kill.moment == "startup":
                    if now - started >= kill.delay_s:
                        fired_at = now
                elif watch.fired(kill.moment, step):
                    fired_at = now
            if (
                fired_at is not None
                and now - fired_at >= (0 if kill.moment == "startup" else kill.delay_s)
                and (kill.target != "worker" or kill.rank in worker_pids)
            ):
                break
            time.sleep(POLL_S)
        if process.poll() is not None:
            kill.exit_code = process.returncode
            kill.landed, kill.evidence = "not fired", "the attempt ended before the moment"
            if process.returncode == 0:
                return True
            kill.problems.append(
                f"the attempt failed by itself (exit {process.returncode}) before the kill; "
                f"see {self.logs / log_name}.log"
            )
            return False
        if kill.target == "worker":
            pids = [worker_pids[kill.rank]]
            os.kill(pids[0], signal.SIGKILL)
        elif kill.target == "group":
            pids = [process.pid]
            os.killpg(process.pid, signal.SIGKILL)
        else:
            pids = process_tree(process.pid)
            kill_groups(pids)
        killed = time.monotonic()
        kill.at_s, kill.pids = killed - started, pids
        bound = TEARDOWN_BOUND_S if kill.target == "worker" else 10
        try:
            kill.exit_code = process.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            kill.problems.append(
                f"raft-dist launch still running {bound} s after the kill; killed its groups"
            )
            kill_groups(process_tree(process.pid))
            kill.exit_code = process.wait()
        kill.exit_after_s = time.monotonic() - killed
        # Read at the exit: a process that outlived the launch must not change the story.
        kill.landed, kill.evidence = watch.landed()
        at_exit = folder_state(run_dir)
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while run_processes(recipe) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill.orphans = run_processes(recipe)
        if kill.orphans:
            described = [
                f"{pid} (rank {environ_rank(pid)}: {' '.join(cmdline(pid)[1:4])})"
                for pid in kill.orphans
            ]
            kill.problems.append(
                f"processes still running {ORPHAN_GRACE_S} s after the launch exited: "
                f"{', '.join(described)}; killed them"
            )
            kill_groups(kill.orphans)
            time.sleep(0.5)
        if folder_state(run_dir) != at_exit:
            kill.problems.append(
                "the run folder changed after the launch exited (metrics.jsonl, checkpoints "
                "or final/): processes of the killed run kept training"
            )
        return False

    def verify(self, code: int | None) -> None:
        ref, chain = self.root / "ref", self.root / "chain"
        checks = self.result.checks
        if code is not None:
            checks["last attempt"] = "ok" if code == 0 else f"exit {code}"
        try:
            summary = json.loads((chain / "summary.json").read_text(encoding="utf-8"))
            done = summary.get("steps") == self.max_steps and summary.get("stopped") is None
            checks["finished"] = "ok" if done else f"summary: steps {summary.get('steps')}"
        except (OSError, ValueError) as exc:
            checks["finished"] = f"no summary.json ({exc})"
        checks["weights"] = compare_weights(ref / "final", chain / "final")
        checks["record audit"] = compare_audits(ref, chain)
        checks["metrics"] = compare_metrics(ref, chain, self.max_steps)
        damaged = sorted(p.name for p in (chain / "checkpoints").glob("damaged-*"))
        checks["checkpoints"] = "ok" if not damaged else f"moved aside as damaged: {damaged}"


def compare_weights(ref: Path, chain: Path) -> str:
    import torch
    from safetensors.torch import load_file

    files = sorted(p.name for p in ref.glob("*.safetensors"))
    if not files:
        return f"the reference has no {ref}/*.safetensors"
    if sorted(p.name for p in chain.glob("*.safetensors")) != files:
        return f"{chain} holds {sorted(p.name for p in chain.glob('*.safetensors'))}, not {files}"
    for name in files:
        left, right = load_file(ref / name), load_file(chain / name)
        if left.keys() != right.keys():
            return f"{name}: tensor names differ ({sorted(left.keys() ^ right.keys())[:4]})"
        differing = [k for k in left if not torch.equal(left[k], right[k])]
        if differing:
            worst = max((left[k] - right[k]).abs().max().item() for k in differing)
            return (
                f"{name}: {len(differing)} of {len(left)} tensors differ (first {differing[0]}, "
                f"largest difference {worst:.3g})"
            )
    return "ok"


def audit_ids(run_dir: Path) -> Counter[str]:
    files = sorted((run_dir / "audit").glob("seen_ids_rank*.txt"))
    return Counter(i for f in files for i in f.read_text(encoding="utf-8").split())


def compare_audits(ref: Path, chain: Path) -> str:
    want, got = audit_ids(ref), audit_ids(chain)
    if not want:
        return f"the reference wrote no record audit under {ref / 'audit'}"
    if want == got:
        return "ok"
    extra, missing = got - want, want - got
    return (
        f"{sum(got.values())} ids read against the reference's {sum(want.values())}: "
        f"{sum(extra.values())} reads too many ({_sample(extra)}), "
        f"{sum(missing.values())} missing ({_sample(missing)})"
    )


def _sample(counts: Counter[str]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())[:3]) or "none"


def compare_metrics(ref: Path, chain: Path, max_steps: int) -> str:
    problems = []
    lines = metric_lines(chain)
    parsed = [v for v in map(parse, lines) if v is not None]
    if len(parsed) != len(lines):
        problems.append(f"{len(lines) - len(parsed)} torn lines")
    want = {v["step"]: v["loss"] for v in map(parse, metric_lines(ref)) if v and "loss" in v}
    for kind in ("loss", "eval_loss"):
        steps = Counter(v["step"] for v in parsed if kind in v)
        twice = sorted(s for s, n in steps.items() if n > 1)
        if twice:
            what = "train" if kind == "loss" else "eval"
            problems.append(f"{what} steps logged more than once: {_runs(twice)}")
    got = [(v["step"], v["loss"]) for v in parsed if "loss" in v]
    missing = sorted(set(range(1, max_steps + 1)) - {s for s, _ in got})
    if missing:
        problems.append(f"train steps missing: {_runs(missing)}")
    differing = sorted({s for s, loss in got if s in want and loss != want[s]})
    if differing:
        problems.append(f"losses differ from the reference at steps {_runs(differing)}")
    return "ok" if not problems else "; ".join(problems)


def _runs(steps: list[int]) -> str:
    return ",".join(map(str, steps))


# ---- main --------------------------------------------------------------------------------


def run_config(
    config: Config, seed: int, out: Path, kills: int, targets: tuple[str, ...], max_steps: int
) -> ConfigResult:
    harness = Harness(config, seed, out, max_steps)
    shutil.rmtree(harness.root, ignore_errors=True)
    harness.logs.mkdir(parents=True)
    started = time.monotonic()
    rng = random.Random(f"{seed}/{config.name}")
    write_dataset(
        harness.root / "data", TRAIN_SHARDS, eval_sizes=EVAL_SHARDS, seed=rng.randrange(10**6)
    )
    schedule = plan(rng, kills, targets)
    try:
        timings = harness.reference()
        print(
            f"{config.name}: reference {harness.result.reference_s:.1f} s (first step after "
            f"{timings.first_line_s:.1f} s, step {timings.step_s * 1000:.0f} ms, evaluation "
            f"{timings.eval_s * 1000:.0f} ms); plan: "
            + ", ".join(
                f"{m}/{t}" + (f" rank {r}" if t == "worker" else "") for m, t, r in schedule
            ),
            flush=True,
        )
        code = harness.chain(schedule, timings)
        harness.verify(code)
    except RuntimeError as exc:
        harness.result.checks["reference"] = str(exc)
    harness.result.seconds = time.monotonic() - started
    return harness.result


def table(results: list[ConfigResult]) -> str:
    header = ("config", "kills", "moments hit", "resumes", "result", "seconds")
    rows = [
        (
            r.config,
            str(sum(1 for k in r.kills if k.at_s is not None)),
            f"{r.moments_hit}/{len(r.kills)}",
            str(r.resumes),
            "PASS" if not r.failures else "FAIL",
            f"{r.seconds:.0f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), rule, *map(fmt, rows)])


def landed_counts(results: list[ConfigResult]) -> str:
    counts = Counter((k.moment, k.landed) for r in results for k in r.kills)
    return ", ".join(f"{m}->{landed} x{n}" for (m, landed), n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="of: " + ",".join(CONFIGS))
    parser.add_argument("--kills", type=int, default=KILLS, help="in all, over the configs")
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="node,worker,group")
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults")
    args = parser.parse_args(argv)
    seed = args.seed
    if seed is None:
        from_env = os.environ.get("RAFT_DIST_FAULTS_SEED")
        seed = int(from_env) if from_env else int(time.time()) % 1_000_000
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [n for n in names if n not in CONFIGS] + [t for t in targets if t not in TARGETS]
    if unknown or not names or not targets or args.kills < 0:
        parser.error(f"unknown or empty: {unknown or '--configs/--targets/--kills'}")
    replay = f"--seed {seed}" + (
        "" if args.configs == DEFAULT_CONFIGS else f" --configs {args.configs}"
    )
    replay += "" if args.kills == KILLS else f" --kills {args.kills}"
    if targets != DEFAULT_TARGETS:
        replay += f" --targets {','.join(targets)}"
    print(f"faults seed: {seed} (replay: make faults FAULTS_ARGS='{replay}')", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    shares = [args.kills // len(names) + (i < args.kills % len(names)) for i in range(len(names))]
    for name, kills in zip(names, shares, strict=True):
        result = run_config(CONFIGS[name], seed, args.out, kills, targets, args.max_steps)
        results.append(result)
        for failure in result.failures:
            print(f"FAIL {name} (seed {seed}; kills: {result.sequence()}): {failure}", flush=True)
    total = time.monotonic() - started
    kills = sum(1 for r in results for k in r.kills if k.at_s is not None)
    print()
    print(table(results))
    print(
        f"\n{kills} kills in {total:.0f} s; where they landed (planned->landed): "
        f"{landed_counts(results)}"
    )
    print(f"faults seed: {seed} (replay: make faults FAULTS_ARGS='{replay}')")
    report = {
        "seed": seed,
        "replay": f"make faults FAULTS_ARGS='{replay}'",
        "command": [sys.executable, *sys.argv],
        "kills_planned": dict(zip(names, shares, strict=True)),
        "targets": list(targets),
        "max_steps": args.max_steps,
        "seconds": round(total, 1),
        "kills": kills,
        "passed": all(not r.failures for r in results),
        "configs": [
            {
                **{k: v for k, v in asdict(r).items() if k != "kills"},
                "kills": [asdict(k) for k in r.kills],
                "moments_hit": r.moments_hit,
                "failures": r.failures,
                "sequence": r.sequence(),
                "result": "PASS" if not r.failures else "FAIL",
            }
            for r in results
        ],
    }
    (args.out / "faults.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"report: {args.out / 'faults.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
