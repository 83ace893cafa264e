"""`raft-dist launch`: turn a profile + recipe into an `accelerate launch` argument list and run it.

The launcher reads the profile with Accelerate's own config loader, sets the environment the
profile needs, refuses combinations that Accelerate would silently change (a CPU flag with a
DeepSpeed profile), and tells the ranks what they must find when they start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from raft_dist.contract import Contract
from raft_dist.env import env_flag
from raft_dist.errors import ConfigError
from raft_dist.resources import entry_script, resolve_profile, resource_dir
from raft_dist.rundir import RunDir

OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")


@dataclass
class LaunchPlan:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # what the launcher adds or changes
    world_size: int = 1
    engine: str = "single"
    zero_stage: int | None = None
    num_machines: int = 1
    machine_rank: int = 0
    device: str | None = None  # "cuda" when the profile asks for GPUs, "cpu", or None: either


RECIPE_KEY = re.compile(r"^([A-Za-z_]\w*)(\.\w+)+$")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Recipe overrides look like section.key=value; everything else goes to accelerate.

    `training.max_steps 3` (a space for the `=`) would reach accelerate as the script to run:
    a bare `section.key` that is not an option's value is refused instead.
    """
    from raft_dist.config import Recipe

    sections = set(Recipe.__dataclass_fields__)
    for index, arg in enumerate(args):
        key = RECIPE_KEY.match(arg)
        after_option = index > 0 and args[index - 1].startswith("-") and "=" not in args[index - 1]
        if key and key.group(1) in sections and not after_option:
            raise ConfigError(
                f"{arg}: a recipe override needs '=': write {arg}=VALUE (no spaces around '=')"
            )
    overrides = [a for a in args if OVERRIDE.match(a)]
    accelerate_args = [a for a in args if not OVERRIDE.match(a)]
    return overrides, accelerate_args


def _option(args: list[str], name: str) -> str | None:
    """Value of --name / --name=value in the pass-through accelerate options, if given."""
    for i, arg in enumerate(args):
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def plan_launch(
    profile: str,
    recipe_path: str,
    overrides: list[str],
    accelerate_args: list[str],
    environ: dict[str, str] | None = None,
    entry: list[str] | None = None,
) -> LaunchPlan:
    """The `accelerate launch` command and environment for a profile. `entry` replaces what
    the ranks run (default: the training entry script with the recipe), e.g. `-m raft_dist.cli
    eval ...` for an evaluation over the profile's processes."""
    from accelerate.commands.config.config_args import load_config_from_file

    environ = dict(os.environ if environ is None else environ)
    profile_path = resolve_profile(profile)
    try:
        cfg = load_config_from_file(str(profile_path))
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"--profile {profile}: not a valid accelerate config: {exc}") from None
    dtype = str(getattr(cfg.distributed_type, "value", cfg.distributed_type))
    deepspeed = dtype == "DEEPSPEED" or "--use_deepspeed" in accelerate_args
    use_cpu = bool(cfg.use_cpu) or "--cpu" in accelerate_args
    if deepspeed and (use_cpu or env_flag("ACCELERATE_USE_CPU", environ)):
        raise ConfigError(
            f"--profile {profile}: DeepSpeed together with use_cpu/--cpu/ACCELERATE_USE_CPU: "
            "Accelerate would silently drop DeepSpeed. On CPU-only machines DeepSpeed picks its "
            "CPU accelerator by itself; remove the CPU flag."
        )
    if dtype == "MULTI_CPU" and use_cpu:
        raise ConfigError(
            f"--profile {profile}: distributed_type MULTI_CPU runs ONE process unless mpirun is "
            "installed; use distributed_type MULTI_GPU with use_cpu: true (see cpu.yaml)"
        )
    num_processes = int(_option(accelerate_args, "num_processes") or cfg.num_processes or 1)
    num_machines = int(_option(accelerate_args, "num_machines") or cfg.num_machines or 1)
    machine_rank = int(_option(accelerate_args, "machine_rank") or cfg.machine_rank or 0)
    if num_processes < 1:
        raise ConfigError(f"--profile {profile}: num_processes must be set (got {num_processes})")
    stage = None
    ds_args: list[str] = []
    if deepspeed:
        ds_file = _option(accelerate_args, "deepspeed_config_file") or (
            (cfg.deepspeed_config or {}).get("deepspeed_config_file")
        )
        if ds_file:
            ds_path = resolve_ds_config(ds_file)
            stage = read_ds_config(ds_path)["zero_optimization"].get("stage", 0)
            if _option(accelerate_args, "deepspeed_config_file") is None:
                # Absolute, so the profile works from any working folder and from a wheel.
                ds_args = ["--deepspeed_config_file", str(ds_path)]
        else:
            stage = (cfg.deepspeed_config or {}).get("zero_stage")
    engine = "deepspeed" if deepspeed else ("ddp" if num_processes > 1 else "single")
    # DeepSpeed runs on GPUs or, through its CPU accelerator, on CPUs: either is legitimate.
    # Any other profile without a CPU flag asks for CUDA GPUs; without them Accelerate would
    # quietly train on the CPU.
    cpu_requested = use_cpu or env_flag("ACCELERATE_USE_CPU", environ)
    device = None if deepspeed else ("cpu" if cpu_requested else "cuda")
    contract = Contract(
        world_size=num_processes,
        engine=engine,
        zero_stage=stage,
        device=device,
        profile=profile,
    )
    env: dict[str, str] = contract.to_env()
    if use_cpu and not deepspeed:
        env["ACCELERATE_USE_CPU"] = "1"
    if "OMP_NUM_THREADS" not in environ and (use_cpu or deepspeed or num_processes > 1):
        # Processes that share cores and each start all-core thread pools run ~10x slower.
        local = max(1, num_processes // num_machines)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(profile_path),
        *ds_args,
        *accelerate_args,
        *(entry or [str(entry_script()), "--config", recipe_path, *overrides]),
    ]
    return LaunchPlan(
        command, env, num_processes, engine, stage, num_machines, machine_rank, device
    )


