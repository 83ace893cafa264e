"""What ending without interpreter teardown saves: a whole `raft-dist train` (one process) and a
whole 2-process launch of the tiny recipe, each against the same work ended the usual way.

With torch and transformers imported, Python's teardown runs after the work is done. raft-dist's
commands (raft_dist/cli.py: run) and the launcher's accelerate agent
(raft_dist/accelerate_agent.py) end with os._exit once everything is written. The baselines do
the same work and end normally: `raft-dist train` through cli.main and sys.exit, and the launch
with Accelerate's own `python -m accelerate.commands.launch` as the agent (the ranks as in both).
Runs are interleaved, one untimed warm-up each; the ratio is baseline / raft-dist per pair.

    python bench/process_exit.py [--pairs 5] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

DEFAULT_PAIRS = 5
DEFAULT_STEPS = 2
RECIPE = common.ROOT / "configs" / "tiny.yaml"
AGENT = "raft_dist.accelerate_agent"
ACCELERATE_AGENT = "accelerate.commands.launch"
MAIN_AND_SYS_EXIT = "import sys; from raft_dist.cli import main; sys.exit(main(sys.argv[1:]))"


def overrides(out: Path, steps: int) -> list[str]:
    return [
        f"output.dir={out}",
        f"training.max_steps={steps}",
        "training.warmup_steps=0",
        "training.eval_every=0",
        "training.save_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=False, env=env, cwd=common.ROOT)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode()[-800:]}")
    return elapsed


def commands(tmp: Path, steps: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command, environment); each run writes a fresh output folder under tmp."""
    from raft_dist.launcher import plan_launch

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    train = ["train", "--config", str(RECIPE), *overrides(tmp / "train", steps)]
    port = ["--main_process_port", str(common.free_port())]
    plan = plan_launch("cpu", str(RECIPE), overrides(tmp / "launch", steps), port, environ=env)
    launch_env = {**env, **plan.env}
    launch = plan.command
    assert launch[1:3] == ["-m", AGENT], launch[:3]
    return {
        "train": ([sys.executable, "-m", "raft_dist.cli", *train], env),
        "train_teardown": ([sys.executable, "-c", MAIN_AND_SYS_EXIT, *train], env),
        "launch": (launch, launch_env),
        "launch_teardown": ([launch[0], "-m", ACCELERATE_AGENT, *launch[3:]], launch_env),
    }


def measure(pairs: int = DEFAULT_PAIRS, steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="raft-dist-exit-") as tmp:
        runs = commands(Path(tmp), steps)
        times = {name: [] for name in runs}
        for round_ in range(pairs + 1):  # round 0: warm-up (file cache, .pyc, token cache)
            for name, (command, env) in runs.items():
                for folder in ("train", "launch"):  # a fresh start every time, no resume
                    subprocess.run(["rm", "-rf", str(Path(tmp) / folder)], check=True)
                elapsed = timed(command, env)
                if round_:
                    times[name].append(elapsed)
        shown = {name: " ".join(command) for name, (command, _) in runs.items()}
    result: dict[str, Any] = {"pairs": pairs, "steps": steps, "commands": shown, "times_s": times}
    for kind in ("train", "launch"):
        ratios = [b / a for a, b in zip(times[kind], times[f"{kind}_teardown"], strict=True)]
        result[kind] = {
            "median_s": common.median(times[kind]),
            "teardown_median_s": common.median(times[f"{kind}_teardown"]),
            "saved_s": common.median(times[f"{kind}_teardown"]) - common.median(times[kind]),
            "ratio": {"median": common.median(ratios), "min": min(ratios), "max": max(ratios)},
        }
    return result


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"process exit, {result['steps']} tiny steps, median of {result['pairs']} pairs:"]
    for kind, label in (("train", "raft-dist train, 1 process"), ("launch", "launch, 2 ranks")):
        r = result[kind]
        ratio = r["ratio"]
        lines.append(
            f"  {label:28s} {r['median_s']:.2f} s, with teardown {r['teardown_median_s']:.2f} s: "
            f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}), "
            f"{r['saved_s']:.2f} s saved"
        )
    return lines


def report_rows(result: dict[str, Any]) -> list[common.Row]:
    rows: list[common.Row] = []
    for kind, label in (("train", "raft-dist train"), ("launch", "2-process launch")):
        r = result[kind]
        rows.append((f"{label}, ends without teardown (s)", f"{r['median_s']:.2f}", "", ""))
        rows.append((f"{label}, ends with teardown (s)", f"{r['teardown_median_s']:.2f}", "", ""))
        rows.append(
            (
                f"{label} with/without teardown",
                "{median:.2f} ({min:.2f}-{max:.2f})".format(**r["ratio"]),
                "> 1",
                common.verdict(r["ratio"]["median"] > 1.0),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON too")
    args = parser.parse_args(argv)
    result = measure(args.pairs, args.steps)
    print("\n".join(report_lines(result)))
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
