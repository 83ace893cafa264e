"""Peak memory: a full fine-tuning step with and without gradient checkpointing, and the token
loss with and without chunking at a 128k vocabulary.

    .venv/bin/python bench/memory_bench.py [--repeats 3] [--only step loss]
        [--seq-len 1024] [--micro-batch 1] [--dtypes float32 bfloat16]
        [--loss-vocab 128256] [--loss-tokens 2048] [--loss-variants ...] [--out DIR]

Every configuration and every repeat runs in a fresh interpreter. It loads what it needs, then
resets the RSS high-water mark (/proc/self/clear_refs) and reads VmHWM after the measured work:
the peak is that work's alone, not the import's or the load's. Figures are medians over the
repeats with their range, and ratios to the baseline of the same run (checkpointing off; the
unchunked loss). Other load on the machine is sampled during each child and reported.

- step: the embedded SmolLM2-135M (builtin:smollm2, 49,152-token vocabulary) built by raft-dist's
  own build_training_model from recipe overrides, as a run builds it; AdamW's moments are made
  before the baseline; then one step on a fixed random batch through token_loss_sum: forward,
  backward, optimizer step. "Before" holds imports, weights and moments; the step adds
  gradients, activations and the loss's logits.
- loss: a 128k-vocabulary output head (hidden 64) on random hidden states of --loss-tokens
  positions: logits = hidden @ W^T as a model's head makes them, the summed loss, backward into
  W. Variants: the unchunked loss token_loss_sum had before, chunks under plain autograd, chunks
  under torch.utils.checkpoint, the chunked Function with a separate gradient buffer, and the
  chunked Function that overwrites the logits with their gradient (what token_loss_sum uses).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import MIB

DEFAULT_REPEATS = 3
STEP_MODEL = "builtin:smollm2"
DEFAULT_SEQ_LEN = 1024
DEFAULT_MICRO_BATCH = 1
# bf16 (--dtypes float32 bfloat16) doubles the step part; this CPU has native bf16 matmuls.
DEFAULT_DTYPES = ["float32"]
LOSS_VOCAB = 128_256  # Llama 3's vocabulary
LOSS_TOKENS = 2048
LOSS_HIDDEN = 64  # small: the head's weight and gradient stay far below the logits
BATCH_SEED = 5678
LOSS_VARIANTS = [
    "unchunked",
    "chunks_autograd",
    "chunks_checkpoint",
    "chunked_buffer",
    "chunked_inplace",
]
# The default run: the baseline and both chunked Functions in fp32, the baseline and the shipped
# one in bf16. Chunks under plain autograd or checkpoint (--loss-variants) cost minutes more.
DEFAULT_LOSS_CONFIGS = [
    ("float32", "unchunked"),
    ("float32", "chunked_buffer"),
    ("float32", "chunked_inplace"),
    ("bfloat16", "unchunked"),
    ("bfloat16", "chunked_inplace"),
]


# --------------------------------------------------------------------------------------------
# Parent: one fresh process per configuration and repeat, medians, ratios


def run_child(args: list[str]) -> dict[str, Any]:
    return common.run_json_child(Path(__file__).resolve(), args, " ".join(args))


def spread(values: list[float]) -> dict[str, Any]:
    return {"values": values, "median": common.median(values), "range": [min(values), max(values)]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and ranges over the repeats of one configuration."""
    keys = ("peak_bytes", "peak_over_baseline_bytes", "seconds", "other_load")
    out = {key: spread([run[key] for run in runs]) for key in keys}
    out["values"] = runs[0].get("values")  # loss / grad-norm readings: the same every repeat
    out["baseline_rss_bytes"] = spread([run["baseline_rss_bytes"] for run in runs])
    out["peak_reset"] = all(run["peak_reset"] for run in runs)
    return out


def add_ratios(configs: dict[str, dict[str, Any]], baseline_of: dict[str, str]) -> None:
    for name, config in configs.items():
        base = configs[baseline_of[name]]
        config["baseline"] = baseline_of[name]
        config["ratio"] = {
            key: config[key]["median"] / base[key]["median"] if base[key]["median"] else None
            for key in ("peak_bytes", "peak_over_baseline_bytes", "seconds")
        }


def step_name(dtype: str, checkpointing: bool) -> str:
    return f"{dtype}, checkpointing {'on' if checkpointing else 'off'}"


