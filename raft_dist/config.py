"""Typed training recipe: YAML file + dotted `key=value` overrides, validated before anything runs.

Every mistake is reported with the dotted key and what is allowed, so a typo in a 200-line Slurm
job fails in the first second instead of after the model has loaded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from raft_dist.errors import ConfigError


def _range(minimum: float | None = None, maximum: float | None = None, **extra: Any) -> dict:
    return {"min": minimum, "max": maximum, **extra}


@dataclass
class ModelConfig:
    """Which causal LM to fine-tune and how its weights are loaded."""

    # Local folder, hub id, or a built-in random model: builtin:tiny-llama, builtin:tiny-gpt2.
    name_or_path: str = "builtin:tiny-llama"
    # Tokenizer folder or hub id; defaults to name_or_path.
    tokenizer: str | None = None
    # dtype the weights are loaded in; mixed precision is training.mixed_precision.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # The attention kernel (transformers' attn_implementation); null: transformers' default
    # (sdpa where the model supports it). On CPU, eager trains small models faster: at the
    # demo's ~450-token rows SDPA's CPU flash kernel took a third of the step, mostly in its
    # backward (bench/attention_bench.py). flash_attention_2 needs the flash-attn package and a GPU.
    attn_implementation: Literal["eager", "sdpa", "flex_attention", "flash_attention_2"] | None = (
        None
    )


@dataclass
class DataConfig:
    """Where the examples come from and how they become token batches."""

    # A data set folder (manifest.json + train/ + eval/), a folder of .jsonl, a glob, or one file.
    train: str | None = None
    # Held-out examples; defaults to the eval/ split of a data set folder given as data.train.
    eval: str | None = None
    # auto detects raft / raft_paper / instruction / prompt_completion per record;
    # text trains on plain .txt files (classic causal-LM fine-tuning, loss on every token).
    format: Literal["auto", "text"] = "auto"
    max_seq_len: int = field(default=512, metadata=_range(8))
    # Examples longer than max_seq_len: truncate the answer's end, or drop the example (counted).
    overlong: Literal["truncate", "drop"] = "truncate"
    # Put several whole examples into each max_seq_len row (fewer pad tokens). Examples stay
    # apart: positions restart and attention is block-diagonal, so the loss and gradients
    # equal unpacked training; an example is never split across rows. On the CPU with SDPA
    # attention (the default) each example's attention runs on its own span, so a packed row
    # costs its examples' attention, not the whole row's (packed_attention.py). Refused for
    # sliding-window models whose window is shorter than max_seq_len (packed attention cannot
    # narrow to it).
    packing: bool = False
    # Length grouping, a cheaper alternative to packing: read a window of this many micro
    # batches of examples, sort them by token length (seeded order among equal lengths), cut
    # them into micro batches and train those in a seeded random order. Less padding, the same
    # examples and the same number of batches per epoch; 0 or null: off. Not with packing or
    # format=text.
    group_by_length: int | None = field(default=0, metadata=_range(0, 4096))
    # Skip malformed records (counted in the run summary) instead of stopping at the first one.
    skip_invalid: bool = False
    # New shard order every epoch (seeded); records inside a shard keep their order.
    shuffle_shards: bool = True
    # Write the id of every record each rank reads to <output.dir>/audit/ (data audits, tests).
    record_audit: bool = False
    # Batches a background thread tokenizes ahead of the training step (0: in the step).
    # null: the default, 2. The batches and the checkpointed position are the same either way.
    prefetch_batches: int | None = field(default=None, metadata=_range(0, 64))
    # Keep the token ids of RAFT examples on disk ($RAFT_DIST_TOKEN_CACHE, by default
    # ~/.cache/raft-dist/tokens), keyed by the tokenizer's definition and each example's text,
    # so that the next run on the same data (a sweep, a resume, the eval split) does not
    # tokenize it again. About 4 bytes per token; `raft-dist cache` shows it, --clear frees it.
    token_cache: bool = True


@dataclass
class TrainingConfig:
    """The optimisation recipe: batch geometry, schedule, checkpoints."""

    seed: int = field(default=42, metadata=_range(0, 2**32 - 1))
    micro_batch_size: int = field(default=4, metadata=_range(1))
    gradient_accumulation_steps: int = field(default=1, metadata=_range(1))
    # Optimizer steps to run; null trains for `epochs` full passes.
    max_steps: int | None = field(default=None, metadata=_range(1))
    # End this invocation after N more optimizer steps (with a checkpoint) while the schedule
    # still targets max_steps: for jobs with a wall-time limit that resume later.
    stop_after_steps: int | None = field(default=None, metadata=_range(1))
    epochs: int = field(default=1, metadata=_range(1))
    lr: float = field(default=2e-4, metadata=_range(0.0))
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    warmup_steps: int = field(default=0, metadata=_range(0))
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Final LR as a fraction of lr for cosine/linear schedules.
    min_lr_ratio: float = field(default=0.0, metadata=_range(0.0, 1.0))
    # 0 disables clipping.
    max_grad_norm: float = field(default=1.0, metadata=_range(0.0))
    # A step whose loss or gradient norm is NaN/inf: stop the run (the last checkpoint stays the
    # last good one), or skip the update (not under DeepSpeed, whose optimizer step runs inside
    # backward) at most max_skipped_steps times in a run.
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = field(default=10, metadata=_range(1))
    # auto keeps what the accelerate launch config says.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Evaluate every N optimizer steps (0: only at the end); eval_batches caps each evaluation.
    eval_every: int = field(default=0, metadata=_range(0))
    # Also evaluate before the first step, to see what training changed.
    eval_at_start: bool = False
    eval_batches: int | None = field(default=None, metadata=_range(1))
    # Checkpoint every N optimizer steps (0: never); keep the newest keep_last.
    save_every: int = field(default=0, metadata=_range(0))
    keep_last: int = field(default=2, metadata=_range(1))
    # null, "latest" (newest checkpoint of output.dir) or a checkpoint folder.
    resume: str | None = None
    # A resume whose recipe differs from the checkpoint's in anything that changes the training
    # trajectory (lr, max_steps, data, model, ...) is refused, naming the keys; true accepts it.
    resume_with_changed_recipe: bool = False
    # Seconds a collective may wait for the other ranks before the run fails (and the ranks
    # that did not answer are named). torch's default is 10-30 minutes.
    process_group_timeout_s: int = field(default=600, metadata=_range(10))
    log_every: int = field(default=1, metadata=_range(1))
    # null: on for QLoRA (quantization.mode != none), off otherwise.
    gradient_checkpointing: bool | None = None
    # Compile the model's forward with torch.compile (after the model is built, before
    # accelerator.prepare): true = torch's default shapes (static; one recompile with dynamic
    # shapes at the first new batch width), "dynamic" = dynamic=True from the start, for
    # variable-length batches. null/false: eager. Refused under DeepSpeed. The first steps
    # (and the first evaluation) pay the compilation: seconds on a GPU, minutes on a CPU.
    compile: Literal[False, True, "dynamic"] | None = None
    # Where DeepSpeed keeps the ops it compiles on first use (TORCH_EXTENSIONS_DIR);
    # null keeps the environment's value or ~/.cache/torch_extensions.
    ops_cache_dir: str | None = None


@dataclass
class LoraConfig:
    """Low-rank adapters (peft); only adapter weights train when enabled."""

    enabled: bool = False
    r: int = field(default=16, metadata=_range(1))
    alpha: int = field(default=32, metadata=_range(1))
    dropout: float = field(default=0.05, metadata=_range(0.0, 1.0))
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)
    bias: Literal["none", "all", "lora_only"] = "none"


@dataclass
class QuantizationConfig:
    """bitsandbytes quantization of the frozen base model (QLoRA)."""

    mode: Literal["none", "4bit", "8bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"


@dataclass
class OutputConfig:
    """Where the run directory goes and what ends up in it."""

    dir: str = "runs/raft"
    save_final_model: bool = True


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    tensorboard: bool = True
    # Weights & Biases; runs in offline mode when WANDB_MODE is unset and there is no network.
    wandb: bool = False
    progress_bar: bool = True


@dataclass
class Recipe:
    """A whole training recipe; `configs/*.yaml` map onto it one section per field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_with_parents(Path(path), seen=())
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value)
    recipe = _build(Recipe, raw, prefix="")
    validate(recipe)
    return recipe


