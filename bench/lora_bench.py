"""Full fine-tuning (fp32) against LoRA (bf16) and QLoRA (nf4): weights, RSS and step time.

    .venv/bin/python bench/lora_bench.py [--steps 3] [--warmup 1] [--seq-len N] [--out DIR]

One random ~134M-parameter Llama is built once (seeded) and saved as safetensors. Every variant
then runs in its own subprocess, so each peak RSS belongs to that variant alone, and builds its
model with raft-dist's own `build_training_model` from a recipe given as overrides, exactly as a
training run would. Each subprocess trains a few AdamW steps on one fixed random batch. The
target: the QLoRA base model's weight footprint is at most 0.3x the fp32 model's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import MIB

MODEL_SEED = 1234
BATCH_SEED = 5678
TARGET_RATIO = 0.3
DEFAULT_STEPS = 3
DEFAULT_WARMUP = 1
FULL_SEQ_LEN = 256
# Without native bf16 matmuls one bf16 step of this model at 256 tokens takes minutes on 2
# cores; 32 tokens keeps the whole run within minutes. Activations are small at either length,
# so the memory figures are dominated by weights, gradients and optimizer states either way.
EMULATED_BF16_SEQ_LEN = 32

# GPT-2-small-like widths in the Llama architecture; untied output head, as in Llama 1/2.
# bitsandbytes never quantizes the output head (nor the embedding), so an untied head is the
# less favourable case for the QLoRA footprint target.
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

# Identical in every variant: the only differences are precision, adapters and quantization.
# Gradient checkpointing is off everywhere (raft-dist turns it on for QLoRA by default) so that
# step times do not mix quantization cost with recomputation.
COMMON = ["data.train=unused", "training.gradient_checkpointing=false"]
LORA = ["lora.enabled=true", "lora.r=16", "lora.alpha=32", "lora.target_modules=all-linear"]
VARIANTS: dict[str, list[str]] = {
    "full_fp32": ["model.dtype=float32", "lora.enabled=false"],
    "lora_bf16": ["model.dtype=bfloat16", *LORA],
    "qlora_nf4": [
        "model.dtype=bfloat16",
        *LORA,
        "quantization.mode=4bit",
        "quantization.quant_type=nf4",
        "quantization.double_quant=true",
        "quantization.compute_dtype=bfloat16",
    ],
}
REFERENCE = "full_fp32"


# --------------------------------------------------------------------------------------------
# Parent: build the model once, run each variant in a fresh process, compare


def native_bf16() -> bool:
    """bf16 matmuls run at speed only with AVX512-BF16 or AMX; otherwise they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def build_checkpoint(folder: Path) -> int:
    """The shared starting point: a seeded random Llama saved in fp32, as a checkpoint would be."""
    model = common.random_llama(MODEL_SHAPE, MODEL_SEED)
    model.save_pretrained(folder)
    return common.parameter_count(model)


