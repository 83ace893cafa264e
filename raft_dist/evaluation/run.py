"""`raft-dist eval`: several models on one or more eval sets, one comparison.

setup (eval sets, robustness variants, process group) -> per model: encode, split over ranks,
generate, gather -> score on the main process -> report. Under `accelerate launch` /
`raft-dist launch` every rank answers a disjoint part of each set; the parts are gathered and
every question is scored exactly once (a test checks the ids).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raft_dist.errors import ConfigError
from raft_dist.evaluation.generation import GenerationSettings, generate_all
from raft_dist.evaluation.items import (
    MAIN,
    ROBUSTNESS_COUNTS,
    EvalItem,
    load_eval_set,
    robustness_items,
)
from raft_dist.evaluation.metrics import aggregate, score_example
from raft_dist.evaluation.models import (
    ModelCache,
    ModelSpec,
    context_length,
    pick_dtype,
)
from raft_dist.model import pick_device

# Generation budget when --max-new-tokens is not given: the longest gold completion with room to
# spare (a model that rambles is cut there, which costs it nothing it could have scored).
AUTO_BUDGET_FACTOR, AUTO_BUDGET_EXTRA, AUTO_BUDGET_MAX = 1.25, 16, 512


@dataclass
class EvalOptions:
    models: list[ModelSpec]
    data: list[tuple[str, str]]  # (name, spec)
    out: Path
    max_new_tokens: int | None = None
    batch_size: int = 8
    limit: int | None = None
    robustness_counts: tuple[int, ...] = ROBUSTNESS_COUNTS
    robustness_limit: int | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True


@dataclass
class EvalSet:
    name: str
    spec: str
    items: list[EvalItem]
    short_of_distractors: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch (one process when started plainly)."""

    index: int = 0
    world: int = 1
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0


def setup_ranks() -> Ranks:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ConfigError(
            "eval under ZeRO-3 is refused: evaluation loads the whole model on every rank and "
            "answers a disjoint part per rank, while ZeRO-3 would need every rank to make the "
            "same generate calls; launch eval with a DDP profile (cpu, single_gpu, multi_gpu)"
        )
    from accelerate import PartialState

    from raft_dist.cpu import on_cpu

    # On CPU the process group must be gloo: without it Accelerate quietly runs every rank
    # as a world of one, and each rank would evaluate (and report) the whole set alone.
    state = PartialState(backend="gloo") if on_cpu() else PartialState()
    launched = int(os.environ["WORLD_SIZE"])
    if state.num_processes != launched:
        raise ConfigError(
            f"the launch started {launched} processes but the process group has "
            f"{state.num_processes}; refusing to evaluate with ranks that do not see each other"
        )
    return Ranks(index=state.process_index, world=state.num_processes, state=state)


def load_sets(options: EvalOptions) -> list[EvalSet]:
    sets = []
    for name, spec in options.data:
        items = load_eval_set(spec, options.limit)
        if not items:
            raise ConfigError(f"--data {spec}: no record to evaluate")
        variants, short = ([], {})
        if options.robustness_counts:
            variants, short = robustness_items(
                items,
                options.robustness_counts,
                seed=options.seed,
                limit=options.robustness_limit,
            )
        sets.append(EvalSet(name, spec, items + variants, short))
    return sets


