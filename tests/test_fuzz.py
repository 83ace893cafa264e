"""Fuzzing every reader of user files, in-process.

Arbitrary bytes and structurally wrong values (the real keys with random values, at every level)
are fed to the RAFT JSONL reader (all formats), the data set manifest and the data-check stamp,
recipes and overrides, the DeepSpeed JSON, launch profiles and the launcher's argument check.
Each must either succeed or raise the project's own error (DataError / ConfigError): one line,
naming the file (and, for JSONL, the line) or the key or option. Any other exception is a bug.

Every test runs 1,000 cases with the seed RAFT_DIST_FUZZ_SEED (default: taken from the clock).
A failure prints the seed and Hypothesis' `@reproduce_failure` blob, so it replays exactly:

    RAFT_DIST_FUZZ_SEED=<seed> pytest tests/test_fuzz.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, raft_record
from hypothesis import HealthCheck, example, given, note, seed, settings
from hypothesis import strategies as st

from raft_dist.config import DataConfig, Recipe, load_recipe
from raft_dist.data.check import check_data, read_stamp
from raft_dist.data.reader import decode_text, iter_examples, iter_lines
from raft_dist.errors import ConfigError, DataError
from raft_dist.generate.convert import find_inputs
from raft_dist.generate.validate_set import validate
from raft_dist.generate.writer import prepare
from raft_dist.launcher import plan_launch, read_ds_config, split_args

SEED = int(os.environ.get("RAFT_DIST_FUZZ_SEED") or time.time_ns() % 2**32)
print(f"fuzz seed: RAFT_DIST_FUZZ_SEED={SEED}", file=sys.stderr)

Test = Callable[..., None]


def fuzz(test: Test) -> Test:
    """1,000 cases with the printed seed. No example database: the seed and the printed blob
    replay a failure, and the test leaves nothing behind in the working tree. The fixture's
    folder is shared by all cases on purpose: every case overwrites the same files."""
    configured = settings(
        max_examples=1000,
        deadline=None,
        print_blob=True,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )(test)
    return seed(SEED)(configured)


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def replay_note() -> None:
    note(f"replay: RAFT_DIST_FUZZ_SEED={SEED} pytest tests/test_fuzz.py")


# --------------------------------------------------------------------------- value strategies

json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
# What YAML builds besides JSON values: dates, binary, sets, integers beyond any float.
yaml_leaves = (
    json_leaves
    | st.dates()
    | st.binary(max_size=8)
    | st.sets(st.integers(0, 3), max_size=2)
    | st.integers(min_value=10**308, max_value=10**400)
)
yaml_values = st.recursive(
    yaml_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), inner, max_size=4)
    ),
    max_leaves=10,
)
# A recipe key's value: a YAML leaf or a small collection of them (deeper values are drawn one
# level up, for whole sections).
key_values = (
    yaml_leaves
    | st.lists(yaml_leaves, max_size=3)
    | st.dictionaries(st.text(max_size=6), yaml_leaves, max_size=2)
)
# Texts a parser turns into something other than its syntax error: integers beyond Python's
# 4,300-digit conversion limit (ValueError), nesting beyond the recursion limit (JSON's C
# parser: ~1,000 levels; PyYAML recurses several frames per level), non-finite numbers, lone
# surrogates, NUL. YAML nesting stays shallow enough to scan quickly (its scanner slows down
# with depth).
TRICKY_TEXTS = (
    "1" * 5000,
    "-" + "9" * 4400,
    "[" * 1100,
    "{" * 1100,
    '{"a":' * 1100 + "1" + "}" * 1100,
    "NaN",
    "-Infinity",
    "1e400",
    '"\\ud800"',
    "\x00",
    "\ufeff{}",
    "",
)
YAML_TRICKY_TEXTS = (
    "1" * 5000,
    "[" * 500,
    "{" * 500,
    "[" * 500 + "]" * 500,
    "a: " * 500,
    ".nan",
    "-.inf",
    "1e400",
    "0000-01-01",
    "\x00",
    "\ufeff{}",
    "",
)
yaml_tricky_texts = st.sampled_from(YAML_TRICKY_TEXTS)
tricky_texts = st.sampled_from(TRICKY_TEXTS)


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with the real keys: either all of them with plausible values (so that valid
    objects are common enough to reach the checks after parsing), or each present or not,
    holding a plausible value or any JSON value, sometimes beside an unknown key."""
    optional = {key: strategy | json_values for key, strategy in fields.items()}
    extra = st.dictionaries(st.text(max_size=8), json_values, max_size=1)
    wrong = st.builds(
        lambda known, more: {**more, **known}, st.fixed_dictionaries({}, optional=optional), extra
    )
    return st.fixed_dictionaries(fields) | wrong


