"""Accelerate's answers kept on disk (accelerate_facts.py): a launch that finds them does not
import Accelerate or torch, and what it reads is what Accelerate itself answers."""

from __future__ import annotations

import datetime
import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, offline_env

from raft_dist import accelerate_facts
from raft_dist.errors import ConfigError
from raft_dist.launcher import plan_launch
from raft_dist.resources import profile_names

# Plans every shipped profile and prints them with the heavy modules this process imported.
PLAN_ALL = f"""
import json, sys
from raft_dist.launcher import plan_launch, split_args
from raft_dist.resources import profile_names
plans = {{}}
for name in profile_names():
    overrides, passed = split_args(["training.seed=3", "--main_process_port", "29500"])
    plan = plan_launch(name, {str(ROOT / "configs/tiny.yaml")!r}, overrides, passed, environ={{}})
    plans[name] = [plan.command, plan.env, plan.world_size, plan.engine, plan.zero_stage]
heavy = sorted(m for m in ("torch", "accelerate") if m in sys.modules)
print(json.dumps({{"plans": plans, "heavy": heavy}}))
"""


def _plan_all(cache: Path) -> dict:
    env = offline_env(**{accelerate_facts.ROOT_VARIABLE: str(cache)})
    out = subprocess.run(
        [sys.executable, "-c", PLAN_ALL], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_a_launch_that_finds_the_answers_imports_neither_accelerate_nor_torch(
    tmp_path: Path,
) -> None:
    first = _plan_all(tmp_path)
    assert first["heavy"] == ["accelerate", "torch"]  # nothing kept yet: Accelerate answers
    second = _plan_all(tmp_path)
    assert second["heavy"] == []
    assert second["plans"] == first["plans"]
    assert len(first["plans"]) == len(profile_names()) >= 10


@pytest.mark.parametrize("profile", ["cpu", "deepspeed_zero3_offload", "multi_node"])
def test_kept_settings_are_what_accelerate_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.setenv(accelerate_facts.ROOT_VARIABLE, str(tmp_path))
    path = ROOT / "accelerate_configs" / f"{profile}.yaml"
    fresh = accelerate_facts.profile_settings(path)
    assert list(tmp_path.rglob("profile-*.json"))  # kept
    kept = accelerate_facts.profile_settings(path)
    cfg = load_config_from_file(str(path))
    assert kept == fresh
    assert kept["distributed_type"] == cfg.distributed_type.value
    for name in accelerate_facts.PROFILE_FIELDS[1:]:
        assert kept[name] == getattr(cfg, name, None), name


def test_damaged_entries_are_asked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(accelerate_facts.ROOT_VARIABLE, str(tmp_path))
    path = ROOT / "accelerate_configs" / "cpu.yaml"
    options = accelerate_facts.launch_options()
    settings = accelerate_facts.profile_settings(path)
    entries = sorted(tmp_path.rglob("*.json"))
    assert len(entries) == 2
    edited = [
        json.dumps({**json.loads(entry.read_text()), "value": {"use_cpu": True}})
        for entry in entries
    ]
    for damage in ("", "{not json", "[1, 2]", '{"value": {}}', *edited):
        for entry in entries:
            entry.write_text(damage)
        assert accelerate_facts.launch_options() == options
        assert accelerate_facts.profile_settings(path) == settings
    assert options["--num_processes"] is True and options["--cpu"] is False


def test_a_refused_profile_is_not_kept_and_still_names_accelerates_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(accelerate_facts.ROOT_VARIABLE, str(tmp_path))
    profile = tmp_path / "odd.yaml"
    profile.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nnot_a_setting: 1\n")
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"not a valid accelerate config: .*not_a_setting"):
            plan_launch(str(profile), str(ROOT / "configs/tiny.yaml"), [], [], environ={})
    assert not list(tmp_path.rglob("profile-*.json"))


def test_an_edited_accelerate_starts_a_new_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "accelerate"
    for name in accelerate_facts.SOURCES:
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text("# v1\n")
    spec = importlib.machinery.ModuleSpec("accelerate", None, is_package=True)
    spec.submodule_search_locations = [str(fake)]
    monkeypatch.setattr(accelerate_facts.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setenv(accelerate_facts.ROOT_VARIABLE, str(tmp_path / "cache"))
    before = accelerate_facts._folder()
    assert before is not None and before.parent == tmp_path / "cache"
    assert accelerate_facts._folder() == before
    (fake / accelerate_facts.SOURCES[0]).write_text("# v2, a new option\n")
    assert accelerate_facts._folder() != before


def test_the_same_bytes_as_json_and_as_yaml_are_asked_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(accelerate_facts.ROOT_VARIABLE, str(tmp_path / "cache"))
    text = "distributed_type: NO\nuse_cpu: true\n"  # YAML, and not JSON
    (tmp_path / "p.yaml").write_text(text)
    (tmp_path / "p.json").write_text(text)
    assert accelerate_facts.profile_settings(tmp_path / "p.yaml")["use_cpu"] is True
    with pytest.raises(ValueError):
        accelerate_facts.profile_settings(tmp_path / "p.json")


@pytest.mark.parametrize(
    ("setting", "value"),
    [("1: zero", {1: "zero"}), ("when: 2020-01-02", {"when": datetime.date(2020, 1, 2)})],
)
def test_settings_json_would_change_are_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, value: dict
) -> None:
    monkeypatch.setenv(accelerate_facts.ROOT_VARIABLE, str(tmp_path / "cache"))
    profile = tmp_path / "p.yaml"
    profile.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  {setting}\n")
    for _ in range(2):
        assert accelerate_facts.profile_settings(profile)["deepspeed_config"] == value
    assert not list((tmp_path / "cache").rglob("profile-*.json"))
