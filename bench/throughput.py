"""Training throughput of the raft-dist loop against a bare PyTorch loop and the HF Trainer.

All of them train the same model (same seed, so the same initial weights) on the same batches
in the same order, in one process, one after the other in alternating pairs (a, b, c, d, a, b,
...), so that drift of the machine (thermal, other load) hits every loop alike. The Trainer runs
twice: with raft-dist's loss (`hf_trainer`: only the loops differ) and as it ships
(`hf_trainer_stock`: the model's own loss from `labels`, which takes the logits of every
position, where raft-dist's skips the prompt's; see prompt_logits_bench.py).

Throughput is non-pad *input* tokens per second (the attention-mask sum of each batch), counted
from the same batch list for all loops. The time window is the steady state: from the end
of optimizer step WARMUP_STEPS to the end of the last step, wall clock, so everything a loop does
between two steps (fetching and tokenizing data, logging, callbacks) is inside it.

    python bench/throughput.py [--pairs 7] [--steps 40] [--quiet-wait 120] [--out bench/results]
    python bench/throughput.py --model smollm2            # 3 pairs of 8 steps, micro batch 2
    python bench/throughput.py --token-cache cold         # raft-dist tokenizes its first epoch

`--model tiny` (the default) is the random 2-layer Llama, where the loop's own overhead shows
most; `--model smollm2` is the embedded SmolLM2-135M-Instruct at RAFT lengths (the demo's
examples, ~430-580 tokens with its tokenizer), where users live. A step of SmolLM2 costs about
100 times one of the tiny model here, so it runs fewer, shorter pairs by default.

The bare loop and the Trainer get their batches tokenized before the clock starts (as a
`datasets.map` cache gives a Trainer user). raft-dist gets the same by default: building those
batches goes through its token cache (data/token_cache.py, in a folder of this run), so its
runs read the ids from disk. `--token-cache cold` gives each raft-dist run an empty cache: it
then tokenizes its first epoch inside the window, as a first run on new data does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common

WARMUP_STEPS = 2
MAX_SEQ_LEN = 1024


@dataclass(frozen=True)
class BenchModel:
    """The model a throughput run trains, and the run sizes that fit it on 2 cores."""

    name_or_path: str
    micro_batch_size: int
    steps: int
    pairs: int


MODELS: dict[str, BenchModel] = {
    "tiny": BenchModel("builtin:tiny-llama", micro_batch_size=4, steps=40, pairs=7),
    "smollm2": BenchModel("builtin:smollm2", micro_batch_size=2, steps=8, pairs=3),
}
DEFAULT_MODEL = "tiny"
DEFAULT_STEPS = MODELS[DEFAULT_MODEL].steps
DEFAULT_PAIRS = MODELS[DEFAULT_MODEL].pairs
DEFAULT_QUIET_WAIT_S = 120.0
CACHE_MODES = ("warm", "cold")
# hf_trainer gets raft-dist's loss (token_loss_sum), so against it only the loop's own cost
# shows; hf_trainer_stock is the Trainer as it ships, labels handed to the model, whose loss
# takes the logits of every position: what a Trainer user runs.
LOOPS = ("raft_dist", "bare_torch", "hf_trainer", "hf_trainer_stock")
# Ratio name -> (numerator loop, denominator loop, target the median must reach).
TARGETS: dict[str, tuple[str, str, float]] = {
    "raft_dist/bare_torch": ("raft_dist", "bare_torch", 0.97),
    "raft_dist/hf_trainer": ("raft_dist", "hf_trainer", 1.05),
    "raft_dist/hf_trainer_stock": ("raft_dist", "hf_trainer_stock", 1.05),
}


@dataclass
class LoopRun:
    """One timed training run of one loop."""

    loop: str
    tokens_per_s: float  # steady-state wall clock, the figure the ratios use
    window_s: float
    window_tokens: int
    # Sum of the per-step bodies only (what each loop calls one step; see the README).
    step_body_tokens_per_s: float
    losses: list[float] = field(default_factory=list)
    threads_after: int = 0  # torch threads when the run ended: a library changing it shows here
    # CPU time other processes used during the run, as a share of all cores' time (0 = alone).
    foreign_cpu_share: float = 0.0
    token_cache_hits: int = 0  # raft-dist: examples whose ids it read from its token cache


# ---- shared inputs -------------------------------------------------------------------------


def bench_overrides(steps: int, out_dir: Path, model: str = DEFAULT_MODEL) -> list[str]:
    """The tiny recipe reduced to pure training: no eval, no checkpoints, no trackers.

    The schedule is made constant so that all loops run the very same optimisation (the
    Trainer and the bare loop then need no scheduler of their own to match the losses).
    """
    return [
        f"model.name_or_path={MODELS[model].name_or_path}",
        f"data.train={common.DEMO_TRAIN}",
        f"training.max_steps={steps}",
        "training.gradient_accumulation_steps=1",
        f"training.micro_batch_size={MODELS[model].micro_batch_size}",
        "training.eval_every=0",
        "training.save_every=0",
        "training.warmup_steps=0",
        "training.lr_schedule=constant",
        "training.log_every=1",
        f"data.max_seq_len={MAX_SEQ_LEN}",
        "model.dtype=float32",
        "training.mixed_precision='no'",  # quoted: YAML reads a bare no as false
        "output.save_final_model=false",
        "logging.tensorboard=false",
        "logging.wandb=false",
        "logging.progress_bar=false",
        "logging.level=warning",
        f"output.dir={out_dir}",
    ]


def load_bench_recipe(steps: int, out_dir: Path, model: str = DEFAULT_MODEL) -> Any:
    from raft_dist.config import load_recipe

    return load_recipe(common.TINY_RECIPE, bench_overrides(steps, out_dir, model))


def materialize_batches(recipe: Any, steps: int) -> list[dict[str, Any]]:
    """The batches the raft-dist loop will draw, from the streams the loop itself builds."""
    from raft_dist.data.check import check_data
    from raft_dist.data.streaming import build_streams
    from raft_dist.model import load_tokenizer

    stream, held_out = build_streams(
        recipe,
        load_tokenizer(recipe.model),
        check_data(recipe.data),
        rank=0,
        world_size=1,
        seen_ids=None,
    )
    if held_out is not None:
        raise RuntimeError(f"{recipe.data.train} has an eval split: the loop would evaluate")
    batches: list[dict[str, Any]] = []
    while len(batches) < steps:
        batch = stream.next_batch()
        if batch is None:  # the loop starts the next (reshuffled) epoch when max_steps is set
            stream.start_epoch(stream.state.epoch + 1)
            continue
        batches.append(batch)
    stream.save_token_cache()  # what the raft-dist runs read when the cache is warm
    return batches


def input_tokens(batch: dict[str, Any]) -> int:
    """Non-pad input tokens: the count all loops are credited with."""
    return int(batch["attention_mask"].sum())


def steady_state(
    loop: str, ends: list[float], bodies: list[float], tokens: list[int], losses: list[float]
) -> LoopRun:
    """Throughput from the end of step WARMUP_STEPS to the end of the last step."""
    import torch

    window_s = ends[-1] - ends[WARMUP_STEPS - 1]
    window_tokens = sum(tokens[WARMUP_STEPS:])
    return LoopRun(
        loop=loop,
        tokens_per_s=window_tokens / window_s,
        window_s=window_s,
        window_tokens=window_tokens,
        step_body_tokens_per_s=window_tokens / sum(bodies[WARMUP_STEPS:]),
        losses=losses,
        threads_after=torch.get_num_threads(),
    )


@contextlib.contextmanager
def token_cache_folder(folder: Path) -> Iterator[None]:
    """raft-dist's token cache (data/token_cache.py) in `folder` while the block runs."""
    from raft_dist.data.token_cache import ROOT_VARIABLE

    before = os.environ.get(ROOT_VARIABLE)
    os.environ[ROOT_VARIABLE] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ROOT_VARIABLE, None)
        else:
            os.environ[ROOT_VARIABLE] = before