def run_variant(
    name: str, checkpoint: Path, seq_len: int, steps: int, warmup: int
) -> dict[str, Any]:
    """One variant in a fresh interpreter, so its peak RSS holds nothing of the others."""
    args = ["--child", name, "--checkpoint", str(checkpoint), "--seq-len", str(seq_len)]
    args += ["--steps", str(steps), "--warmup", str(warmup)]
    return common.run_json_child(Path(__file__).resolve(), args, f"variant {name}")


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def measure(
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    seq_len: int | None = None,
    log: common.Log = print,
) -> dict[str, Any]:
    """Every variant on the same checkpoint and batch; ratios are to full fine-tuning in fp32."""
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    native = native_bf16()
    if seq_len is None:
        seq_len = FULL_SEQ_LEN if native else EMULATED_BF16_SEQ_LEN
    notes = []
    if not native and seq_len < FULL_SEQ_LEN:
        notes.append(
            f"sequence length {seq_len} instead of {FULL_SEQ_LEN}: this CPU has no native bf16 "
            "matmuls (no avx512_bf16/amx_bf16), bf16 steps are emulated and slow"
        )
    if common.is_busy(load_at_start):
        notes.append(
            f"load average {load_at_start[0]:.2f} at the start: other work on this machine "
            "slows the steps (see 'other load'); the memory figures do not depend on it"
        )
    for note in notes:
        log(f"note: {note}")
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as folder:
        checkpoint = Path(folder)
        params = build_checkpoint(checkpoint)
        log(f"random Llama, {params / 1e6:.1f}M parameters, saved to a temporary folder")
        variants: dict[str, Any] = {}
        for name in VARIANTS:
            variants[name] = run_variant(name, checkpoint, seq_len, steps, warmup)
            v = variants[name]
            log(
                f"{name}: weights {v['base_footprint_bytes'] / MIB:.0f} MiB, peak RSS "
                f"{v['peak_rss_bytes'] / MIB:.0f} MiB, step {v['median_step_s']:.2f} s "
                f"({v['process_wall_s']:.0f} s in all)"
            )
    ref = variants[REFERENCE]
    for v in variants.values():
        v["frozen_weight_bytes"] = v["base_footprint_bytes"] - v["adapter_bytes"]
        v["trainable_share"] = v["trainable_params"] / params
        keys = (
            "base_footprint_bytes",
            "frozen_weight_bytes",
            "peak_rss_bytes",
            "train_peak_rss_bytes",
            "median_step_s",
            "median_step_cpu_s",
        )
        v["ratio_to_fp32"] = {key: ratio(v[key], ref[key]) for key in keys}
    qlora = variants["qlora_nf4"]
    # The verdict uses get_memory_footprint as it comes (adapters included: the stricter figure).
    footprint_ratio = qlora["ratio_to_fp32"]["base_footprint_bytes"]
    with_state = (qlora["base_footprint_bytes"] + qlora["quant_state_bytes"]) / ref[
        "base_footprint_bytes"
    ]
    return {
        "model": {"architecture": "llama", "parameters": params, **MODEL_SHAPE},
        "batch": {"micro_batch": 1, "seq_len": seq_len, "seed": BATCH_SEED},
        "steps": steps,
        "warmup_steps": warmup,
        "native_bf16": native,
        "notes": notes,
        "overrides": {name: [*COMMON, *VARIANTS[name]] for name in VARIANTS},
        "variants": variants,
        "target": {
            "qlora_over_fp32_footprint_at_most": TARGET_RATIO,
            "value": footprint_ratio,
            "frozen_weights_only": qlora["ratio_to_fp32"]["frozen_weight_bytes"],
            "with_quant_state": with_state,
            "verdict": common.verdict(footprint_ratio <= TARGET_RATIO),
        },
        "load_avg_at_start": load_at_start,
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
    }


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


WEIGHTS_HEADER = (
    "variant",
    "weights MiB (x fp32)",
    "of which adapters MiB",
    "frozen weights (x fp32)",
    "4-bit quant state MiB",
    "bits per 4-bit weight",
    "trainable params",
)
PROCESS_HEADER = (
    "variant",
    "RSS after imports MiB",
    "RSS after load MiB",
    "of which malloc free MiB",
    "peak RSS MiB (x fp32)",
    "training peak MiB (x fp32)",
    "step s (x fp32)",
    "step CPU s",
    "other load",
)