def measure(
    repeats: int = DEFAULT_REPEATS,
    only: list[str] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    dtypes: list[str] | None = None,
    loss_vocab: int = LOSS_VOCAB,
    loss_tokens: int = LOSS_TOKENS,
    loss_configs: list[tuple[str, str]] | None = None,
    log: common.Log = print,
) -> dict[str, Any]:
    """Both parts, each configuration `repeats` times, the configurations interleaved so that
    a burst of other load spreads over all of them instead of biasing one."""
    started = time.perf_counter()
    only = only or ["step", "loss"]
    dtypes = dtypes or DEFAULT_DTYPES
    loss_configs = loss_configs or DEFAULT_LOSS_CONFIGS
    load_at_start = os.getloadavg()
    plan: list[tuple[str, str, list[str]]] = []
    if "step" in only:
        for dtype in dtypes:
            for checkpointing in (False, True):
                plan.append(
                    (
                        "step",
                        step_name(dtype, checkpointing),
                        [
                            "--child",
                            "step",
                            "--dtype",
                            dtype,
                            "--checkpointing",
                            str(int(checkpointing)),
                            "--seq-len",
                            str(seq_len),
                            "--micro-batch",
                            str(micro_batch),
                        ],
                    )
                )
    if "loss" in only:
        for dtype, variant in loss_configs:
            plan.append(
                (
                    "loss",
                    f"{dtype}, {variant}",
                    [
                        "--child",
                        "loss",
                        "--dtype",
                        dtype,
                        "--variant",
                        variant,
                        "--loss-vocab",
                        str(loss_vocab),
                        "--loss-tokens",
                        str(loss_tokens),
                    ],
                )
            )
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(part, n): [] for part, n, _ in plan}
    for repeat in range(repeats):
        for part, name, child_args in plan:
            result = run_child(child_args)
            runs[(part, name)].append(result)
            log(
                f"  [{repeat + 1}/{repeats}] {part} {name}: peak {result['peak_bytes'] / MIB:.0f} "
                f"MiB (+{result['peak_over_baseline_bytes'] / MIB:.0f}), "
                f"{result['seconds']:.2f} s, other load {result['other_load']:.0%}"
            )
    payload: dict[str, Any] = {
        "settings": {
            "repeats": repeats,
            "step": {"model": STEP_MODEL, "seq_len": seq_len, "micro_batch": micro_batch},
            "loss": {"vocab": loss_vocab, "tokens": loss_tokens, "hidden": LOSS_HIDDEN},
        },
        "environment": common.environment(),
    }
    for part in ("step", "loss"):
        configs = {n: summarize(r) for (p, n), r in runs.items() if p == part}
        if not configs:
            continue
        if part == "step":
            baseline_of = {n: step_name(n.split(",")[0], False) for n in configs}
        else:
            baseline_of = {n: f"{n.split(',')[0]}, unchunked" for n in configs}
        baseline_of = {n: b if b in configs else n for n, b in baseline_of.items()}
        add_ratios(configs, baseline_of)
        payload[part] = configs
    payload["load_avg_at_start"] = load_at_start
    payload["load_avg_at_end"] = os.getloadavg()
    payload["wall_s"] = time.perf_counter() - started
    return payload


# --------------------------------------------------------------------------------------------
# Report


def mib_range(spread_: dict[str, Any]) -> str:
    low, high = spread_["range"]
    return f"{spread_['median'] / MIB:.0f} ({low / MIB:.0f}-{high / MIB:.0f})"


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


HEADER = (
    "configuration",
    "RSS before MiB",
    "peak MiB (range)",
    "x base",
    "peak over before MiB (range)",
    "x base",
    "seconds (range)",
    "x base",
    "other load",
)