def fresh_process_state(threads: int) -> None:
    """Each run starts from the same global state: no Accelerate singleton and no garbage left
    over from the previous loop (a cyclic collection of a Trainer's objects would otherwise land
    inside the next loop's timed window), and the thread count the environment asked for."""
    import gc

    import torch
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()
    torch.set_num_threads(threads)


def seeded_model(recipe: Any) -> tuple[Any, Any]:
    """Tokenizer and model exactly as train() makes them: seed first, then tokenizer, model."""
    from accelerate.utils import set_seed

    from raft_dist.model import load_model, load_tokenizer

    set_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model)
    return tokenizer, load_model(recipe.model, tokenizer)


# ---- a. the raft-dist loop -----------------------------------------------------------------


def run_raft_dist(
    steps: int, tokens: list[int], work_dir: Path, model: str, cache: str = "warm"
) -> LoopRun:
    """train() in this process; the timing comes from its own metrics.jsonl.

    elapsed_s is taken when a step is logged, after the step's gathers, so elapsed_s[N] -
    elapsed_s[WARMUP_STEPS] is the same window as in the other loops (to the millisecond it is
    rounded to). The step body is recovered per step as input tokens / tokens_per_s: the loop
    times each step from fetching (and tokenizing) its batch to the end of its gathers.
    """
    from raft_dist.train.loop import train

    out_dir = Path(tempfile.mkdtemp(prefix="raft-", dir=work_dir))
    recipe = load_bench_recipe(steps, out_dir, model)
    # warm: the folder run_pairs filled while building the batches; cold: an empty one
    folder = token_cache_folder(out_dir / "token-cache") if cache == "cold" else None
    with folder or contextlib.nullcontext(), contextlib.redirect_stdout(io.StringIO()):
        train(recipe)  # (stdout: the run card and summary)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        raise RuntimeError(f"metrics.jsonl of {out_dir} does not hold one row per step")
    ends = [float(r["elapsed_s"]) for r in rows]
    bodies = [n / float(r["tokens_per_s"]) for n, r in zip(tokens, rows, strict=True)]
    run = steady_state("raft_dist", ends, bodies, tokens, [float(r["loss"]) for r in rows])
    summary = json.loads((out_dir / "summary.json").read_text())
    run.token_cache_hits = summary["token_cache_hits"]
    return run