def tables(payload: dict[str, Any]) -> str:
    """Two markdown tables, weights and process, for the terminal and for bench/README.md."""
    weights: list[tuple[str, ...]] = []
    process: list[tuple[str, ...]] = []
    for name, v in payload["variants"].items():
        r = v["ratio_to_fp32"]
        bits = v["bits_per_quantized_weight"]
        train_peak = v["train_peak_rss_bytes"]
        weights.append(
            (
                name,
                f"{v['base_footprint_bytes'] / MIB:.1f} ({r['base_footprint_bytes']:.3f})",
                f"{v['adapter_bytes'] / MIB:.1f}",
                f"{v['frozen_weight_bytes'] / MIB:.1f} ({r['frozen_weight_bytes']:.3f})",
                f"{v['quant_state_bytes'] / MIB:.2f}",
                "-" if bits is None else f"{bits:.3f}",
                f"{v['trainable_params'] / 1e6:.2f}M ({v['trainable_share']:.2%})",
            )
        )
        process.append(
            (
                name,
                mib(v["rss_after_imports_bytes"]),
                mib(v["rss_after_load_bytes"]),
                mib(v["malloc_free_after_load_bytes"]),
                f"{v['peak_rss_bytes'] / MIB:.0f} ({r['peak_rss_bytes']:.2f})",
                "-"
                if train_peak is None
                else f"{mib(train_peak)} ({r['train_peak_rss_bytes']:.2f})",
                f"{v['median_step_s']:.2f} ({r['median_step_s']:.2f})",
                f"{v['median_step_cpu_s']:.2f}",
                f"{v['other_load_during_timed_steps']:.0%}",
            )
        )
    return (
        common.markdown_table(WEIGHTS_HEADER, weights)
        + "\n\n"
        + common.markdown_table(PROCESS_HEADER, process)
    )


def report_rows(payload: dict[str, Any]) -> list[common.Row]:
    """Rows (metric, value, target, verdict) for bench/run.py's combined table."""
    target = payload["target"]
    rows = [
        (
            "QLoRA/fp32 weight footprint",
            f"{target['value']:.3f}",
            f"<= {TARGET_RATIO}",
            target["verdict"],
        )
    ]
    for name, v in payload["variants"].items():
        rows.append((f"{name} peak RSS (MiB)", f"{v['peak_rss_bytes'] / MIB:.0f}", "", ""))
        rows.append((f"{name} step (s, median)", f"{v['median_step_s']:.2f}", "", ""))
    return rows


# --------------------------------------------------------------------------------------------
# Child: one variant, built and trained with raft-dist's own code


def adapter_bytes(model: Any) -> int:
    """peft injects the adapters into the base model, so its get_memory_footprint holds them."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def grad_norm(params: list[Any]) -> float:
    """Global L2 norm of the gradients; 0.0 when any trainable tensor got none."""
    import torch

    if any(p.grad is None for p in params):
        return 0.0
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def quantized_weights(model: Any) -> dict[str, int]:
    """Weights stored in 4 bits: how many, their packed bytes, and the bytes of the absmax and
    codebooks that bitsandbytes keeps beside them, outside what get_memory_footprint counts."""
    import math

    count = packed = state_bytes = 0
    seen: set[int] = set()
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is None:
            continue
        count += math.prod(state.shape)
        packed += param.numel() * param.element_size()
        while state is not None and id(state) not in seen:
            seen.add(id(state))
            for name in ("absmax", "code", "offset"):
                tensor = getattr(state, name, None)
                if tensor is not None and hasattr(tensor, "element_size"):
                    state_bytes += tensor.numel() * tensor.element_size()
            state = getattr(state, "state2", None)
    return {"count": count, "packed_bytes": packed, "quant_state_bytes": state_bytes}


def malloc_free_bytes() -> int | None:
    """Freed memory glibc keeps in its heaps (mallinfo2 fordblks): part of RSS that no tensor
    uses any more, e.g. the 16-bit copies bitsandbytes quantized from."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            ).split()
        ]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    return int(libc.mallinfo2().fordblks)