def table(configs: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, c in configs.items():
        secs = c["seconds"]
        rows.append(
            (
                name,
                f"{c['baseline_rss_bytes']['median'] / MIB:.0f}",
                mib_range(c["peak_bytes"]),
                ratio_text(c["ratio"]["peak_bytes"]),
                mib_range(c["peak_over_baseline_bytes"]),
                ratio_text(c["ratio"]["peak_over_baseline_bytes"]),
                f"{secs['median']:.2f} ({secs['range'][0]:.2f}-{secs['range'][1]:.2f})",
                ratio_text(c["ratio"]["seconds"]),
                f"{c['other_load']['median']:.0%}",
            )
        )
    return common.markdown_table(HEADER, rows)


def report_lines(payload: dict[str, Any]) -> list[str]:
    lines = []
    s = payload["settings"]
    if "step" in payload:
        st = s["step"]
        lines += [
            f"full fine-tuning step, {st['model']}, {st['micro_batch']} x {st['seq_len']} tokens, "
            "AdamW with its moments made before (peak and time of one step):",
            table(payload["step"]),
            "",
        ]
    if "loss" in payload:
        lo = s["loss"]
        lines += [
            f"token loss forward + backward, {lo['tokens']} tokens x {lo['vocab']} vocabulary "
            f"(one logits tensor: {lo['tokens'] * lo['vocab'] * 4 / MIB:.0f} MiB fp32, "
            f"{lo['tokens'] * lo['vocab'] * 2 / MIB:.0f} MiB bf16):",
            table(payload["loss"]),
            "",
        ]
    for name in ("load_avg_at_start", "load_avg_at_end"):
        lines.append(f"{name}: " + ", ".join(f"{v:.2f}" for v in payload[name]))
    return lines


def report_rows(payload: dict[str, Any]) -> list[common.Row]:
    """Rows (metric, value, target, verdict) for bench/run.py's combined table."""
    rows: list[common.Row] = []
    for part in ("step", "loss"):
        for name, c in payload.get(part, {}).items():
            if c["baseline"] == name:
                continue
            rows.append(
                (
                    f"{part} {name}: peak over before (x {c['baseline']})",
                    ratio_text(c["ratio"]["peak_over_baseline_bytes"]),
                    "",
                    "",
                )
            )
            rows.append(
                (
                    f"{part} {name}: time (x {c['baseline']})",
                    ratio_text(c["ratio"]["seconds"]),
                    "",
                    "",
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# Children: one configuration each, measured from a reset high-water mark


def start_peak() -> tuple[int, bool, common.CpuReading]:
    """RSS now, whether the high-water mark could be reset, and the CPU clocks."""
    import gc

    gc.collect()
    rss = common.status_bytes("VmRSS") or 0
    return rss, common.reset_peak_rss(), common.cpu_reading()


def peak_since(reset: bool) -> int:
    hwm = common.status_bytes("VmHWM")
    return hwm if reset and hwm is not None else common.peak_rss_bytes()


def child_step(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from raft_dist.adapters import build_training_model
    from raft_dist.config import load_recipe
    from raft_dist.evaluate import token_loss_sum
    from raft_dist.model import load_tokenizer

    overrides = [
        "data.train=unused",
        f"model.name_or_path={STEP_MODEL}",
        f"model.dtype={args.dtype}",
        "lora.enabled=false",
        f"training.gradient_checkpointing={'true' if args.checkpointing else 'false'}",
    ]
    recipe = load_recipe(None, overrides)
    torch.manual_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model)
    model = build_training_model(recipe, tokenizer)
    model.train()
    live_checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    if live_checkpointing != bool(args.checkpointing):
        raise RuntimeError(f"asked checkpointing={args.checkpointing}, got {live_checkpointing}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(BATCH_SEED)
    ids = torch.randint(0, len(tokenizer), (args.micro_batch, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    # AdamW's moments exist from the first step on: made here by a step on zero gradients
    # (lr 0), so that the one measured step holds weights, gradients, both moments and the
    # activations at once, as every step after the first does.
    for param in trainable:
        param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        group["lr"] = 1e-5

    baseline, reset, cpu_from = start_peak()
    began = time.perf_counter()
    loss, count = token_loss_sum(model, batch)
    (loss / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - began
    peak = peak_since(reset)
    return {
        "overrides": overrides,
        "gradient_checkpointing": live_checkpointing,
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "baseline_rss_bytes": baseline,
        "peak_reset": reset,
        "peak_bytes": peak,
        "peak_over_baseline_bytes": peak - baseline,
        "seconds": seconds,
        "other_load": common.other_load(cpu_from, common.cpu_reading()),
        "values": {"loss": float(loss.detach()) / float(count)},
    }


def loss_variant(variant: str) -> Any:
    """(logits, labels) -> summed fp32 loss, the way `variant` computes it."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from raft_dist.data.tokenize import IGNORE_INDEX
    from raft_dist.evaluate import chunked_token_loss, loss_chunk_tokens

    def piece_loss(piece: Any, target: Any) -> Any:
        return F.cross_entropy(piece.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")

    def chunks(logits: Any, labels: Any) -> list[tuple[Any, Any]]:
        # split(): one backward node per row that concatenates the chunk gradients once, not
        # a full-size zero tensor per chunk as slicing chunk by chunk would make.
        chunk, targets = loss_chunk_tokens(logits.size(-1)), labels[:, 1:]
        return [
            pair
            for row in range(logits.size(0))
            for pair in zip(logits[row, :-1].split(chunk), targets[row].split(chunk), strict=True)
        ]

    def unchunked(logits: Any, labels: Any) -> Any:  # token_loss_sum before chunking
        targets = labels[:, 1:]
        upcast = logits[:, :-1].float()
        return F.cross_entropy(
            upcast.reshape(-1, upcast.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def chunks_autograd(logits: Any, labels: Any) -> Any:
        return torch.stack([piece_loss(p, t) for p, t in chunks(logits, labels)]).sum()

    def chunks_checkpoint(logits: Any, labels: Any) -> Any:
        return torch.stack(
            [checkpoint(piece_loss, p, t, use_reentrant=False) for p, t in chunks(logits, labels)]
        ).sum()

    return {
        "unchunked": unchunked,
        "chunks_autograd": chunks_autograd,
        "chunks_checkpoint": chunks_checkpoint,
        "chunked_buffer": lambda logits, labels: chunked_token_loss(logits, labels),
        "chunked_inplace": lambda lg, labels: chunked_token_loss(lg, labels, overwrite=True),
    }[variant]


def child_loss(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from raft_dist.evaluate import loss_chunk_tokens
    from raft_dist.model import torch_dtype

    dtype = torch_dtype(args.dtype)
    generator = torch.Generator().manual_seed(BATCH_SEED)
    hidden = torch.randn(1, args.loss_tokens, LOSS_HIDDEN, generator=generator).to(dtype)
    weight = (torch.randn(args.loss_vocab, LOSS_HIDDEN, generator=generator) * 0.1).to(dtype)
    weight.requires_grad_()
    weight.grad = torch.zeros_like(weight)  # allocated before the baseline, as in training
    labels = torch.randint(0, args.loss_vocab, (1, args.loss_tokens), generator=generator)
    fn = loss_variant(args.variant)

    baseline, reset, cpu_from = start_peak()
    began = time.perf_counter()
    logits = hidden @ weight.t()  # the output head: logits are an intermediate, as in a model
    loss = fn(logits, labels)
    del logits
    loss.backward()
    seconds = time.perf_counter() - began
    peak = peak_since(reset)
    return {
        "variant": args.variant,
        "dtype": args.dtype,
        "chunk_tokens": loss_chunk_tokens(args.loss_vocab),
        "logits_bytes": args.loss_tokens * args.loss_vocab * dtype.itemsize,
        "baseline_rss_bytes": baseline,
        "peak_reset": reset,
        "peak_bytes": peak,
        "peak_over_baseline_bytes": peak - baseline,
        "seconds": seconds,
        "other_load": common.other_load(cpu_from, common.cpu_reading()),
        "values": {
            "loss": float(loss.detach()),
            "grad_norm": float(weight.grad.float().norm()),
        },
    }


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="runs per config")
    parser.add_argument("--only", nargs="*", choices=["step", "loss"], help="run only these parts")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="step: tokens a row")
    parser.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH, help="step: rows")
    parser.add_argument(
        "--dtypes", nargs="+", default=DEFAULT_DTYPES, choices=["float32", "bfloat16"]
    )
    parser.add_argument("--loss-vocab", type=int, default=LOSS_VOCAB)
    parser.add_argument("--loss-tokens", type=int, default=LOSS_TOKENS)
    parser.add_argument(
        "--loss-variants",
        nargs="+",
        choices=LOSS_VARIANTS,
        help="loss: these variants in fp32 and bf16 (default: all in fp32; the unchunked and "
        "the in-place chunked in bf16)",
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--child", choices=["step", "loss"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=LOSS_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.seq_len < 2 or args.micro_batch < 1 or args.loss_tokens < 2:
        parser.error("--repeats and --micro-batch must be at least 1, lengths at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child = child_step if args.child == "step" else child_loss
        common.write_json(args.result, child(args))
        return 0
    loss_configs = None
    if args.loss_variants:
        loss_configs = [(d, v) for d in ("float32", "bfloat16") for v in args.loss_variants]
    payload = measure(
        args.repeats,
        args.only,
        args.seq_len,
        args.micro_batch,
        args.dtypes,
        args.loss_vocab,
        args.loss_tokens,
        loss_configs,
        log=common.progress,
    )
    payload["command"] = common.command_line()
    print()
    print("\n".join(report_lines(payload)))
    print(f"total {payload['wall_s']:.0f} s")
    path = common.write_json(args.out / "memory.json", payload)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