def encode_json(value: object, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def any_text_file(structured: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, tricky texts, or (half of the cases) a well-formed file of
    structurally wrong values."""
    return st.one_of(
        st.binary(max_size=300),
        tricky_texts.map(lambda text: text.encode("utf-8", "surrogatepass")),
        structured,
        structured,
    )


def plausible(values: dict[str, Any]) -> dict[str, st.SearchStrategy[Any]]:
    return {key: st.just(value) for key, value in values.items()}


# --------------------------------------------------------------------------- checks


def assert_one_line(error: Exception) -> str:
    message = str(error)
    assert message.strip(), f"{type(error).__name__} without a message"
    assert "\n" not in message, f"the message is not one line: {message!r}"
    return message


def assert_names_the_line(error: DataError, path: Path, lines: int) -> None:
    message = assert_one_line(error)
    assert message.startswith(f"{path}:"), message
    if error.line is not None:
        assert 1 <= error.line <= lines, message
        assert message.startswith(f"{path}:{error.line}: "), message


# --------------------------------------------------------------------------- RAFT JSONL

VALID_RECORD = raft_record(random.Random(0), 0)
# Record text, sometimes with lone surrogates: JSON can escape them ("\\ud800") though they are
# not text.
record_text = st.text(max_size=12) | st.text(st.characters(categories=["Cs"]), min_size=1)
document = shaped({"text": record_text, "title": st.text(max_size=6)})
native = shaped(
    {
        **plausible(VALID_RECORD),
        "documents": st.lists(document | json_values, max_size=3),
        "oracle_index": st.integers(-2, 4),
        "instruction": record_text,
        "meta": json_values,
    }
)
paper_context = shaped(
    {
        "title": st.lists(st.lists(st.text(max_size=6), max_size=3), max_size=2),
        "sentences": st.lists(st.lists(st.text(max_size=6), max_size=3), max_size=2)
        | st.lists(st.text(max_size=6), max_size=3),
    }
)
paper = shaped(
    {
        "id": st.text(max_size=6),
        "type": st.just("general"),
        "question": record_text,
        "context": paper_context,
        "oracle_context": record_text,
        "cot_answer": st.just("because <ANSWER>: x"),
        "instruction": record_text,
    }
)
instruction = shaped(
    {
        "instruction": record_text,
        "output": record_text,
        "input": record_text,
        "id": st.integers() | st.text(max_size=6),
        "oracle_context": record_text,
        "num_distractors": st.integers(0, 4),
    }
)
prompt_completion = shaped({"prompt": record_text, "completion": record_text, "id": st.booleans()})
record_values = native | paper | instruction | prompt_completion | json_values
record_lines = st.one_of(
    st.builds(encode_json, record_values, st.booleans()),
    st.binary(max_size=40),
    tricky_texts.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"   ", b"\r", b"\t"]),
)
BOMS = (b"", b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
jsonl_files = any_text_file(
    st.builds(
        lambda bom, lines, end: bom + b"\n".join(lines) + end,
        st.sampled_from(BOMS),
        st.lists(record_lines, max_size=5),
        st.sampled_from([b"", b"\n", b"\r\n"]),
    )
)


@fuzz
@given(content=jsonl_files)
@example(content=b"1" * 5000)  # past the 4,300-digit int limit: ValueError
@example(content=b'{"prompt": "a\\ud800", "completion": "b"}\n')  # a lone surrogate
@example(content=b"\xff\xfe{\x00}\x00")  # UTF-16
def test_jsonl_reader_names_file_and_line(workdir: Path, content: bytes) -> None:
    """The loop's reader (iter_examples), the preflight (check_data, both formats) and
    `raft-dist validate` on one shard."""
    replay_note()
    path = workdir / "shard.jsonl"
    path.write_bytes(content)
    lines = content.count(b"\n") + 1
    for skip_invalid in (False, True):
        try:
            for _, example in iter_examples(path, skip_invalid=skip_invalid):
                # What the reader passes on is text the tokenizer can take.
                (example.id + example.prompt + example.completion).encode("utf-8")
        except DataError as exc:
            assert_names_the_line(exc, path, lines)
            if skip_invalid:  # only what is no line's fault may stop a skipping reader
                assert exc.line is None or "UTF-16" in exc.reason, str(exc)
    try:
        for line in iter_lines(path, text=True):
            decode_text(line)
    except DataError as exc:
        assert_names_the_line(exc, path, lines)
    for fmt in ("auto", "text"):
        try:
            check_data(DataConfig(train=str(path), format=fmt))  # type: ignore[arg-type]
        except DataError as exc:
            assert_names_the_line(exc, path, lines)
    report = validate([str(path)])
    for error in report.errors:
        assert error.startswith(f"{path}") and "\n" not in error, error


# --------------------------------------------------------------------------- manifests

SHARD_LINES = [raft_record(random.Random(1), i) for i in range(2)]
SHARD_BYTES = b"".join(json.dumps(r).encode() + b"\n" for r in SHARD_LINES)
SHARD_SHA = hashlib.sha256(SHARD_BYTES).hexdigest()
SHARD_PATHS = (
    "train/shard-00000.jsonl",
    "train/link.jsonl",  # a link inside the folder to a file outside it
    "/etc/passwd",
    "../outside.jsonl",
    "../../etc/passwd",
    "train/../../outside.jsonl",
    "train",
    "",
    ".",
    "manifest.json",
    "train/missing.jsonl",
    "train/\x00.jsonl",
    "a" * 5000,
)
shard_entry = shaped(
    {
        "path": st.sampled_from(SHARD_PATHS) | st.text(max_size=10),
        "records": st.just(2) | st.integers() | st.floats(),
        "sha256": st.just(SHARD_SHA) | st.text(max_size=8),
    }
)
split = shaped(
    {
        "shards": st.lists(shard_entry | json_values, max_size=3),
        "records": st.just(2) | st.integers(),
    }
)
manifest = shaped(
    {
        "format": st.just("raft"),
        "version": st.integers(0, 3),
        "generator": shaped(
            {
                "settings": shaped({"split_by": st.sampled_from(["chunk", "question"])}),
                "fingerprint": st.text(max_size=8),
                "stats": json_values,
            }
        ),
        "splits": shaped({"train": split, "eval": split})
        | st.dictionaries(st.text(max_size=6), split, max_size=2),
    }
)
manifest_files = any_text_file(st.builds(encode_json, manifest, st.booleans()))


@pytest.fixture
def dataset(workdir: Path) -> Path:
    root = workdir / "ds"
    (root / "train").mkdir(parents=True)
    (root / "train" / "shard-00000.jsonl").write_bytes(SHARD_BYTES)
    (workdir / "outside.jsonl").write_bytes(SHARD_BYTES)
    (root / "train" / "link.jsonl").symlink_to(workdir / "outside.jsonl")
    return root


@fuzz
@given(content=manifest_files)
@example(content=b"[" * 1100)  # RecursionError
@example(content=b'{"splits": {"train": {"shards": [{"path": "a", "records": Infinity}]}}}')
@example(content=json.dumps({"splits": {"train": {"shards": [{"path": "a" * 5000}]}}}).encode())
@example(content=json.dumps({"splits": {"train": {"shards": [{"path": "t\x00"}]}}}).encode())
def test_manifest_reader_keeps_shards_inside_the_data_set(dataset: Path, content: bytes) -> None:
    """check_data (the launch preflight, and rank 0 of a run without one) on a data set folder."""
    replay_note()
    (dataset / "manifest.json").write_bytes(content)
    inside = dataset.resolve()
    try:
        check = check_data(DataConfig(train=str(dataset)))
    except DataError as exc:
        message = assert_one_line(exc)
        assert str(dataset) in message, message
    else:
        for result in check.splits.values():
            for shard in result.shards:
                assert shard.path.resolve().is_relative_to(inside), shard.path


@fuzz
@given(content=manifest_files)
@example(content=b"[" * 1100)  # RecursionError in three readers of raft_dist/generate
@example(content=b'{"splits": {"train": {"records": Infinity, "shards": []}}}')
@example(content=b'{"generator": "by hand", "splits": {}}')  # AttributeError in prepare()
@example(content=json.dumps({"splits": {"train": {"shards": [{"path": "/etc/passwd"}]}}}).encode())
def test_generate_side_manifest_readers(dataset: Path, content: bytes) -> None:
    """The same manifests through `raft-dist validate`, `convert`'s input finder and `generate`'s
    decision about an existing --out: a report, a clean error or a decision, never a traceback,
    and never a file outside the data set read."""
    replay_note()
    (dataset / "manifest.json").write_bytes(content)
    report = validate([str(dataset)])  # collects errors instead of raising
    assert all("\n" not in str(e) for e in report.errors)
    try:
        inputs = find_inputs([str(dataset)])
    except DataError as exc:
        assert_one_line(exc)
    else:
        inside = dataset.resolve()
        assert all(i.path.resolve().is_relative_to(inside) for i in inputs), inputs
    try:
        assert prepare(dataset, {"seed": 1}, overwrite=False) in {"resume", "up to date"}
    except (ConfigError, DataError) as exc:
        assert_one_line(exc)


def write_manifest(root: Path, name: str, **extra: object) -> Path:
    shard = {"path": name, "records": 2, "sha256": SHARD_SHA}
    manifest = {"splits": {"train": {"records": 2, "shards": [shard]}}, **extra}
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root / "manifest.json"


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.jsonl", "train/link.jsonl"])
def test_shards_outside_the_data_set_are_refused(dataset: Path, name: str) -> None:
    """The message names the manifest and the path it lists (a link counts where it points)."""
    manifest = write_manifest(dataset, name)
    with pytest.raises(DataError) as info:
        check_data(DataConfig(train=str(dataset)))
    message = str(info.value)
    assert message.startswith(f"{manifest}: shard path {name} is outside the data set folder")
    assert not validate([str(dataset)]).ok


def test_a_generator_that_is_not_an_object_is_no_crash(dataset: Path) -> None:
    """Only the generator's own bookkeeping is in it: reading the data set does not need it."""
    write_manifest(dataset, "train/shard-00000.jsonl", generator="by hand")
    assert check_data(DataConfig(train=str(dataset))).counts() == {"train": 2}
    assert validate([str(dataset)]).ok


stamp_split = shaped(
    {
        "spec": st.sampled_from(["ds", ""]),
        "skipped": st.integers(),
        "manifest_sha256": st.none() | st.text(max_size=4),
        "shards": st.lists(
            shaped({"path": st.text(max_size=6), "size": st.integers(), "records": st.floats()}),
            max_size=2,
        ),
    }
)
stamps = shaped(
    {
        "version": st.just(1),
        "data": st.just({"train": "ds", "eval": None, "format": "auto", "skip_invalid": False}),
        "splits": shaped({"train": stamp_split}),
    }
)


@fuzz
@given(content=any_text_file(st.builds(encode_json, stamps, st.booleans())))
@example(content=b"[" * 1100)
@example(
    content=b'{"version": 1, "data": {"train": "ds", "eval": null, "format": "auto", '
    b'"skip_invalid": false}, "splits": {"train": {"spec": "ds", "shards": []}}}'
)
def test_a_damaged_stamp_means_check_again(workdir: Path, content: bytes) -> None:
    """The data-check stamp is a cache: any doubt about it means None (check the data again)."""
    replay_note()
    stamp = workdir / "data-check.json"
    stamp.write_bytes(content)
    assert read_stamp(stamp, DataConfig(train="ds")) is None


# --------------------------------------------------------------------------- recipes


def recipe_fields() -> dict[str, dict[str, type]]:
    """section -> key -> type hint, from the dataclasses (so new keys are fuzzed too)."""
    sections = typing.get_type_hints(Recipe)
    return {
        name: {f.name: f.type for f in dataclasses.fields(section)}
        for name, section in sections.items()
    }


SECTIONS = recipe_fields()
DOTTED_KEYS = sorted(f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys)
EXTENDS = (
    "recipe.yaml",  # itself: a loop
    "missing.yaml",
    "",
    ".",
    "a\x00b.yaml",
    "a" * 5000 + ".yaml",
    str(ROOT / "configs" / "tiny.yaml"),
)
recipe_sections = shaped(
    {section: shaped({key: key_values for key in keys}) for section, keys in SECTIONS.items()}
    | {"extends": st.sampled_from(EXTENDS)}
)
YAML_FRAGMENTS = (
    "? [a]\n: 1\n",
    "? {a: 1}\n: 1\n",
    "training: &x [*x]\n",
    "training:\n  lr: 1\n  lr: 2\n",
    "training: !!python/object:os.system x\n",
    "<<: {training: 1}\n",
    "<<: [1]\n",
    "a: 1\n--- b\n",
    "training: !!binary xx\n",
    "data: {train: x}\ntraining: {lr: " + "9" * 5000 + "}\n",
    "%YAML 9.9\n--- {}\n",
    "data: !!timestamp 2001-13-45\n",
    "data:\n\ttrain: x\n",
)


def dump_yaml(value: object, unicode: bool) -> bytes:
    return yaml.safe_dump(value, allow_unicode=unicode).encode("utf-8", "surrogatepass")


recipe_files = st.one_of(
    st.binary(max_size=300),
    yaml_tricky_texts.map(str.encode),
    st.builds(dump_yaml, recipe_sections, st.booleans()),
    st.builds(dump_yaml, yaml_values, st.booleans()),
    st.sampled_from(YAML_FRAGMENTS).map(str.encode),
    st.text(max_size=60).map(str.encode),
)


def assert_names_where(error: ConfigError, path: Path | None) -> None:
    """A recipe error names the file (reading, YAML) or the dotted key or override."""
    message = assert_one_line(error)
    names_key = message.split(":")[0].split(" ")[0].split(".")[0].split("[")[0] in SECTIONS
    known = ("unknown key ", "override ", "recipe must be", "data.train is required")
    assert (
        (path is not None and str(path) in message)
        or names_key
        or message.startswith(known)
        or any(f"{key} " in message or f"{key}=" in message for key in DOTTED_KEYS)
    ), message


@fuzz
@given(content=recipe_files)
@example(content=b"training:\n  lr: 0.1\n# caf\xe9\n")  # invalid UTF-8
@example(content=b"? [a]\n: 1\n")  # an unhashable key: TypeError
@example(content=b"data: 0000-01-01\n")  # year 0: ValueError
@example(content=b"data: !!timestamp x\n")  # AttributeError inside PyYAML
@example(content=b"data: {train: x}\ntraining: {lr: " + b"9" * 400 + b"}\n")  # OverflowError
@example(content=b"data: {train: x}\ntraining: {1: 2, a: 3}\n")  # keys that do not sort
@example(content=b"\x00")  # a one-line message, though PyYAML's has two
@example(content=b'extends: "a\\0b"\n')  # a NUL in a path: ValueError
def test_recipe_reader(workdir: Path, content: bytes) -> None:
    replay_note()
    path = workdir / "recipe.yaml"
    path.write_bytes(content)
    try:
        load_recipe(path)
    except ConfigError as exc:
        assert_names_where(exc, path)


override_values = st.one_of(
    st.text(max_size=12),
    yaml_tricky_texts,
    st.builds(lambda v: yaml.safe_dump(v, default_flow_style=True).strip(), yaml_values),
)
overrides = st.one_of(
    st.builds(lambda key, value: f"{key}={value}", st.sampled_from(DOTTED_KEYS), override_values),
    st.builds(
        lambda key, value: f"{key}={value}",
        st.sampled_from([*SECTIONS, "training..lr", ".lr", "training.lr.x"]) | st.text(max_size=8),
        override_values,
    ),
    st.sampled_from(DOTTED_KEYS),
    st.text(max_size=16),
)


@fuzz
@given(values=st.lists(overrides, max_size=4))
@example(values=["training.max_steps=" + "1" * 5000])
@example(values=["training.lr=" + "[" * 500])
def test_recipe_overrides(workdir: Path, values: list[str]) -> None:
    replay_note()
    base = workdir / "base.yaml"
    if not base.exists():
        base.write_text("data:\n  train: data/demo\ntraining:\n  max_steps: 5\n", encoding="utf-8")
    try:
        load_recipe(base, values)
    except ConfigError as exc:
        assert_names_where(exc, None)


# --------------------------------------------------------------------------- DeepSpeed JSON

offload = shaped({"device": st.sampled_from(["none", "cpu", "nvme"]), "pin_memory": st.booleans()})
ds_configs = shaped(
    {
        "train_micro_batch_size_per_gpu": st.just("auto"),
        "gradient_accumulation_steps": st.just("auto"),
        "bf16": shaped({"enabled": st.just("auto")}),
        "zero_optimization": shaped(
            {
                "stage": st.integers(0, 3),
                "stage3_gather_16bit_weights_on_model_save": st.booleans(),
                "offload_optimizer": offload,
                "offload_param": offload,
            }
        ),
        "optimizer": json_values,
        "scheduler": json_values,
    }
)


@fuzz
@given(content=any_text_file(st.builds(encode_json, ds_configs, st.booleans())))
@example(content=b"[1]")  # not an object: AttributeError
@example(content=b'{"zero_optimization": {"offload_param": "cpu"}}')
@example(content=b'{"zero_optimization": {"stage": "3"}}')  # would reach the ranks as "3"
def test_deepspeed_json_reader(workdir: Path, content: bytes) -> None:
    """read_ds_config directly, and through a DeepSpeed profile that names the file."""
    replay_note()
    path = workdir / "ds.json"
    path.write_bytes(content)
    profile = workdir / "ds_profile.yaml"
    if not profile.exists():
        profile.write_text(
            "distributed_type: DEEPSPEED\n"
            f"deepspeed_config:\n  deepspeed_config_file: {path}\nnum_processes: 2\n",
            encoding="utf-8",
        )
    try:
        config = read_ds_config(path)
    except ConfigError as exc:
        assert str(path) in assert_one_line(exc), str(exc)
        return
    assert config["zero_optimization"].get("stage", 0) in (0, 1, 2, 3)
    # A config that reads is also one the launcher can take its ZeRO stage from.
    assert plan_launch(str(profile), "r.yaml", [], [], environ={}).zero_stage in (0, 1, 2, 3)


# --------------------------------------------------------------------------- launch profiles

DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP", "XLA", "multi_gpu")
DS_FILES = ("zero1.json", "ds_configs/zero3.json", "missing.json", "a" * 5000, "x\x00.json")
profiles = shaped(
    {
        "compute_environment": st.sampled_from(["LOCAL_MACHINE", "AMAZON_SAGEMAKER"]),
        "distributed_type": st.sampled_from(DISTRIBUTED_TYPES),
        "use_cpu": st.booleans(),
        "num_machines": st.integers(-1, 3),
        "num_processes": st.integers(-1, 4),
        "machine_rank": st.integers(-1, 3),
        "mixed_precision": st.sampled_from(["no", "bf16"]),
        "deepspeed_config": shaped(
            {
                "deepspeed_config_file": st.sampled_from(DS_FILES),
                "zero_stage": st.integers(-1, 4),
                "zero3_init_flag": st.booleans(),
            }
        ),
        "rdzv_backend": st.just("static"),
        "same_network": st.booleans(),
    }
)
COUNT_OPTIONS = ("--num_processes", "--num_machines", "--machine_rank")
accelerate_options = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(COUNT_OPTIONS), st.sampled_from(["0", "2", "-1", "x", "1e3", ""])
        ),
        st.tuples(st.just("--deepspeed_config_file"), st.sampled_from(DS_FILES)),
        st.sampled_from([("--cpu",), ("--use_deepspeed",), ("--num_processes=3",)]),
    ),
    max_size=2,
).map(lambda pairs: [arg for pair in pairs for arg in pair])


