"""Recipes: YAML + overrides map onto typed sections; every mistake names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from raft_dist.config import load_recipe
from raft_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml"])
def test_shipped_recipes_load(name: str) -> None:
    recipe = load_recipe(ROOT / "configs" / name)
    assert recipe.data.train == "data/demo"
    assert recipe.training.max_steps is not None


def test_overrides_are_typed() -> None:
    recipe = load_recipe(
        ROOT / "configs/tiny.yaml",
        [
            "data.train=/x",
            "training.max_steps=100",
            "training.save_every=20",
            "training.seed=7",
            "training.resume=latest",
            "output.dir=runs/x",
            "training.lr=1e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "training.eval_batches=null",
        ],
    )
    assert recipe.data.train == "/x"
    assert recipe.training.max_steps == 100 and recipe.training.save_every == 20
    assert recipe.training.seed == 7 and recipe.training.resume == "latest"
    assert recipe.output.dir == "runs/x"
    assert recipe.training.lr == pytest.approx(1e-4)
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.training.eval_batches is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_stepz=3", "unknown key training.max_stepz"),
        ("trainingg.lr=3", "unknown key trainingg"),
        ("training.lr=fast", "training.lr: expected a number, got 'fast'"),
        ("training.max_steps=2.5", "training.max_steps: expected an integer"),
        ("training.micro_batch_size=0", "training.micro_batch_size: 0 is below the minimum 1"),
        ("training.min_lr_ratio=2", "training.min_lr_ratio: 2.0 is above the maximum 1.0"),
        ("training.lr_schedule=exp", "training.lr_schedule: 'exp' is not one of: cosine, linear"),
        ("data.packing=maybe", "data.packing: expected true or false"),
        ("training.max_steps=5 ", None),
        ("nonsense", "must look like section.key=value"),
        ("training=3", "training must be a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str | None) -> None:
    overrides = [override] if message else [override, "training.max_stepz=1"]
    with pytest.raises(ConfigError) as info:
        load_recipe(ROOT / "configs/tiny.yaml", overrides)
    assert (message or "unknown key training.max_stepz") in str(info.value)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("data:\n  train: x\ntraining: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(bad)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="data.train is required"):
        load_recipe(None)
    with pytest.raises(ConfigError, match="warmup_steps .* must be smaller"):
        load_recipe(ROOT / "configs/tiny.yaml", ["training.warmup_steps=20"])
    with pytest.raises(ConfigError, match="max_steps is required with data.packing"):
        load_recipe(ROOT / "configs/tiny.yaml", ["data.packing=true", "training.max_steps=null"])


def test_recipe_round_trips_through_yaml(tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "configs/tiny.yaml", ["training.seed=3"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(recipe.to_yaml(), encoding="utf-8")
    assert load_recipe(saved) == recipe


def test_duplicate_keys_and_invalid_utf8_name_the_line(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("training:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"dup\.yaml:4: invalid YAML: duplicate key 'lr' \(first on line 2\)"
    ):
        load_recipe(dup)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"training:\n  lr: 0.1\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: the recipe is not valid UTF-8"):
        load_recipe(bad)
