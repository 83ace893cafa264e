"""Start-up time of `raft-dist --help` against a bare interpreter start, and of the launcher's
pre-flight (`raft-dist launch --dry-run`) with Accelerate's answers kept against asked afresh.

The command line imports its heavy libraries inside the commands, so `--help` should cost little
more than starting Python. The baseline is `python -c pass` with the interpreter named in the
console script's shebang, measured in the same run and interleaved with it, so the difference is
what raft-dist itself adds (click, the package, the entry-point machinery).

`raft-dist launch` checks its options against `accelerate launch`'s and reads the profile through
Accelerate's loader before it starts the `accelerate launch` child. With the answers kept
(raft_dist/accelerate_facts.py) it imports neither Accelerate nor torch; the baseline is the same
dry run with an empty answer folder, interleaved, so the ratio is what keeping them saves on
every launch.

    python bench/cli_startup.py [--runs 7]
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

DEFAULT_RUNS = 7
TARGET_S = 0.5
LAUNCH_TARGET_S = 1.0  # a dry run that finds the answers: no torch import
FACTS_VARIABLE = "RAFT_DIST_ACCELERATE_CACHE"  # raft_dist/accelerate_facts.py


def console_script() -> Path:
    """The raft-dist script next to the running interpreter, else the project's venv."""
    beside = Path(sys.executable).parent / "raft-dist"
    return beside if beside.exists() else common.ROOT / ".venv" / "bin" / "raft-dist"


def shebang_interpreter(script: Path) -> str:
    """The interpreter the script really runs with, so the baseline starts the same binary."""
    first = script.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    if first.startswith("#!") and "python" in first:
        return first[2:].strip().split()[0]
    return sys.executable


def wall_time(command: list[str], facts: str | None = None) -> float:
    """Seconds from spawn to exit; output is captured so the terminal does not count. `facts`:
    the folder of Accelerate's kept answers for a launch."""
    env = dict(os.environ, **({FACTS_VARIABLE: facts} if facts else {}))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=False, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def measure(runs: int = DEFAULT_RUNS) -> dict[str, Any]:
    """Interleaved runs after one untimed warm-up each (file cache, .pyc files, and for the kept
    launch, the answers)."""
    script = console_script()
    dry_run = [str(script), "launch", "--dry-run", "--profile", "cpu"]
    dry_run += ["--config", str(common.ROOT / "configs/tiny.yaml"), "--main_process_port", "29500"]
    commands = {
        "raft_dist_help": [str(script), "--help"],
        "python_pass": [shebang_interpreter(script), "-c", "pass"],
        "launch_dry_run_kept": dry_run,
        "launch_dry_run_asked": dry_run,
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory(prefix="raft-dist-facts-") as tmp:
        kept = str(Path(tmp) / "kept")

        def facts(name: str) -> str | None:
            # A fresh empty folder per asked run: nothing kept, Accelerate answers.
            if name == "launch_dry_run_asked":
                return tempfile.mkdtemp(dir=tmp)
            return kept if name == "launch_dry_run_kept" else None

        for name, command in commands.items():
            wall_time(command, facts(name))
        for _ in range(runs):
            for name, command in commands.items():
                times[name].append(wall_time(command, facts(name)))
    medians = {name: common.median(values) for name, values in times.items()}
    ratios = [
        asked / kept
        for asked, kept in zip(
            times["launch_dry_run_asked"], times["launch_dry_run_kept"], strict=True
        )
    ]
    return {
        "runs": runs,
        "commands": {name: " ".join(command) for name, command in commands.items()},
        "times_s": times,
        "median_s": medians,
        "added_by_raft_dist_s": medians["raft_dist_help"] - medians["python_pass"],
        "launch_saved_s": medians["launch_dry_run_asked"] - medians["launch_dry_run_kept"],
        "launch_asked_over_kept": {
            "median": common.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
        "target": {
            "raft_dist_help_below_s": TARGET_S,
            "verdict": common.verdict(medians["raft_dist_help"] < TARGET_S),
            "launch_kept_below_s": LAUNCH_TARGET_S,
            "launch_verdict": common.verdict(medians["launch_dry_run_kept"] < LAUNCH_TARGET_S),
        },
    }


def report_lines(result: dict[str, Any]) -> list[str]:
    med = result["median_s"]
    ratio = result["launch_asked_over_kept"]
    target = result["target"]
    return [
        f"cli start-up, median of {result['runs']} runs:",
        f"  raft-dist --help   {med['raft_dist_help']:.3f} s",
        f"  python -c pass     {med['python_pass']:.3f} s",
        f"  added by raft-dist {result['added_by_raft_dist_s']:.3f} s",
        f"  raft-dist --help < {TARGET_S:.1f} s  {target['verdict']}",
        f"  launch --dry-run, Accelerate's answers kept   {med['launch_dry_run_kept']:.3f} s",
        f"  launch --dry-run, Accelerate asked afresh    {med['launch_dry_run_asked']:.3f} s",
        f"  asked/kept {ratio['median']:.1f}x ({ratio['min']:.1f}-{ratio['max']:.1f}), "
        f"{result['launch_saved_s']:.2f} s saved per launch",
        f"  launch --dry-run kept < {LAUNCH_TARGET_S:.1f} s  {target['launch_verdict']}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON too")
    args = parser.parse_args(argv)
    result = measure(args.runs)
    print("\n".join(report_lines(result)))
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
