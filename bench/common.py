"""What the benchmarks share: paths, statistics, CPU load, memory readings and report output.

Every benchmark imports it as `import common`. A script run as `python bench/X.py` has this
folder on sys.path already, and bench/run.py puts it there before it imports the benchmarks.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

# Every benchmark runs offline; set before any benchmark imports the Hugging Face libraries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TINY_RECIPE = ROOT / "configs" / "tiny.yaml"
TINY_TOKENIZER = ROOT / "raft_dist" / "assets" / "tiny-tokenizer"
# The train/ split folder itself, not the data set root: then no eval split is found, and no
# evaluation runs inside the timed steps.
DEMO_TRAIN = ROOT / "data" / "demo" / "train"
MIB = 1024**2
# A 1-minute load average above this at the start means something else was running.
BUSY_LOAD = 0.5
# A run is "quiet" when other processes used at most this share of the machine's CPU.
QUIET_SHARE = 0.10

# (metric, value, target, verdict): one row of bench/run.py's combined table.
Row = tuple[str, str, str, str]
Log = Callable[[str], None]


# ---- statistics -----------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """The median, or NaN where there are no values (a failed run leaves none)."""
    collected = list(values)
    return statistics.median(collected) if collected else math.nan


# ---- CPU load ---------------------------------------------------------------------------------


class CpuReading(NamedTuple):
    """The clocks other_load compares, read at one moment."""

    wall_s: float  # time.perf_counter()
    machine_busy_s: float  # busy CPU seconds of every process since boot, all cores
    own_s: float  # CPU seconds of this process and of the children it has waited for


def machine_busy_s() -> float:
    """CPU seconds all processes have used since boot, all cores (/proc/stat; NaN off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return math.nan
    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children.

    A launcher's ranks are its children, and they count once the launch has been waited for;
    a benchmark that trains in its own process reaps no child inside a measured window.
    """
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def cpu_reading() -> CpuReading:
    return CpuReading(time.perf_counter(), machine_busy_s(), own_cpu_s())


def other_load(before: CpuReading, after: CpuReading) -> float:
    """Share of the machine's CPU time other processes used between two readings (0 = alone).

    On 2 cores a second busy process does not just take its share: torch's OpenMP threads wait
    for the one that lost its core, and a step can take several times longer. Runs with a high
    share are flagged so that a contended figure is not read as a property of what was measured.
    Without /proc/stat the share reads 0.
    """
    wall = after.wall_s - before.wall_s
    foreign = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    return max(0.0, foreign / (wall * (os.cpu_count() or 1)))


def wait_for_quiet(budget_s: float, log: Log | None = None, pause_s: float = 0.0) -> float:
    """Wait (at most budget_s) until other processes leave the CPU; returns the seconds waited.

    A run measured through other load says nothing about what it measures, and waiting is
    cheaper than measuring noise; when the budget runs out the run goes ahead and is flagged.
    Each check samples the load for a second; pause_s more pass between two checks.
    """
    if budget_s <= 0:
        return 0.0
    started = time.perf_counter()
    while True:
        before = cpu_reading()
        time.sleep(1.0)
        load = other_load(before, cpu_reading())
        waited = time.perf_counter() - started
        if load <= QUIET_SHARE or waited >= budget_s:
            return waited
        if log is not None:
            log(f"  other processes use {load:.0%} of the CPU; waiting ({waited:.0f} s so far)")
        time.sleep(min(pause_s, budget_s - waited))


def is_busy(load_avg: tuple[float, float, float]) -> bool:
    """True when the 1-minute load average says other work was running."""
    return load_avg[0] > BUSY_LOAD


# ---- memory -----------------------------------------------------------------------------------


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A kB field of /proc/<pid>/status (VmRSS: resident now, VmHWM: its peak), in bytes.

    None where there is no /proc or the process is gone.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
    """Linux resets the RSS high-water mark (VmHWM) on '5' to clear_refs: a later phase then
    gets a peak of its own, apart from the transient peak of loading a checkpoint."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """ru_maxrss of this process since it started (Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the benchmark model ------------------------------------------------------------------


def random_llama(shape: dict[str, Any], seed: int) -> Any:
    """A seeded random Llama with the tiny tokenizer's special tokens, and its vocabulary
    unless the shape names one: built the same way, every run starts from the same weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **shape,
        }
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- environment ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on now, for a launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command_line() -> str:
    """The command that ran, stored with its figures."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def thread_settings(torch_threads: int) -> dict[str, Any]:
    """The thread count torch used and the one the environment asked for."""
    return {"torch_threads": torch_threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def git(*args: str) -> str | None:
    """Output of a git command in the project, or None outside a checkout."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def environment() -> dict[str, Any]:
    """What the figures depend on, stored next to them."""
    import accelerate
    import torch
    import transformers

    commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
    return {
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cpu_count": os.cpu_count(),
        **thread_settings(torch.get_num_threads()),
        "machine": platform.machine(),
        "load_avg_at_start": os.getloadavg(),
    }


# ---- report -----------------------------------------------------------------------------------


def progress(line: str) -> None:
    """Print a progress line at once, so that it shows while a long run goes on."""
    print(line, flush=True)


def verdict(passed: bool) -> str:
    """How a target is reported: a miss is a finding, not an error."""
    return "PASS" if passed else "MISS"


def markdown_table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    """A table with padded columns: readable in the terminal and pasteable into bench/README.md."""
    body = list(rows)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def write_json(path: Path, payload: Any) -> Path:
    """Write payload as indented JSON, creating the folder; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return path


def run_json_child(script: Path, args: list[str], label: str) -> dict[str, Any]:
    """`python script *args --result FILE` in a fresh interpreter (so its peak RSS holds
    nothing of earlier work); returns the JSON it wrote there, plus its wall time."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    command = [sys.executable, str(script), *args, "--result", str(result_path)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{label} failed (exit {done.returncode}):\n{done.stderr}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
    finally:
        result_path.unlink(missing_ok=True)
    result["process_wall_s"] = time.perf_counter() - started
    return result