def _read_with_parents(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """`extends: other.yaml` (relative to the recipe) starts from another recipe, so variants
    such as tiny-lora.yaml state only what differs from tiny.yaml."""
    if _resolved(path) in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent.strip() or "\x00" in parent:
        raise ConfigError(f"{path}: extends must be a recipe path, got {parent!r}")
    try:
        base = _read_with_parents(path.parent / parent, (*seen, _resolved(path)))
    except ConfigError as exc:  # say which recipe names the broken one
        raise ConfigError(f"{path}: extends {_shown_key(parent)}: {exc}") from None
    return _deep_merge(base, raw)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the recipe is not valid UTF-8") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        line, problem = _yaml_problem(exc, text)
        where = f"{path}:{line}" if line is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def _load_yaml(text: str) -> Any:
    """One YAML document; every way the text can be wrong is a yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:  # PyYAML composes nested collections recursively
        raise yaml.YAMLError("nested too deeply") from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """(1-based line or None, what is wrong) for a message of one line."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text[: exc.position].count("\n") + 1
        return line, f"unacceptable character #x{exc.character:04x}: {exc.reason}"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    return (mark.line + 1 if mark is not None else None), " ".join(str(problem).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: YAML keeps the last one
    silently, so a recipe would not say what its author thinks it says."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's scalar constructors raise plain Python errors for some well-formed but
        # impossible values (an integer of more than 4,300 digits, year 0, `!!timestamp x`);
        # they become YAML errors that point at the value.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, AttributeError, OverflowError):
            kind = str(node.tag).rsplit(":", 1)[-1]
            text = node.value if isinstance(node.value, str) else ""
            shown = repr(text[:40] + "..." if len(text) > 40 else text)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown} as {kind}", node.start_mark
            ) from None


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "a key must be a plain value, not a list or mapping",
                key_node.start_mark,
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        parsed = _load_yaml(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: the text itself, which the key's type check then judges
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # YAML keys may be numbers, null or text with newlines: sorted and shown so that the
    # message is one line whatever the key.
    unknown = sorted(set(raw) - set(fields), key=repr)
    if unknown:
        where = prefix.rstrip(".") or "recipe"
        raise ConfigError(
            f"unknown key {prefix}{_shown_key(unknown[0])} in {where}; allowed: {', '.join(fields)}"
        )
    values = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, prefix=f"{key}.")
        else:
            values[name] = _coerce(key, hint, value, fields[name].metadata)
    return cls(**values)


