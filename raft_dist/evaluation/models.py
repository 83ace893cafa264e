"""Models to evaluate or ask: `BASE` or `BASE+ADAPTER`, loaded for inference.

BASE is a model folder, a hub id or a `builtin:` name; ADAPTER a PEFT adapter folder (a
LoRA/QLoRA run's final/). Several specs on one base share one loaded base: an adapter is put on
for its turn and taken off again. For its turn a LoRA adapter on plain float weights is merged
into them (decoding then runs the plain model: unmerged, the adapter adds two small matmuls and
their Python calls to every targeted layer at every generated token), and the base's own
weights are copied back, bit for bit, when the turn ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raft_dist.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ModelSpec:
    text: str  # as the user wrote it; the report's name for the model
    base: str
    adapter: str | None = None

    @classmethod
    def parse(cls, text: str, option: str = "--model") -> ModelSpec:
        text = text.strip()
        if not text:
            raise ConfigError(f"{option}: empty model name")
        base, adapter = text, None
        if "+" in text and not Path(text).exists():
            base, adapter = (part.strip() for part in text.rsplit("+", 1))
            if not base or not adapter:
                raise ConfigError(f"{option} {text}: write BASE+ADAPTER_FOLDER")
        spec = cls(text=text, base=base, adapter=adapter)
        spec.check(option)
        return spec

    def check(self, option: str) -> None:
        """Fail before any loading on what can be seen without a model."""
        if _looks_like_path(self.base) and not Path(self.base).exists():
            raise ConfigError(f"{option} {self.text}: no such model folder: {self.base}")
        if self.adapter is not None:
            folder = Path(self.adapter)
            if not folder.is_dir():
                raise ConfigError(f"{option} {self.text}: no such adapter folder: {self.adapter}")
            if not (folder / ADAPTER_CONFIG).is_file():
                raise ConfigError(
                    f"{option} {self.text}: {self.adapter} holds no {ADAPTER_CONFIG}; "
                    "is it a PEFT adapter (a LoRA run's final/)?"
                )


def _looks_like_path(name: str) -> bool:
    if name.startswith("builtin:"):
        return False
    # A hub id is "org/name"; anything else with a separator can only be a folder.
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or name.endswith("/")


def pick_dtype(requested: str, device: str) -> str:
    """auto: bf16 where the hardware runs it natively, fp32 elsewhere."""
    if requested not in DTYPES:
        raise ConfigError(f"--dtype {requested}: allowed values are {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    from raft_dist.cpu import cpu_has_native_bf16

    # Where the CPU cannot be inspected, fp32: emulated bf16 is ~10x slower.
    if device == "cpu" and cpu_has_native_bf16(unknown=False):
        return "bfloat16"
    return "float32"


class ModelCache:
    """Loads each base once; `use(spec)` yields (model, tokenizer) with the adapter on."""

    def __init__(self, device: str, dtype: str) -> None:
        self.device, self.dtype = device, dtype
        self._base: tuple[str, Any, Any] | None = None

    def _load_base(self, spec: ModelSpec) -> tuple[Any, Any]:
        if self._base is not None and self._base[0] == spec.base:
            return self._base[1], self._base[2]
        self._base = None  # free the previous base before loading the next one
        import torch

        from raft_dist.config import ModelConfig
        from raft_dist.model import load_model, load_tokenizer

        cfg = ModelConfig(name_or_path=spec.base, dtype=self.dtype)  # type: ignore[arg-type]
        try:
            tokenizer = load_tokenizer(cfg)
            torch.manual_seed(0)  # built-in models are random: the same weights every time
            model = load_model(cfg, tokenizer)
        except ConfigError as exc:
            raise ConfigError(f"--model {spec.text}: {exc}") from None
        model.to(self.device).eval()
        self._base = (spec.base, model, tokenizer)
        return model, tokenizer

    @contextmanager
    def use(self, spec: ModelSpec) -> Iterator[tuple[Any, Any]]:
        model, tokenizer = self._load_base(spec)
        if spec.adapter is None:
            yield model, tokenizer
            return
        wrapped = attach_adapter(model, spec)
        saved = mergeable_weights(wrapped)
        if saved is None:  # quantized or not LoRA: decoded through the adapter layers
            try:
                yield wrapped, tokenizer
            finally:
                self._base = (spec.base, wrapped.unload(), tokenizer)
            return
        merged = wrapped.merge_and_unload()
        try:
            yield merged, tokenizer
        finally:
            # Back to the base's own weights for the next spec: subtracting the merged delta
            # again would leave rounding error in every bf16 weight.
            import torch

            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)
            self._base = (spec.base, merged, tokenizer)


def adapter_base_name(adapter: str) -> str | None:
    try:
        config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(name) if name else None


def attach_adapter(model: Any, spec: ModelSpec) -> Any:
    """PEFT refuses shape mismatches; the message then says which base the adapter expects."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, spec.adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        trained_on = adapter_base_name(spec.adapter or "")
        expected = f" (it was trained on {trained_on})" if trained_on else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"--model {spec.text}: the adapter does not fit the base {spec.base}{expected}: "
            f"{first[:300]}"
        ) from None
    wrapped.eval()
    return wrapped


def mergeable_weights(wrapped: Any) -> list[tuple[Any, Any]] | None:
    """(weight, copy) for every base weight a LoRA merge would change; None if it cannot merge.

    Only plain float tensors merge exactly enough to be worth it: a 4-bit base would be
    dequantized and quantized again, so a QLoRA adapter stays unmerged.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [m for m in wrapped.modules() if isinstance(m, LoraLayer)]
    if not layers:
        return None
    saved = []
    for layer in layers:
        base = layer.get_base_layer()
        for name in ("weight", "bias"):
            tensor = getattr(base, name, None)
            if tensor is None:
                continue
            if type(tensor) is not torch.nn.Parameter or not tensor.dtype.is_floating_point:
                return None
            saved.append((tensor, tensor.detach().clone()))
    return saved


def context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