def resolve_ds_config(name: str) -> Path:
    """A relative DeepSpeed config path is tried from the working folder, then from where
    raft-dist keeps its ds_configs/ (so profiles work from a checkout and from a wheel)."""
    path = Path(name)
    if not path.is_absolute() and not path.is_file():
        # Not found from the working folder: fall back to the shipped copy.
        shipped = resource_dir("ds_configs") / path.name
        if shipped.is_file():
            return shipped
    if not path.is_file():
        raise ConfigError(f"deepspeed_config_file: no such file {name}")
    return path.resolve()


def read_ds_config(path: Path) -> dict:
    """Load a DeepSpeed JSON and refuse what raft-dist owns itself."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"deepspeed_config_file {path}: not valid JSON: {exc}") from None
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise ConfigError(
                f"deepspeed_config_file {path}: remove the '{owned}' section; raft-dist builds "
                "the optimizer and LR schedule from the recipe (training.lr, training.lr_schedule)"
                " and picks DeepSpeedCPUAdam itself when the optimizer is offloaded"
            )
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(
            f"deepspeed_config_file {path}: ZeRO-3 needs "
            "zero_optimization.stage3_gather_16bit_weights_on_model_save: true, or the final "
            "model cannot be saved (Accelerate fills 'auto' with false)"
        )
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(
                f"deepspeed_config_file {path}: {part}.device {device!r} is not "
                "one of none, cpu, nvme"
            )
    if (zero.get("offload_param") or {}).get("device", "none") != "none" and zero.get("stage") != 3:
        raise ConfigError(f"deepspeed_config_file {path}: offload_param needs ZeRO stage 3")
    return config


def describe(plan: LaunchPlan) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
    return f"{env} {shlex.join(plan.command)}".strip()


EXIT_STOPPED = 75  # stopped at a step boundary with a checkpoint: "requeue me" (EX_TEMPFAIL)
# torchrun's agent turns a handled signal into a tear-down of every worker with a 30 s grace,
# prints a traceback, and exits at once on a second signal, killing workers mid-save. So it
# handles only the hard-stop signals; stop requests reach the ranks another way (run()).
AGENT_SIGNALS = "SIGHUP,SIGQUIT"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _ignore_stop_signals() -> None:
    """In the accelerate process (the agent) before exec: an ignored signal stays ignored
    across exec, and Python leaves an ignored SIGINT alone. The ranks install their own
    handlers (raft_dist/train/stopping.py)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def run(plan: LaunchPlan, run_dir: RunDir) -> int:
    """Run the launch and say how it ended: its exit code, or EXIT_STOPPED when the ranks
    stopped on request (stop marker in the run folder).

    Signals to this process:
    * under Slurm (inside a job step) SIGTERM is ignored here: slurmd signals every process of
      the step, the ranks included, and this process must outlive them to report;
    * otherwise SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 leave the run folder's stop request,
      which rank 0 sees at the next step: every rank saves and exits 0. A second SIGTERM or
      SIGINT is a hard stop: SIGQUIT to the agent, which tears the workers down.
    """
    if plan.machine_rank == 0:
        run_dir.stopped.unlink(missing_ok=True)
        run_dir.stop_request.unlink(missing_ok=True)
    env = {**os.environ, **plan.env, "PET_SIGNALS_TO_HANDLE": AGENT_SIGNALS}
    process = subprocess.Popen(plan.command, env=env, preexec_fn=_ignore_stop_signals)
    under_slurm = "SLURM_STEP_ID" in os.environ
    asked = []

    def on_stop_signal(signum: int, _frame: object) -> None:
        if under_slurm and signum == signal.SIGTERM:
            return
        if asked and signum != signal.SIGUSR1:
            process.send_signal(signal.SIGQUIT)
            return
        asked.append(signum)
        run_dir.root.mkdir(parents=True, exist_ok=True)
        run_dir.stop_request.touch()
        print(
            f"raft-dist launch: {signal.Signals(signum).name}: the run stops at the next step "
            "(again for a hard stop)",
            file=sys.stderr,
            flush=True,
        )

    previous = {s: signal.signal(s, on_stop_signal) for s in STOP_SIGNALS}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if plan.machine_rank == 0 and run_dir.stopped.is_file():
        return EXIT_STOPPED
    return code
