"""Launch profiles: every shipped profile loads through Accelerate's own config loader, and the
command built from it asks for the world size and engine the profile promises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import ROOT, run_cli

from raft_dist.errors import ConfigError
from raft_dist.launcher import plan_launch, split_args
from raft_dist.resources import entry_script, profile_names

RECIPE = str(ROOT / "configs/tiny.yaml")
EXPECTED = {  # profile -> (world size, engine, sets ACCELERATE_USE_CPU)
    "cpu": (2, "ddp", True),
    "single_gpu": (1, "single", False),
    "multi_gpu": (2, "ddp", False),
    "multi_node": (2, "ddp", False),
    "deepspeed_zero1": (2, "deepspeed", False),
    "deepspeed_zero2": (2, "deepspeed", False),
    "deepspeed_zero2_offload": (2, "deepspeed", False),
    "deepspeed_zero3": (2, "deepspeed", False),
    "deepspeed_zero3_init": (2, "deepspeed", False),
    "deepspeed_zero3_offload": (2, "deepspeed", False),
    "multi_node_deepspeed_zero3": (2, "deepspeed", False),
}
STAGES = {
    "deepspeed_zero1": 1,
    "deepspeed_zero2": 2,
    "deepspeed_zero2_offload": 2,
    "deepspeed_zero3": 3,
    "deepspeed_zero3_init": 3,
    "deepspeed_zero3_offload": 3,
    "multi_node_deepspeed_zero3": 3,
}


def test_every_shipped_profile_is_known() -> None:
    assert set(EXPECTED) <= set(profile_names())


@pytest.mark.parametrize("profile", sorted(EXPECTED))
def test_profile_loads_and_builds_the_launch_command(profile: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "accelerate_configs" / f"{profile}.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), "every profile starts with a header comment saying when to use it"
    assert "raft-dist launch --profile" in text
    load_config_from_file(str(path))  # Accelerate's own loader accepts it

    plan = plan_launch(profile, RECIPE, ["training.max_steps=3"], [], environ={})
    world, engine, cpu = EXPECTED[profile]
    assert plan.world_size == world and plan.engine == engine
    assert (plan.env.get("ACCELERATE_USE_CPU") == "1") is cpu
    assert plan.env["RAFT_DIST_EXPECT_WORLD_SIZE"] == str(world)
    assert plan.zero_stage == STAGES.get(profile)
    if profile in STAGES:  # the DeepSpeed JSON travels as an absolute path
        ds_file = Path(plan.command[plan.command.index("--deepspeed_config_file") + 1])
        assert ds_file.is_absolute() and ds_file.is_file()
    cmd = plan.command
    assert cmd[:3] == [sys.executable, "-m", "raft_dist.accelerate_agent"]
    assert cmd[cmd.index("--config_file") + 1] == str(path)
    assert str(entry_script()) in cmd
    assert cmd[-3:] == ["--config", RECIPE, "training.max_steps=3"]


def test_the_agent_is_accelerate_launch() -> None:
    """The launcher's agent (raft_dist.accelerate_agent) parses exactly what `accelerate launch`
    parses: the same options and help."""
    import subprocess

    helps = [
        subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        for module in ("accelerate.commands.launch", "raft_dist.accelerate_agent")
    ]
    assert [h.returncode for h in helps] == [0, 0], helps[1].stderr[-2000:]
    assert "--deepspeed_config_file" in helps[0].stdout
    assert helps[1].stdout.split("\n", 1)[1] == helps[0].stdout.split("\n", 1)[1]


def test_deepspeed_json_configs_match_their_builder() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ds_build", ROOT / "ds_configs/build.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for name in builder.ZERO:
        assert (ROOT / "ds_configs" / f"{name}.json").read_text() == builder.render(name), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"zero_optimization": {"stage": 3}}, "stage3_gather_16bit_weights_on_model_save"),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            "offload_param needs ZeRO stage 3",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
            "offload_optimizer.device 'gpu' is not one of",
        ),
    ],
)
def test_impossible_deepspeed_settings_are_refused(
    tmp_path: Path, change: dict, message: str
) -> None:
    import json

    config = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    config.update(change)
    (tmp_path / "ds.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        plan_launch(
            "deepspeed_zero2",
            RECIPE,
            [],
            ["--deepspeed_config_file", str(tmp_path / "ds.json")],
            environ={},
        )


def test_multi_node_rank_and_address_pass_through() -> None:
    overrides, extra = split_args(
        [
            "--machine_rank",
            "1",
            "training.seed=3",
            "--main_process_ip=10.1.2.3",
            "--num_processes",
            "16",
        ]
    )
    assert overrides == ["training.seed=3"]
    plan = plan_launch("multi_node", RECIPE, overrides, extra, environ={})
    assert plan.world_size == 16 and plan.num_machines == 2
    assert ["--machine_rank", "1"] == plan.command[5:7]
    assert plan.env["OMP_NUM_THREADS"]


def test_profile_can_be_any_accelerate_config_path(tmp_path: Path) -> None:
    custom = tmp_path / "mine.yaml"
    custom.write_text(
        (ROOT / "accelerate_configs/cpu.yaml")
        .read_text()
        .replace("num_processes: 2", "num_processes: 3")
    )
    assert plan_launch(str(custom), RECIPE, [], [], environ={}).world_size == 3


def test_unknown_profile_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'gpu8'; allowed: .*cpu.*multi_node"):
        plan_launch("gpu8", RECIPE, [], [], environ={})


def test_deepspeed_with_a_cpu_flag_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "ds.yaml"
    profile.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 2\n"
        "num_machines: 1\nmachine_rank: 0\ndeepspeed_config:\n  zero_stage: 2\n"
    )
    plan = plan_launch(str(profile), RECIPE, [], [], environ={})
    assert plan.engine == "deepspeed" and plan.zero_stage == 2
    with pytest.raises(ConfigError, match="silently drop DeepSpeed"):
        plan_launch(str(profile), RECIPE, [], ["--cpu"], environ={})
    with pytest.raises(ConfigError, match="silently drop DeepSpeed"):
        plan_launch(str(profile), RECIPE, [], [], environ={"ACCELERATE_USE_CPU": "1"})


def test_multi_cpu_profile_that_would_run_one_process_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "mc.yaml"
    profile.write_text(
        (ROOT / "accelerate_configs/cpu.yaml")
        .read_text()
        .replace("distributed_type: MULTI_GPU", "distributed_type: MULTI_CPU")
    )
    with pytest.raises(ConfigError, match="MULTI_CPU runs ONE process"):
        plan_launch(str(profile), RECIPE, [], [], environ={})


def test_dry_run_prints_recipe_and_command() -> None:
    result = run_cli(
        "launch",
        "--profile",
        "cpu",
        "--config",
        RECIPE,
        "--dry-run",
        "training.max_steps=3",
        "--main_process_port",
        "29999",
    )
    assert result.returncode == 0, result.stderr
    assert "max_steps: 3" in result.stdout
    assert "ACCELERATE_USE_CPU=1" in result.stdout
    assert "--config_file" in result.stdout and "--main_process_port 29999" in result.stdout


def test_an_override_without_equals_is_refused_not_launched() -> None:
    with pytest.raises(ConfigError, match="training.max_steps: a recipe override needs '='"):
        split_args(["training.max_steps", "3"])
    # Option values that look dotted are not overrides: hosts, files.
    overrides, rest = split_args(["--main_process_ip", "model.example.com", "training.lr=0.1"])
    assert overrides == ["training.lr=0.1"] and rest == ["--main_process_ip", "model.example.com"]
