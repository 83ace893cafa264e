"""Start-up time of `raft-dist --help` against a bare interpreter start.

The command line imports its heavy libraries inside the commands, so `--help` should cost little
more than starting Python. The baseline is `python -c pass` with the interpreter named in the
console script's shebang, measured in the same run and interleaved with it, so the difference is
what raft-dist itself adds (click, the package, the entry-point machinery).

    python bench/cli_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

DEFAULT_RUNS = 7
TARGET_S = 0.5


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


def wall_time(command: list[str]) -> float:
    """Seconds from spawn to exit; output is captured so the terminal does not count."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def measure(runs: int = DEFAULT_RUNS) -> dict[str, Any]:
    """Interleaved runs after one untimed warm-up each (file cache, .pyc files)."""
    script = console_script()
    commands = {
        "raft_dist_help": [str(script), "--help"],
        "python_pass": [shebang_interpreter(script), "-c", "pass"],
    }
    for command in commands.values():
        wall_time(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            times[name].append(wall_time(command))
    medians = {name: common.median(values) for name, values in times.items()}
    return {
        "runs": runs,
        "commands": {name: " ".join(command) for name, command in commands.items()},
        "times_s": times,
        "median_s": medians,
        "added_by_raft_dist_s": medians["raft_dist_help"] - medians["python_pass"],
        "target": {
            "raft_dist_help_below_s": TARGET_S,
            "verdict": common.verdict(medians["raft_dist_help"] < TARGET_S),
        },
    }


def report_lines(result: dict[str, Any]) -> list[str]:
    med = result["median_s"]
    return [
        f"cli start-up, median of {result['runs']} runs:",
        f"  raft-dist --help   {med['raft_dist_help']:.3f} s",
        f"  python -c pass     {med['python_pass']:.3f} s",
        f"  added by raft-dist {result['added_by_raft_dist_s']:.3f} s",
        f"  raft-dist --help < {TARGET_S:.1f} s  {result['target']['verdict']}",
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