def generation_budget(tokenizer: Any, sets: Sequence[EvalSet], requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {requested}")
        return requested
    longest = max(
        len(tokenizer(item.completion, add_special_tokens=False)["input_ids"])
        for s in sets
        for item in s.items
        if item.variant == MAIN
    )
    return min(AUTO_BUDGET_MAX, math.ceil(longest * AUTO_BUDGET_FACTOR) + AUTO_BUDGET_EXTRA)


def _answer_part(
    model: Any,
    tokenizer: Any,
    rows: list[list[int]],
    keys: list[tuple[int, int]],
    settings: GenerationSettings,
    ranks: Ranks,
    label: str,
    progress: bool,
) -> dict[tuple[int, int], tuple[str, int]]:
    """This rank's share (every world-th prompt in length order, so shares cost alike), then
    everyone's answers gathered on every rank."""
    from tqdm import tqdm

    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    mine = order[ranks.index :: ranks.world]
    desc = label if ranks.world == 1 else f"{label} (rank 0 of {ranks.world})"
    with tqdm(
        total=len(mine), desc=desc, unit="q", disable=not (progress and ranks.is_main)
    ) as bar:
        outputs = generate_all(
            model, tokenizer, [rows[i] for i in mine], settings, on_batch=bar.update
        )
    local = [(keys[i], text, ranks.index) for i, text in zip(mine, outputs, strict=True)]
    if ranks.world > 1:
        from raft_dist.distributed import gather_lists

        local = gather_lists(local)
        if len(local) != len(rows):  # every prompt answered exactly once, by some rank
            raise RuntimeError(f"gathered {len(local)} answers for {len(rows)} prompts")
    answers: dict[tuple[int, int], tuple[str, int]] = {}
    for key, text, rank in local:
        if key in answers:
            raise RuntimeError(f"eval item {key} was answered twice")  # a sharding bug
        answers[key] = (text, rank)
    return answers


def evaluate_model(
    spec: ModelSpec,
    cache: ModelCache,
    sets: list[EvalSet],
    options: EvalOptions,
    ranks: Ranks,
) -> dict[str, Any]:
    started = time.perf_counter()
    with cache.use(spec) as (model, tokenizer):
        from raft_dist.data.tokenize import encode_prompt

        budget = generation_budget(tokenizer, sets, options.max_new_tokens)
        settings = GenerationSettings(max_new_tokens=budget, batch_size=options.batch_size)
        limit = context_length(model)
        rows, keys, skipped = [], [], {s.name: 0 for s in sets}
        for s_index, eval_set in enumerate(sets):
            for i_index, item in enumerate(eval_set.items):
                ids = encode_prompt(tokenizer, item.prompt)
                if limit is not None and len(ids) + budget > limit:
                    # Never truncate: the question comes last and would be cut off.
                    skipped[eval_set.name] += 1
                    continue
                rows.append(ids)
                keys.append((s_index, i_index))
        answers = _answer_part(
            model, tokenizer, rows, keys, settings, ranks, spec.text, options.progress
        )
    seconds = time.perf_counter() - started
    return {
        "answers": answers,
        "skipped_too_long": skipped,
        "generation": settings.as_dict(),
        "context_length": limit,
        "seconds": seconds,
        "prompts": len(rows),
    }


def score_set(eval_set: EvalSet, s_index: int, answers: dict) -> tuple[dict, list[dict]]:
    """Metrics of one model on one set: main questions (all, oracle present, oracle absent)
    and the robustness curve; plus the per-example rows for predictions.jsonl."""
    groups: dict[str, list] = {"all": [], "oracle_present": [], "oracle_absent": []}
    curve: dict[str, list] = {}
    rows = []
    for i_index, item in enumerate(eval_set.items):
        answered = answers.get((s_index, i_index))
        if answered is None:
            continue  # skipped as too long for the model's context
        output, rank = answered
        score = score_example(
            output,
            item.gold,
            documents=[d.text for d in item.documents],
            oracle=item.oracle,
            answer_only=item.answer_only,
        )
        if item.variant == MAIN:
            groups["all"].append(score)
            if item.has_documents:
                key = "oracle_present" if item.oracle_index is not None else "oracle_absent"
                groups[key].append(score)
        else:
            curve.setdefault(item.variant, []).append(score)
        rows.append(
            {
                "set": eval_set.name,
                "id": item.id,
                "variant": item.variant,
                "where": item.where,
                "question": item.question,
                "gold": item.gold,
                "oracle_present": item.oracle_index is not None if item.has_documents else None,
                "output": output,
                "rank": rank,
                **score.as_dict(),
            }
        )
    metrics = {name: aggregate(scores) for name, scores in groups.items()}
    metrics["robustness"] = {
        variant.removeprefix("k="): aggregate(scores)
        for variant, scores in sorted(curve.items(), key=lambda kv: int(kv[0][2:]))
    }
    return metrics, rows


def run_eval(options: EvalOptions) -> dict[str, Any] | None:
    """Returns the report on the main process (None on the others)."""
    if not options.models:
        raise ConfigError("give at least one --model")
    ranks = setup_ranks()
    try:
        return _evaluate_all(options, ranks)
    finally:
        if ranks.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _evaluate_all(options: EvalOptions, ranks: Ranks) -> dict[str, Any] | None:
    from raft_dist.evaluation.report import write_report

    sets = load_sets(options)
    device = str(ranks.state.device) if ranks.state is not None else pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    cache = ModelCache(device, dtype)
    results, predictions = [], []
    for spec in options.models:
        run = evaluate_model(spec, cache, sets, options, ranks)
        per_set = {}
        for s_index, eval_set in enumerate(sets):
            metrics, rows = score_set(eval_set, s_index, run["answers"])
            metrics["skipped_too_long"] = run["skipped_too_long"][eval_set.name]
            per_set[eval_set.name] = metrics
            predictions.extend({"model": spec.text, **row} for row in rows)
        results.append(
            {
                "model": spec.text,
                "base": spec.base,
                "adapter": spec.adapter,
                "generation": run["generation"],
                "context_length": run["context_length"],
                "seconds": round(run["seconds"], 2),
                "prompts": run["prompts"],
                "sets": per_set,
            }
        )
    if not ranks.is_main:
        return None
    report = {
        "sets": [
            {
                "name": s.name,
                "data": s.spec,
                "questions": sum(1 for i in s.items if i.variant == MAIN),
                "robustness_questions": len({i.id for i in s.items if i.variant != MAIN}),
                "short_of_distractors": s.short_of_distractors,
            }
            for s in sets
        ],
        "settings": {
            "device": device,
            "dtype": dtype,
            "processes": ranks.world,
            "seed": options.seed,
            "robustness_counts": list(options.robustness_counts),
            "robustness_limit": options.robustness_limit,
            "limit": options.limit,
        },
        "models": results,
    }
    write_report(report, predictions, options.out)
    return report
