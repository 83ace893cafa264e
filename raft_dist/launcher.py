"""`raft-dist launch`: turn a profile + recipe into an `accelerate launch` argument list and run it.

The launcher reads the profile with Accelerate's own config loader, sets the environment the
profile needs, refuses combinations that Accelerate would silently change (a CPU flag with a
DeepSpeed profile), and tells the ranks what they must find when they start.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from raft_dist.errors import ConfigError
from raft_dist.resources import entry_script, resolve_profile
from raft_dist.train.setup import EXPECT_ENGINE, EXPECT_WORLD_SIZE, EXPECT_ZERO_STAGE

OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")
TRUE = ("1", "true", "yes")


@dataclass
class LaunchPlan:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # what the launcher adds or changes
    world_size: int = 1
    engine: str = "single"
    zero_stage: int | None = None
    num_machines: int = 1


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Recipe overrides look like section.key=value; everything else goes to accelerate."""
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
) -> LaunchPlan:
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
    if deepspeed and (use_cpu or environ.get("ACCELERATE_USE_CPU", "").lower() in TRUE):
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
    if num_processes < 1:
        raise ConfigError(f"--profile {profile}: num_processes must be set (got {num_processes})")
    stage = None
    if deepspeed and cfg.deepspeed_config:
        stage = cfg.deepspeed_config.get("zero_stage")
    engine = "deepspeed" if deepspeed else ("ddp" if num_processes > 1 else "single")

    env: dict[str, str] = {
        EXPECT_WORLD_SIZE: str(num_processes),
        EXPECT_ENGINE: engine,
    }
    if stage is not None:
        env[EXPECT_ZERO_STAGE] = str(stage)
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
        *accelerate_args,
        str(entry_script()),
        "--config",
        recipe_path,
        *overrides,
    ]
    return LaunchPlan(command, env, num_processes, engine, stage, num_machines)


def describe(plan: LaunchPlan) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
    return f"{env} {shlex.join(plan.command)}".strip()


def run(plan: LaunchPlan) -> int:
    """Run the launch; SIGTERM/SIGINT reach accelerate, which forwards them to every rank."""
    env = {**os.environ, **plan.env}
    process = subprocess.Popen(plan.command, env=env)

    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