# ---- b. a bare PyTorch loop ----------------------------------------------------------------


def run_bare_torch(recipe: Any, batches: list[dict[str, Any]], tokens: list[int]) -> LoopRun:
    """The least a training step can do: forward, token-summed loss, backward, clip, step."""
    import torch

    from raft_dist.evaluate import token_loss_sum

    _, model = seeded_model(recipe)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.training.lr, weight_decay=recipe.training.weight_decay
    )
    ends, bodies, losses = [], [], []
    for batch in batches:
        begin = time.perf_counter()
        loss_sum, count = token_loss_sum(model, batch)
        loss = loss_sum / float(count)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        ends.append(end)
        bodies.append(end - begin)
        losses.append(loss.detach())
    return steady_state("bare_torch", ends, bodies, tokens, [float(v) for v in losses])


# ---- c. the Hugging Face Trainer -----------------------------------------------------------


def unpadded_rows(batches: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """Pre-tokenized examples in batch order, so the Trainer's collator re-pads them to the same
    tensors (a sequential sampler and the same batch size give back the same batches)."""
    rows = []
    for batch in batches:
        for ids, labels, mask in zip(
            batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
        ):
            n = int(mask.sum())
            rows.append((ids[:n].tolist(), labels[:n].tolist()))
    return rows


def run_hf_trainer(
    recipe: Any,
    batches: list[dict[str, Any]],
    tokens: list[int],
    work_dir: Path,
    stock: bool = False,
) -> LoopRun:
    """transformers.Trainer with the same optimizer, clipping and batches; logging, evaluation
    and saving off. A callback stamps on_step_begin / on_step_end.

    stock=False: the Trainer computes raft-dist's loss (token_loss_sum), so the two differ in
    their loops only. stock=True: the Trainer's own compute_loss, i.e. the model's loss from
    `labels`; the same value (the mean over the batch's target tokens), but from the logits of
    every position, prompt included.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from raft_dist.data.batching import collate
    from raft_dist.data.streaming import pad_token_id
    from raft_dist.evaluate import token_loss_sum

    t = recipe.training
    if any(len(b["input_ids"]) != t.micro_batch_size for b in batches):
        raise RuntimeError("a short batch would shift the Trainer's batches; change --steps")
    tokenizer, model = seeded_model(recipe)
    rows = unpadded_rows(batches)
    pad_id = pad_token_id(tokenizer)
    losses: list[Any] = []

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
            return rows[index]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begins.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    class TokenSumTrainer(Trainer):
        # raft-dist's loss is already divided by the batch's target tokens; stock: as shipped
        loss_is_scaled_for_ga = None if stock else True

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if stock:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            else:
                loss_sum, count = token_loss_sum(model, inputs)
                loss = loss_sum / float(count)
            losses.append(loss.detach())
            return loss

    args = TrainingArguments(
        output_dir=str(Path(tempfile.mkdtemp(prefix="hf-", dir=work_dir))),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=1,
        max_steps=len(batches),
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",  # torch.optim.AdamW, as the other two loops use
        seed=t.seed,
        train_sampling_strategy="sequential",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=True,
    )
    clock = StepClock()
    trainer = TokenSumTrainer(
        model=model,
        args=args,
        train_dataset=Rows(),
        data_collator=lambda features: collate(list(features), pad_id=pad_id),
        callbacks=[clock],
    )
    trainer.train()
    bodies = [end - begin for begin, end in zip(clock.begins, clock.ends, strict=True)]
    name = "hf_trainer_stock" if stock else "hf_trainer"
    return steady_state(name, clock.ends, bodies, tokens, [float(v) for v in losses])


# ---- pairs and report ----------------------------------------------------------------------


def run_loop(
    loop: str,
    recipe: Any,
    batches: list[dict[str, Any]],
    tokens: list[int],
    work_dir: Path,
    threads: int,
    model: str = DEFAULT_MODEL,
    cache: str = "warm",
) -> LoopRun:
    """One timed run of one loop over `batches`, from a reset global state."""
    fresh_process_state(threads)
    before = common.cpu_reading()
    if loop == "raft_dist":
        run = run_raft_dist(len(batches), tokens, work_dir, model, cache)
    elif loop == "bare_torch":
        run = run_bare_torch(recipe, batches, tokens)
    else:
        run = run_hf_trainer(recipe, batches, tokens, work_dir, stock=loop == "hf_trainer_stock")
    run.foreign_cpu_share = common.other_load(before, common.cpu_reading())
    return run


def run_pairs(
    pairs: int,
    steps: int,
    quiet_wait_s: float = 0.0,
    log: common.Log = print,
    model: str = DEFAULT_MODEL,
    cache: str = "warm",
) -> dict[str, Any]:
    """Alternate the loops `pairs` times on one batch list; return every run and the medians.

    One short untimed run of each loop comes first, so that the first timed run does not pay
    for what a process does once (lazy imports, first kernel calls, allocator growth).
    Shared machines: up to quiet_wait_s seconds in all go to waiting for other load to end
    before a pair and to measuring again a pair that other load hit (kept in the result as
    discarded); once that budget is spent, loaded pairs are kept and flagged.
    """
    if steps <= WARMUP_STEPS + 1:
        raise ValueError(f"--steps must be above {WARMUP_STEPS + 1} to leave a timed window")
    import torch

    threads = torch.get_num_threads()  # what the environment gave this process
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="raft-bench-") as tmp,
        token_cache_folder(Path(tmp) / "token-cache"),  # never the user's cache
    ):
        work_dir = Path(tmp)
        recipe = load_bench_recipe(steps, work_dir / "unused", model)
        batches = materialize_batches(recipe, steps)
        tokens = [input_tokens(b) for b in batches]
        short = WARMUP_STEPS + 2
        for loop in LOOPS:
            run_loop(loop, recipe, batches[:short], tokens[:short], work_dir, threads, model, cache)
        runs: list[dict[str, LoopRun]] = []
        discarded: list[dict[str, LoopRun]] = []
        spent = 0.0  # of the quiet budget: waiting, and pairs measured again
        while len(runs) < pairs:
            if spent < quiet_wait_s:
                spent += common.wait_for_quiet(quiet_wait_s - spent, log, pause_s=4.0)
            pair_started = time.perf_counter()
            result = {
                loop: run_loop(loop, recipe, batches, tokens, work_dir, threads, model, cache)
                for loop in LOOPS
            }
            if pair_load(result) > common.QUIET_SHARE and spent < quiet_wait_s:
                spent += time.perf_counter() - pair_started
                discarded.append(result)
                log(pair_line(len(runs), result) + " -> measured again")
                continue
            runs.append(result)
            log(pair_line(len(runs) - 1, result))
    summary = summarize(runs, steps, tokens, threads, time.perf_counter() - started, model)
    summary["settings"]["token_cache"] = cache
    summary["discarded_pairs"] = [{loop: asdict(r[loop]) for loop in LOOPS} for r in discarded]
    summary["quiet_budget_spent_s"] = spent
    return summary


def ratios(result: dict[str, LoopRun]) -> dict[str, float]:
    return {
        name: result[num].tokens_per_s / result[den].tokens_per_s
        for name, (num, den, _) in TARGETS.items()
    }


def pair_line(pair: int, result: dict[str, LoopRun]) -> str:
    speeds = "  ".join(f"{loop} {result[loop].tokens_per_s:8.0f}" for loop in LOOPS)
    rel = "  ".join(f"{name} {value:.3f}" for name, value in ratios(result).items())
    return f"pair {pair + 1}: tok/s {speeds} | {rel} | other load {pair_load(result):.0%}"


def pair_load(result: dict[str, LoopRun]) -> float:
    """The highest share of CPU other processes took during any run of the pair: a pair is
    quiet when this is at most QUIET_SHARE."""
    return max(run.foreign_cpu_share for run in result.values())


def max_loss_gap(runs: list[dict[str, LoopRun]]) -> dict[str, float]:
    """Largest per-step loss difference to the bare loop: proof the loops did the same work."""
    gaps = {}
    for loop in LOOPS:
        if loop == "bare_torch":
            continue
        gaps[loop] = max(
            abs(a - b)
            for r in runs
            for a, b in zip(r[loop].losses, r["bare_torch"].losses, strict=True)
        )
    return gaps


def summarize(
    runs: list[dict[str, LoopRun]],
    steps: int,
    tokens: list[int],
    threads: int,
    wall_s: float,
    model: str = DEFAULT_MODEL,
) -> dict[str, Any]:
    per_pair = [ratios(r) for r in runs]
    medians = {name: common.median(p[name] for p in per_pair) for name in TARGETS}
    quiet = [i for i, r in enumerate(runs) if pair_load(r) <= common.QUIET_SHARE]
    return {
        "unit": "non-pad input tokens per second (attention-mask sum), steady state",
        "settings": {
            "model": MODELS[model].name_or_path,
            "pairs": len(runs),
            "steps": steps,
            "warmup_steps_excluded": WARMUP_STEPS,
            "micro_batch_size": MODELS[model].micro_batch_size,
            "gradient_accumulation_steps": 1,
            "max_seq_len": MAX_SEQ_LEN,
            "dtype": "float32",
            **common.thread_settings(threads),
            "tokens_per_step": tokens,
        },
        "runs": [{loop: asdict(r[loop]) for loop in LOOPS} for r in runs],
        "ratios_per_pair": per_pair,
        "median_ratio": medians,
        "median_tokens_per_s": {
            loop: common.median(r[loop].tokens_per_s for r in runs) for loop in LOOPS
        },
        "median_step_body_tokens_per_s": {
            loop: common.median(r[loop].step_body_tokens_per_s for r in runs) for loop in LOOPS
        },
        "max_loss_gap_to_bare": max_loss_gap(runs),
        "other_load_per_pair": [pair_load(r) for r in runs],
        "quiet_pairs": [i + 1 for i in quiet],
        "median_ratio_quiet_pairs": {
            name: common.median(per_pair[i][name] for i in quiet) if quiet else None
            for name in TARGETS
        },
        "targets": {
            name: {
                "target": target,
                "median": medians[name],
                "range": [min(p[name] for p in per_pair), max(p[name] for p in per_pair)],
                "verdict": common.verdict(medians[name] >= target),
            }
            for name, (_, _, target) in TARGETS.items()
        },
        "wall_s": wall_s,
    }


def report_lines(summary: dict[str, Any]) -> list[str]:
    """The human-readable part: medians, both ratios and their verdicts."""
    settings = summary["settings"]
    lines = [
        f"throughput of {settings['model']} ({summary['unit']}), "
        f"median of {settings['pairs']} pairs:"
    ]
    for loop in LOOPS:
        lines.append(
            f"  {loop:<16} {summary['median_tokens_per_s'][loop]:9.0f} tok/s"
            f"   (step body only {summary['median_step_body_tokens_per_s'][loop]:9.0f})"
        )
    for name, verdict in summary["targets"].items():
        lines.append(
            f"  {name:<26} median {verdict['median']:.3f}"
            f" (pairs {verdict['range'][0]:.2f}-{verdict['range'][1]:.2f})"
            f"  target >= {verdict['target']:.2f}  {verdict['verdict']}"
        )
    quiet, pairs = summary["quiet_pairs"], summary["settings"]["pairs"]
    if len(quiet) < pairs:
        lines.append(
            f"  warning: other processes took over {common.QUIET_SHARE:.0%} of the CPU during "
            f"{pairs - len(quiet)} of {pairs} pairs; these figures are not reliable"
        )
        if quiet:
            lines.append(
                f"  median over the {len(quiet)} quiet pair(s) {quiet}: "
                + ", ".join(
                    f"{name} {value:.3f}"
                    for name, value in summary["median_ratio_quiet_pairs"].items()
                )
            )
    hits = sorted({r["raft_dist"]["token_cache_hits"] for r in summary["runs"]})
    lines.append(
        f"  raft-dist token cache: {summary['settings']['token_cache']}, ids of "
        f"{'/'.join(map(str, hits))} examples per run read from it"
    )
    gaps = summary["max_loss_gap_to_bare"]
    lines.append(
        "  same work check: max |loss - bare loss| "
        + ", ".join(f"{loop} {gap:.2e}" for loop, gap in gaps.items())
    )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, help="default: 7 (tiny), 3 (smollm2)")
    parser.add_argument("--steps", type=int, help="default: 40 (tiny), 8 (smollm2)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=DEFAULT_QUIET_WAIT_S,
        metavar="S",
        help="seconds in all to wait for other processes to leave the CPU",
    )
    parser.add_argument(
        "--token-cache",
        choices=CACHE_MODES,
        default="warm",
        help="warm: raft-dist reads the ids the batch building tokenized, as the other loops "
        "get them; cold: every raft-dist run tokenizes its first epoch (a first run)",
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = MODELS[args.model]
    summary = run_pairs(
        args.pairs or model.pairs,
        args.steps or model.steps,
        args.quiet_wait,
        model=args.model,
        cache=args.token_cache,
    )
    print("\n".join(report_lines(summary)))
    name = "throughput.json" if args.model == DEFAULT_MODEL else f"throughput_{args.model}.json"
    if args.token_cache != "warm":
        name = name.replace(".json", f"_{args.token_cache}_cache.json")
    path = common.write_json(args.out / name, summary)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