def child(args: argparse.Namespace) -> int:
    """Load, train `warmup + steps` steps, and write what was measured to args.result."""
    # Every variant imports the same libraries first, so the RSS before loading is comparable.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch

    from raft_dist.adapters import build_training_model
    from raft_dist.config import load_recipe
    from raft_dist.model import load_tokenizer

    rss_imports = common.status_bytes("VmRSS")
    overrides = [
        *COMMON,
        f"model.name_or_path={args.checkpoint}",
        f"model.tokenizer={common.TINY_TOKENIZER}",
        *VARIANTS[args.child],
    ]
    recipe = load_recipe(None, overrides)
    torch.manual_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model)
    load_started = time.perf_counter()
    model = build_training_model(recipe, tokenizer)
    load_s = time.perf_counter() - load_started
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    load_peak = common.peak_rss_bytes()
    rss_loaded = common.status_bytes("VmRSS")
    malloc_free = malloc_free_bytes()
    can_reset = common.reset_peak_rss()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=recipe.training.lr, weight_decay=recipe.training.weight_decay
    )
    generator = torch.Generator().manual_seed(BATCH_SEED)
    ids = torch.randint(0, len(tokenizer), (1, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    step_s, step_cpu_s, losses, grad_norms = [], [], [], []
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            cpu_from = common.cpu_reading()
        wall_0, cpu_0 = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        wall_1, cpu_1 = time.perf_counter(), time.process_time()
        # The silent failure to look for: adapters that get no gradient at all. Left out of
        # the step time; a reduction per tensor, so it adds no copy of the gradients to RSS.
        grad_norms.append(grad_norm(trainable))
        wall_2, cpu_2 = time.perf_counter(), time.process_time()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - wall_2 + wall_1 - wall_0)
        step_cpu_s.append(time.process_time() - cpu_2 + cpu_1 - cpu_0)
        losses.append(float(loss))
    timed_other = common.other_load(cpu_from, common.cpu_reading())
    train_peak = common.peak_rss_bytes()
    hwm = common.status_bytes("VmHWM")

    quantized = quantized_weights(base)
    result = {
        "overrides": overrides,
        "torch_threads": torch.get_num_threads(),
        "load_s": load_s,
        # get_memory_footprint of the model peft wraps: frozen weights plus injected adapters.
        "base_footprint_bytes": base.get_memory_footprint(),
        "adapter_bytes": adapter_bytes(base),
        "quant_state_bytes": quantized["quant_state_bytes"],
        "quantized_weights": quantized["count"],
        "bits_per_quantized_weight": (
            8 * (quantized["packed_bytes"] + quantized["quant_state_bytes"]) / quantized["count"]
            if quantized["count"]
            else None
        ),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "base_weight_dtypes": sorted({str(p.dtype) for p in base.parameters()}),
        "rss_after_imports_bytes": rss_imports,
        "rss_after_load_bytes": rss_loaded,
        "malloc_free_after_load_bytes": malloc_free,
        "load_peak_rss_bytes": load_peak,
        # ru_maxrss over the whole process: loading, optimizer states and training steps.
        "peak_rss_bytes": max(load_peak, train_peak),
        "train_peak_rss_bytes": (hwm if hwm is not None else train_peak) if can_reset else None,
        "step_s": step_s,
        "median_step_s": common.median(step_s[args.warmup :]),
        "step_cpu_s": step_cpu_s,
        "median_step_cpu_s": common.median(step_cpu_s[args.warmup :]),
        "other_load_during_timed_steps": timed_other,
        "losses": losses,
        "grad_norms": grad_norms,
    }
    common.write_json(args.result, result)
    return 0


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed steps")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed first steps")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"tokens in the batch (default {FULL_SEQ_LEN}, or {EMULATED_BF16_SEQ_LEN} on a CPU "
        "without native bf16)",
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    payload = measure(args.steps, args.warmup, args.seq_len, log=common.progress)
    payload["command"] = common.command_line()
    print()
    print(tables(payload))
    target = payload["target"]
    print(
        f"\nQLoRA/fp32 weight footprint {target['value']:.3f} (target <= {TARGET_RATIO}): "
        f"{target['verdict']}; frozen weights alone {target['frozen_weights_only']:.3f}, "
        f"with the 4-bit quant state {target['with_quant_state']:.3f}"
    )
    for note in payload["notes"]:
        print(f"note: {note}")
    print(f"total {payload['wall_s']:.0f} s")
    path = common.write_json(args.out / "lora.json", payload)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
