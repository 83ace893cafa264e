"""GPU acceptance checks with fixed step counts and one time budget; bench/gpu_check.sh runs it.

    python bench/gpu_check.py [--out DIR] [--budget-s 540] [--peak-tflops T] [--only a d ...]
    python bench/gpu_check.py --dry-run        # every check on the CPU with tiny shapes

Checks, in order of value (each prints one `RESULT` or `SKIP` line and writes <out>/<name>.json;
<out>/summary.json collects them):

  a full_ft_mfu    bf16 full fine-tune of a random ~1B Llama (hidden 2048, 16 layers, 32 heads,
                   intermediate 5632, vocab 32000), 8 x 2048 tokens per step, AdamW, no
                   gradient checkpointing: tokens/s and MFU, target MFU >= 40 %
  d packed_attn    the packed block-causal mask (raft_dist.data.batching.block_causal_mask) with
                   SDPA against flex_attention with a document mask and against per-example
                   SDPA (raft_dist.packed_attention): outputs and grads close
  b qlora_8b       Llama-3-8B shapes built in bf16 on the GPU, then quantized to NF4 (bitsandbytes),
                   LoRA r=16 on all linear layers, micro-batch 1 x 2048 tokens, gradient
                   checkpointing: training peak memory < 10 GiB, tokens/s
  c lora_8b        the same shapes with a bf16 base: peak memory and tokens/s
  e deepspeed      ZeRO-2, one process, a few steps of a small Llama (skipped without deepspeed)

MFU = model FLOPs per step / (step time x peak), where model FLOPs per step are
    6 x P x T  +  12 x L x H x S^2 x B
P = parameters taking part in matmuls (all but the input embedding; the untied LM head counts),
T = tokens per step (B sequences of S tokens), L layers, H hidden size. The second term is
attention's score and value matmuls (QK^T and AV: 2 x 2 x S^2 x H per layer and sequence forward,
x3 with backward), counted over the full S x S square as in the PaLM paper (causal masking would
halve the useful part). Peak is the dense bf16 figure of the GPU by name (H100/H200 989 TFLOPS,
A100 312 TFLOPS), or --peak-tflops.

Imports only torch, transformers, peft, accelerate (not used directly) and raft_dist modules that
import nothing else (raft_dist.evaluate, raft_dist.data.batching): the GPU machine has no datasets,
deepspeed, bitsandbytes, flash-attn, hjson or pydantic. Optional libraries are probed by
importlib.util.find_spec and imported only inside their check.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the working tree, not an installed raft-dist
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 1024**3
MFU_TARGET = 0.40
QLORA_PEAK_TARGET_GIB = 10.0
# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}

LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 5632,
    "vocab_size": 32000,
}
LLAMA3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}


@dataclass(frozen=True)
class Sizes:
    """Shapes and step counts of one mode: the real GPU one or the CPU dry run."""

    model_1b: dict[str, Any]
    model_8b: dict[str, Any]
    small: dict[str, Any]  # DeepSpeed's model
    seq: int
    batch_1b: int
    warmup: int
    steps: int
    attn_len: int


REAL = Sizes(LLAMA_1B, LLAMA3_8B, LLAMA_1B, 2048, 8, 3, 10, 2048)
DRY = Sizes(TINY, TINY, TINY, 64, 2, 1, 2, 64)
# Seconds each check needs at most on an H100/H200 (model build included), for the budget: a
# check that no longer fits is skipped with a line instead of being cut off by the device limit.
NEEDS_S = {"full_ft_mfu": 120, "packed_attn": 30, "qlora_8b": 150, "lora_8b": 120, "deepspeed": 60}


# ---- small helpers ----------------------------------------------------------------------


def log(line: str) -> None:
    print(line, flush=True)


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def peak_tflops(name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def random_llama(shape: dict[str, Any], device: Any, dtype: Any, seed: int = 0) -> Any:
    """A random Llama built directly on the device (no CPU copy of 16 GB for the 8B shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: no fp32 copy (32 GB for the 8B shape)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def token_batch(vocab: int, batch: int, seq: int, device: Any, seed: int = 1) -> dict[str, Any]:
    """Full rows of random tokens, loss on every token but the first (as in raft-dist)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    labels = ids.clone()
    labels[:, 0] = -100
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch_.items()}


def timed_training(
    model: Any, optimizer: Any, batch: dict[str, Any], warmup: int, steps: int, device: Any
) -> dict[str, Any]:
    """warmup untimed steps, then `steps` timed ones; loss from raft_dist.evaluate.token_loss_sum
    (the summed token loss the training loop uses), divided by the target tokens."""

    from raft_dist.evaluate import token_loss_sum

    model.train()
    losses: list[float] = []
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            started = time.perf_counter()
        loss_sum, count = token_loss_sum(model, batch)
        loss = loss_sum / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # one wait per step, as the loop's log does
    sync(device)
    seconds = time.perf_counter() - started
    tokens = batch["input_ids"].numel() * steps
    return {
        "losses": losses,
        "timed_steps": steps,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / steps,
        "finite": all(math.isfinite(v) for v in losses),
    }


# ---- (a) full fine-tune MFU ---------------------------------------------------------------


def model_flops_per_step(params_matmul: int, shape: dict[str, Any], batch: int, seq: int) -> float:
    tokens = batch * seq
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq**2 * batch
    return 6 * params_matmul * tokens + attention


def check_full_ft_mfu(ctx: Context) -> dict[str, Any]:
    import torch

    sizes, device = ctx.sizes, ctx.device
    dtype = torch.bfloat16
    model = random_llama(sizes.model_1b, device, dtype)
    if ctx.compile:
        model.compile()
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params - model.get_input_embeddings().weight.numel()
    # Pure bf16 weights and AdamW states (no fp32 master copy): the common bf16 full fine-tune.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = token_batch(sizes.model_1b["vocab_size"], sizes.batch_1b, sizes.seq, device)
    reset_memory(device)
    run = timed_training(model, optimizer, batch, sizes.warmup, sizes.steps, device)
    flops = model_flops_per_step(matmul_params, sizes.model_1b, sizes.batch_1b, sizes.seq)
    peak = peak_tflops(ctx.name, ctx.peak_tflops)
    achieved = flops / run["step_s"]
    mfu = achieved / (peak * 1e12) if peak else None
    result = {
        "shape": sizes.model_1b,
        "params": params,
        "matmul_params": matmul_params,
        "batch": sizes.batch_1b,
        "seq": sizes.seq,
        "compiled": ctx.compile,
        "model_flops_per_step": flops,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak,
        "mfu": mfu,
        "target": f"MFU >= {MFU_TARGET:.0%}",
        "peak_memory_gib": peak_gib(device),
        **run,
    }
    if mfu is None:
        result["verdict"] = "n/a (unknown GPU: pass --peak-tflops)"
        summary = f"{run['tokens_per_s']:,.0f} tok/s, {achieved / 1e12:.1f} TFLOPS, MFU n/a"
    else:
        result["verdict"] = "PASS" if mfu >= MFU_TARGET else "MISS"
        summary = (
            f"{run['tokens_per_s']:,.0f} tok/s, {achieved / 1e12:.1f} TFLOPS, MFU {mfu:.1%} "
            f"(target >= {MFU_TARGET:.0%}: {result['verdict']})"
        )
    result["line"] = f"{params / 1e9:.2f}B params, " + summary
    return result


# ---- (d) packed attention: SDPA + block-causal mask vs flex_attention ----------------------


def check_packed_attn(ctx: Context) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from raft_dist.data.batching import block_causal_mask
    from raft_dist.packed_attention import example_spans, per_example_attention

    device, length = ctx.device, ctx.sizes.attn_len
    heads, head_dim, batch = 8, 64, 2
    # Documents of uneven lengths per row and trailing padding (-1), as data/batching.py packs.
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        row, doc = [], 0
        while len(row) < length - length // 8:
            n = int(torch.randint(3, max(4, length // 3), (1,), generator=generator))
            row += [doc] * n
            doc += 1
        row = row[: length - length // 8]
        rows.append(row + [-1] * (length - len(row)))
    sequence_ids = torch.tensor(rows, device=device)
    bool_mask = block_causal_mask(sequence_ids)  # (B, 1, L, L), True = may attend
    spans = example_spans(sequence_ids)
    real = (sequence_ids >= 0)[:, None, :, None]  # (B, 1, L, 1): a document's position

    def document_mask(b: Any, h: Any, q: Any, kv: Any) -> Any:
        same = sequence_ids[b, q] == sequence_ids[b, kv]
        real = sequence_ids[b, kv] >= 0
        return (same & real & (kv <= q)) | (q == kv)

    block_mask = create_block_mask(document_mask, batch, None, length, length, device=str(device))
    flex = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    results = {}
    tolerances = {torch.float32: 2e-5, torch.bfloat16: 5e-2}
    # flex_attention has no backward on the CPU: the dry run compares outputs only.
    backward = device.type == "cuda"
    if device.type != "cuda":
        tolerances = {torch.float32: 2e-5}  # bf16 attention on CPU says nothing about a GPU
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dtype, tol in tolerances.items():
            base = torch.randn(3, batch, heads, length, head_dim, generator=generator)
            outs, grads = [], []
            for impl in ("sdpa", "flex", "per_example"):
                q, k, v = (t.to(device, dtype).requires_grad_(backward) for t in base)
                if impl == "sdpa":
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
                elif impl == "flex":
                    out = flex(q, k, v, block_mask=block_mask)
                else:  # what the loop runs on the CPU: SDPA on each document's span
                    out, _ = per_example_attention(
                        torch.nn.Module(), q, k, v, None, packed_spans=spans
                    )
                    out = out.transpose(1, 2)  # (B, L, H, D) -> (B, H, L, D)
                if backward:  # a loss that weighs every output element differently
                    weights = torch.linspace(-1, 1, out.size(-1), device=device, dtype=dtype)
                    (out * weights).sum().backward()
                    grads.append([t.grad.float() for t in (q, k, v)])
                outs.append(out.detach().float())
            out_diff = (outs[0] - outs[1]).abs().max().item()
            grad_diff = (
                max((a - b).abs().max().item() for a, b in zip(grads[0], grads[1], strict=True))
                if backward
                else math.nan
            )
            # Per-example attention leaves padding positions at zero (nothing reads them):
            # compared on the documents' positions only, outputs and gradients alike.
            per_example_diff = ((outs[0] - outs[2]) * real).abs().max().item()
            if backward:
                per_example_diff = max(
                    per_example_diff,
                    *(
                        ((a - b) * real).abs().max().item()
                        for a, b in zip(grads[0], grads[2], strict=True)
                    ),
                )
            scale = max(outs[0].abs().max().item(), 1e-6)
            grad_scale = (
                max(max(g.abs().max().item() for g in grads[0]), 1e-6) if backward else math.nan
            )
            results[str(dtype).removeprefix("torch.")] = {
                "max_abs_out_diff": out_diff,
                "max_abs_grad_diff": grad_diff,
                "out_scale": scale,
                "grad_scale": grad_scale,
                "tolerance": tol,
                "max_abs_per_example_diff": per_example_diff,
                "close": out_diff <= tol * scale
                and (not backward or grad_diff <= tol * grad_scale)
                and per_example_diff <= tol * max(scale, grad_scale if backward else 0.0),
            }
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    ok = all(r["close"] for r in results.values())
    detail = ", ".join(
        f"{name}: out {r['max_abs_out_diff']:.1e} "
        + (f"grad {r['max_abs_grad_diff']:.1e}" if backward else "grads not compared on CPU")
        + f", per-example {r['max_abs_per_example_diff']:.1e}"
        for name, r in results.items()
    )
    return {
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "length": length,
        "documents_per_row": [len(set(r) - {-1}) for r in rows],
        "flex_compiled": device.type == "cuda",
        "grads_compared": backward,
        "by_dtype": results,
        "verdict": "PASS" if ok else "FAIL",
        "line": f"SDPA+block_causal_mask vs flex_attention and per-example SDPA ({detail}): "
        + ("close" if ok else "DIFFER"),
    }


# ---- (b, c) adapters on the 8B shape ------------------------------------------------------


def quantize_linears_nf4(model: Any, device: Any) -> int:
    """Replace every nn.Linear inside the decoder layers by a bitsandbytes NF4 Linear4bit
    (double quantization, bf16 compute), freeing each bf16 weight as it goes; what
    BitsAndBytesConfig(load_in_4bit=True, ...) does at load time. The LM head stays bf16."""
    import bitsandbytes as bnb
    import torch

    replaced = 0
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4"
                ).to(device)
                setattr(parent, name, quantized)
                replaced += 1
                del child
    return replaced


def adapter_check(ctx: Context, quantized: bool) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from raft_dist.model import enable_gradient_checkpointing

    sizes, device = ctx.sizes, ctx.device
    reset_memory(device)
    model = random_llama(sizes.model_8b, device, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    replaced = quantize_linears_nf4(model, device) if quantized else 0
    model.requires_grad_(False)
    enable_gradient_checkpointing(model)  # the training loop's own (non-reentrant)
    model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda"
    )
    batch = token_batch(sizes.model_8b["vocab_size"], 1, sizes.seq, device)
    # The build (and the bf16 weights quantization freed) is not training memory.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights_gib = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    run = timed_training(model, optimizer, batch, sizes.warmup, sizes.steps, device)
    peak = peak_gib(device)
    result = {
        "shape": sizes.model_8b,
        "params": params,
        "trainable": trainable,
        "quantized_linears": replaced,
        "micro_batch": 1,
        "seq": sizes.seq,
        "gradient_checkpointing": True,
        "weights_gib_after_build": weights_gib,
        "training_peak_gib": peak,
        **run,
    }
    what = f"{run['tokens_per_s']:,.0f} tok/s, training peak " + (
        f"{peak:.2f} GiB" if peak is not None else "n/a (CPU)"
    )
    if quantized:
        fits = peak is not None and peak < QLORA_PEAK_TARGET_GIB
        result["target"] = f"training peak < {QLORA_PEAK_TARGET_GIB:g} GiB"
        result["verdict"] = ("PASS" if fits else "MISS") if peak is not None else "n/a (CPU)"
        what += f" (target < {QLORA_PEAK_TARGET_GIB:g} GiB: {result['verdict']})"
    else:
        result["verdict"] = "measured" if run["finite"] else "FAIL"
    if not run["finite"]:
        result["verdict"] = "FAIL"
        what += ", NON-FINITE LOSS"
    result["line"] = f"{params / 1e9:.2f}B params, {trainable / 1e6:.1f}M trainable, " + what
    return result


def check_qlora_8b(ctx: Context) -> dict[str, Any] | str:
    if not ctx.available("bitsandbytes"):
        return "bitsandbytes is not importable: QLoRA NF4 not checked"
    return adapter_check(ctx, quantized=True)


def check_lora_8b(ctx: Context) -> dict[str, Any]:
    return adapter_check(ctx, quantized=False)


# ---- (e) DeepSpeed ------------------------------------------------------------------------


def check_deepspeed(ctx: Context) -> dict[str, Any] | str:
    if not ctx.available("deepspeed"):
        return "deepspeed is not importable: ZeRO not checked"
    import deepspeed
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    sizes, device = ctx.sizes, ctx.device
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_llama(sizes.small, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "gradient_clipping": 1.0,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    from raft_dist.evaluate import token_loss_sum

    batch = token_batch(sizes.small["vocab_size"], 1, sizes.seq, device)
    losses = []
    started = 0.0
    for step in range(sizes.warmup + sizes.steps):
        if step == sizes.warmup:
            sync(device)
            started = time.perf_counter()
        loss_sum, count = token_loss_sum(engine, batch)
        loss = loss_sum / count
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    sync(device)
    seconds = time.perf_counter() - started
    tokens = sizes.seq * sizes.steps
    finite = all(math.isfinite(v) for v in losses)
    return {
        "version": deepspeed.__version__,
        "zero_stage": 2,
        "losses": losses,
        "tokens_per_s": tokens / seconds,
        "verdict": "PASS" if finite else "FAIL",
        "line": f"ZeRO-2, 1 process: {tokens / seconds:,.0f} tok/s, losses "
        + ("finite" if finite else "NON-FINITE"),
    }


# ---- driver -------------------------------------------------------------------------------


@dataclass
class Context:
    device: Any
    name: str
    sizes: Sizes
    peak_tflops: float | None
    compile: bool
    without: frozenset[str] = frozenset()

    def available(self, lib: str) -> bool:
        """An optional library the checks may import (--without hides one, as on a machine
        that lacks it)."""
        return lib not in self.without and importlib.util.find_spec(lib) is not None


CHECKS: list[tuple[str, str, Callable[[Context], Any]]] = [
    ("a", "full_ft_mfu", check_full_ft_mfu),
    ("d", "packed_attn", check_packed_attn),
    ("b", "qlora_8b", check_qlora_8b),
    ("c", "lora_8b", check_lora_8b),
    ("e", "deepspeed", check_deepspeed),
]


def environment(device: Any, name: str) -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": name,
    }
    for lib in ("peft", "accelerate", "bitsandbytes", "deepspeed"):
        spec = importlib.util.find_spec(lib)
        env[lib] = None if spec is None else _version(lib)
    return env


def _version(lib: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(lib)
    except PackageNotFoundError:
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every check on the CPU, tiny")
    parser.add_argument(
        "--out", type=Path, default=None, help="result folder (default $OUT, else bench/results)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="seconds for all checks; a check that no longer fits is skipped with a line",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    parser.add_argument("--compile", action="store_true", help="torch.compile the 1B model (a)")
    parser.add_argument(
        "--without",
        nargs="*",
        default=[],
        choices=["bitsandbytes", "deepspeed"],
        help="treat these optional libraries as missing (their checks print a SKIP line)",
    )
    parser.add_argument(
        "--only", nargs="*", choices=[letter for letter, _, _ in CHECKS], help="run only these"
    )
    return parser.parse_args(argv)


def out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check"
    return ROOT / "bench" / "results" / ("gpu_check_dry" if args.dry_run else "gpu_check")


def write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    import torch

    if args.dry_run:
        device, sizes = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", 0), REAL
    else:
        log("no CUDA device: run on a GPU machine, or pass --dry-run for the CPU code paths")
        return 2
    name = device_name(device)
    out = out_dir(args)
    ctx = Context(device, name, sizes, args.peak_tflops, args.compile, frozenset(args.without))
    env = environment(device, name)
    log(f"gpu_check: {name}, torch {env['torch']}, out {out}, budget {args.budget_s:.0f} s")
    summary: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dry_run": args.dry_run,
        "environment": env,
        "mfu_formula": "(6 * P_matmul * B * S + 12 * L * H * S^2 * B) / (step_s * peak)",
        "checks": {},
    }
    failed = False
    for letter, check_name, check in CHECKS:
        if args.only and letter not in args.only:
            continue
        elapsed = time.perf_counter() - started
        left = args.budget_s - elapsed
        need = 5 if args.dry_run else NEEDS_S[check_name]
        record: dict[str, Any] = {"check": check_name, "letter": letter}
        check_started = time.perf_counter()
        if left < need:
            record.update(status="skip", reason=f"time budget: {left:.0f} s left, needs ~{need}")
        else:
            try:
                result = check(ctx)
            except Exception as exc:  # one failing check must not cost the others
                failed = True
                record.update(
                    status="error",
                    error=f"{type(exc).__name__}: {exc}"[:2000],
                    traceback=traceback.format_exc()[-4000:],
                )
            else:
                if isinstance(result, str):
                    record.update(status="skip", reason=result)
                else:
                    record.update(status="result", **result)
                    failed |= result.get("verdict") == "FAIL"
            finally:
                reset_memory(device)
        record["wall_s"] = time.perf_counter() - check_started
        if record["status"] == "result":
            log(f"RESULT ({letter}) {check_name}: {record['line']} [{record['wall_s']:.0f} s]")
        elif record["status"] == "skip":
            log(f"SKIP   ({letter}) {check_name}: {record['reason']}")
        else:
            log(f"ERROR  ({letter}) {check_name}: {record['error'].splitlines()[0][:300]}")
        write(out / f"{check_name}.json", record)
        summary["checks"][check_name] = record
    summary["wall_s"] = time.perf_counter() - started
    write(out / "summary.json", summary)
    log(f"gpu_check: done in {summary['wall_s']:.0f} s; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
