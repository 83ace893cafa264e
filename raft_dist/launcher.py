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
from types import SimpleNamespace
from typing import Any

import yaml

from raft_dist.accelerate_facts import launch_options, profile_settings
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

    What goes to accelerate must be its options and their values: accelerate runs the first
    other word as the script in place of the training entry, so `training.max_steps 3` (a space
    for the `=`) once reached torchrun as the script to run. Such a word is refused here, as is
    an option accelerate does not have or one left without its value.
    """
    takes_value = launch_options()
    overrides: list[str] = []
    passed: list[str] = []
    waiting: str | None = None  # an option whose value comes next
    for arg in args:
        if waiting is not None:
            if OVERRIDE.match(arg):
                raise ConfigError(f"{waiting} needs a value before the override {_shown(arg)}")
            passed.append(arg)
            waiting = None
        elif OVERRIDE.match(arg):
            overrides.append(arg)
        elif arg.startswith("-") and arg not in ("-", "--"):
            name, equals, _ = arg.partition("=")
            if name not in takes_value:
                raise ConfigError(
                    f"{_shown(name)}: not an option of accelerate launch "
                    "(see accelerate launch --help)"
                )
            waiting = name if takes_value[name] and not equals else None
            passed.append(arg)
        else:
            raise ConfigError(_stray_word(arg))
    if waiting is not None:
        raise ConfigError(f"{waiting} needs a value")
    return overrides, passed


def _stray_word(arg: str) -> str:
    from raft_dist.config import Recipe

    key = RECIPE_KEY.match(arg)
    if key and key.group(1) in Recipe.__dataclass_fields__:
        return f"{arg}: a recipe override needs '=': write {arg}=VALUE (no spaces around '=')"
    return (
        f"{_shown(arg)}: neither a recipe override (section.key=value) nor an option of "
        "accelerate launch; accelerate would run it in place of the training script"
    )


def _shown(text: str) -> str:
    """User text in a one-line message: as is, or quoted with escapes."""
    return text if text.isprintable() and text.strip() else repr(text)


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
    environ = dict(os.environ if environ is None else environ)
    profile_path = resolve_profile(profile)
    where = f"--profile {profile}"
    cfg = _load_profile(profile_path, where)
    dtype = cfg.distributed_type
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
    num_processes = _count(where, cfg, accelerate_args, "num_processes", default=1, minimum=1)
    num_machines = _count(where, cfg, accelerate_args, "num_machines", default=1, minimum=1)
    machine_rank = _count(where, cfg, accelerate_args, "machine_rank", default=0, minimum=0)
    if machine_rank >= num_machines:
        raise ConfigError(
            f"{where}: machine_rank {machine_rank} is not below num_machines {num_machines}"
        )
    stage = None
    ds_args: list[str] = []
    if deepspeed:
        ds_settings = cfg.deepspeed_config or {}
        if not isinstance(ds_settings, dict):
            raise ConfigError(f"{where}: deepspeed_config must be a mapping of settings")
        ds_file = _option(accelerate_args, "deepspeed_config_file") or ds_settings.get(
            "deepspeed_config_file"
        )
        if ds_file:
            if not isinstance(ds_file, str):
                raise ConfigError(f"{where}: deepspeed_config_file must be a file name")
            given = _option(accelerate_args, "deepspeed_config_file")
            source = "--deepspeed_config_file" if given else f"{where}: deepspeed_config_file"
            ds_path = resolve_ds_config(ds_file, source)
            stage = read_ds_config(ds_path)["zero_optimization"].get("stage", 0)
            if given is None:
                # Absolute, so the profile works from any working folder and from a wheel.
                ds_args = ["--deepspeed_config_file", str(ds_path)]
        else:
            stage = ds_settings.get("zero_stage")
            if stage is not None and not _is_stage(stage):
                raise ConfigError(f"{where}: zero_stage {stage!r} is not one of 0, 1, 2, 3")
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
        "raft_dist.accelerate_agent",
        "--config_file",
        str(profile_path),
        *ds_args,
        *accelerate_args,
        *(entry or [str(entry_script()), "--config", recipe_path, *overrides]),
    ]
    return LaunchPlan(
        command, env, num_processes, engine, stage, num_machines, machine_rank, device
    )


def _load_profile(path: Path, where: str) -> SimpleNamespace:
    """The launcher's settings of a profile, as Accelerate's loader reads them. That loader
    trusts the file (an empty file or a list raises AttributeError, a wrong value TypeError or
    ValueError), so the file is parsed here first, and what the loader still refuses becomes a
    ConfigError as well."""
    _read_settings(path, where, as_json=path.name.endswith(".json"))  # accelerate's own rule
    try:
        return SimpleNamespace(**profile_settings(path))
    except (ValueError, TypeError, KeyError, AttributeError, OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: not a valid accelerate config: {_one_line(exc)}") from None


def _read_settings(path: Path, where: str, *, as_json: bool) -> dict[str, Any]:
    """A JSON or YAML file that must hold a mapping; every failure names the file."""
    kind = "JSON" if as_json else "YAML"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        value = json.loads(text) if as_json else yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: not valid {kind}: nested too deeply") from None
    except (ValueError, TypeError, AttributeError, OverflowError, yaml.YAMLError) as exc:
        # ValueError covers JSON syntax and numbers past Python's 4,300-digit limit; PyYAML's
        # constructors raise the others for impossible values (year 0, `!!timestamp x`).
        raise ConfigError(f"{where}: not valid {kind}: {_one_line(exc)}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must hold a mapping of settings, got {type(value).__name__}")
    return value


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _count(where: str, cfg: Any, args: list[str], name: str, *, default: int, minimum: int) -> int:
    """A process or machine count: the command line's, else the profile's, else `default`."""
    option = _option(args, name)
    value = option or getattr(cfg, name, None) or default
    source = f"--{name}" if option else f"{where}: {name}"
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        count = minimum - 1
    if isinstance(value, bool) or count < minimum or (isinstance(value, float) and value != count):
        raise ConfigError(f"{source} must be a whole number >= {minimum}, got {value!r}")
    return count


def _is_stage(value: object) -> bool:
    return type(value) is int and 0 <= value <= 3


def resolve_ds_config(name: str, source: str = "deepspeed_config_file") -> Path:
    """A relative DeepSpeed config path is tried from the working folder, then from where
    raft-dist keeps its ds_configs/ (so profiles work from a checkout and from a wheel)."""
    path = Path(name)
    if not path.is_absolute() and not _is_file(path):
        # Not found from the working folder: fall back to the shipped copy.
        shipped = resource_dir("ds_configs") / path.name
        if _is_file(shipped):
            return shipped
    if not _is_file(path):
        raise ConfigError(f"{source}: no such file {_shown(name)}")
    return path.resolve()


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name longer than the file system allows, a NUL byte
        return False


def read_ds_config(path: Path) -> dict:
    """Load a DeepSpeed JSON and refuse what raft-dist owns itself or cannot use."""
    where = f"deepspeed_config_file {path}"
    config = _read_settings(path, where, as_json=True)
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise ConfigError(
                f"{where}: remove the '{owned}' section; raft-dist builds "
                "the optimizer and LR schedule from the recipe (training.lr, training.lr_schedule)"
                " and picks DeepSpeedCPUAdam itself when the optimizer is offloaded"
            )
    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object")
    if not _is_stage(zero.get("stage", 0)):
        raise ConfigError(
            f"{where}: zero_optimization.stage {zero['stage']!r} is not one of 0, 1, 2, 3"
        )
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(
            f"{where}: ZeRO-3 needs "
            "zero_optimization.stage3_gather_16bit_weights_on_model_save: true, or the final "
            "model cannot be saved (Accelerate fills 'auto' with false)"
        )
    devices = {}
    for part in ("offload_optimizer", "offload_param"):
        section = zero.get(part) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: zero_optimization.{part} must be an object")
        devices[part] = section.get("device", "none")
        if devices[part] not in ("none", "cpu", "nvme"):
            raise ConfigError(
                f"{where}: {part}.device {devices[part]!r} is not one of none, cpu, nvme"
            )
    if devices["offload_param"] != "none" and zero.get("stage") != 3:
        raise ConfigError(f"{where}: offload_param needs ZeRO stage 3")
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