def _shown_key(name: object) -> str:
    return name if isinstance(name, str) and name.isprintable() else repr(name)


def _coerce(key: str, hint: Any, value: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Check one value against its type hint and range; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, option, value, meta)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is Literal:
        # By type too: YAML's 1 equals True (and 0 False), which a bool choice must not take.
        if not any(type(value) is type(a) and value == a for a in args):
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of: {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(f"{key}[{i}]", args[0], v, {}) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    elif hint is float:
        value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"{key}: the number is too large") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value} is not a finite number")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ConfigError(f"{key}: {value} is below the minimum {low}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value} is above the maximum {high}")
    return value


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _describe(value: Any) -> str:
    return "nothing (null)" if value is None else f"{value!r} ({type(value).__name__})"


# --------------------------------------------------------------------------------------------
# Cross-field rules


def validate(recipe: Recipe) -> None:
    """Rules that involve more than one key; single-key rules live in the field metadata."""
    if recipe.data.train is None:
        raise ConfigError("data.train is required: a data set folder, a .jsonl file or a glob")
    if recipe.training.warmup_steps and recipe.training.max_steps:
        if recipe.training.warmup_steps >= recipe.training.max_steps:
            raise ConfigError(
                f"training.warmup_steps ({recipe.training.warmup_steps}) must be smaller than "
                f"training.max_steps ({recipe.training.max_steps})"
            )
    if recipe.training.max_steps is None and (recipe.data.packing or recipe.data.format == "text"):
        raise ConfigError(
            "training.max_steps is required with data.packing=true or data.format=text: the "
            "number of packed rows is only known after tokenizing the whole data set"
        )
    if recipe.data.group_by_length and recipe.data.packing:
        raise ConfigError(
            f"data.group_by_length={recipe.data.group_by_length} cannot be combined with "
            "data.packing=true: packed rows are already full, there is no padding to group "
            "away; choose one (data.group_by_length=0 or data.packing=false)"
        )
    if recipe.data.group_by_length and recipe.data.format == "text":
        raise ConfigError(
            f"data.group_by_length={recipe.data.group_by_length} does not apply to "
            "data.format=text: text rows are cut from one continuous text and all have "
            "data.max_seq_len tokens; set data.group_by_length=0"
        )
    if recipe.quantization.mode != "none" and not recipe.lora.enabled:
        raise ConfigError(
            f"quantization.mode={recipe.quantization.mode} needs lora.enabled=true: quantized "
            "weights are frozen, only adapters can train"
        )