@fuzz
@given(
    content=any_text_file(
        st.builds(encode_json, profiles, st.booleans())
        | st.builds(dump_yaml, profiles, st.booleans())
    ),
    suffix=st.sampled_from([".yaml", ".json"]),
    options=accelerate_options,
)
@example(content=b"", suffix=".yaml", options=[])  # accelerate: None.get
@example(content=b"- 1", suffix=".yaml", options=[])
@example(content=b"num_processes: 2\n", suffix=".yaml", options=["--num_machines", "0"])
@example(
    content=b'{"deepspeed_config": 3, "distributed_type": "DEEPSPEED"}', suffix=".json", options=[]
)
def test_profile_reader(workdir: Path, content: bytes, suffix: str, options: list[str]) -> None:
    replay_note()
    path = workdir / f"profile{suffix}"
    path.write_bytes(content)
    try:
        plan_launch(str(path), "r.yaml", [], options, environ={})
    except ConfigError as exc:
        message = assert_one_line(exc)
        named = [str(path), *(o for o in options if o.startswith("--"))]
        assert any(name.split("=")[0] in message for name in named), message


# --------------------------------------------------------------------------- launch arguments

ENTRY = "entry-script.py"
argument_words = st.one_of(
    st.sampled_from(
        [
            "--cpu",
            "--use_deepspeed",
            "-q",
            "--num_processes",
            "--main_process_ip",
            "--machine_rank=1",
            "--no-such-option",
            "--",
            "-",
            "3",
            "-1",
            "model.example.com",
            "training.max_steps",
            "training.max_steps=3",
            "max_steps=3",
            "data.train=x=y",
        ]
    ),
    st.text(max_size=8),
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["training.max_steps", "3"], "training.max_steps: a recipe override needs '='"),
        (["--cpu", "training.max_steps", "3"], "training.max_steps: a recipe override needs '='"),
        (["--num_processes", "2", "3"], "3: neither a recipe override"),
        (["--main_process_ip"], "--main_process_ip needs a value"),
        (["--num-procs", "2"], "--num-procs: not an option of accelerate launch"),
    ],
)
def test_a_stray_word_never_becomes_the_script(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        split_args(args)


def accelerate_parse(args: list[str]) -> str | None:
    """The script accelerate launch would run for `args`, or None when it refuses them itself."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def refuse(message: str) -> typing.NoReturn:
        raise ValueError(message)

    parser.error = refuse  # type: ignore[method-assign]
    parser.exit_on_error = False
    try:
        known, unknown = parser.parse_known_args(args)
    except (ValueError, Exception):
        return None
    return None if unknown else known.training_script


@fuzz
@given(args=st.lists(argument_words, max_size=5))
@example(args=["training.max_steps", "3"])
@example(args=["--cpu", "training.max_steps", "3"])  # a flag takes no value
@example(args=["--main_process_ip", "training.lr=0.1"])  # the option's value is missing
def test_launch_arguments_never_replace_the_training_script(args: list[str]) -> None:
    """Whatever `raft-dist launch` passes on must leave the entry script as accelerate's
    script (`training.max_steps 3` must not become the script), or be refused."""
    replay_note()
    try:
        recipe_overrides, passed = split_args(list(args))
    except ConfigError as exc:
        assert_one_line(exc)
        return
    assert all("=" in o for o in recipe_overrides)
    script = accelerate_parse([*passed, ENTRY, "--config", "r.yaml", *recipe_overrides])
    assert script in (ENTRY, None), (args, script)
