"""Length grouping (data.group_by_length): windows of examples sorted by length and cut into
micro batches. Every record still trains exactly once per epoch, in as many batches as without
grouping but with less padding; the order is seeded; a position saved mid-window resumes with
exactly the batches an uninterrupted stream gives, through the prefetch thread too; and the
combinations that make no sense are refused naming both keys."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import raft_record, sentence

from raft_dist.config import load_recipe
from raft_dist.data.prefetch import Prefetcher
from raft_dist.data.sources import load_shards
from raft_dist.data.streaming import RankStream, StreamSettings
from raft_dist.errors import ConfigError
from raft_dist.model import TINY_TOKENIZER
from raft_dist.train.resume import changed_keys

MICRO_BATCH = 2
WINDOW = 3  # micro batches per window: 6 examples


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def write_mixed(root: Path, shard_sizes: list[int], seed: int = 0) -> list[str]:
    """RAFT shards whose examples range from a few dozen to several hundred tokens (the
    shared helper's records are all of similar length)."""
    rng = random.Random(seed)
    ids, index = [], 0
    folder = root / "train"
    folder.mkdir(parents=True)
    for shard, size in enumerate(shard_sizes):
        with (folder / f"shard-{shard:05d}.jsonl").open("w", encoding="utf-8") as handle:
            for _ in range(size):
                record = raft_record(rng, index)
                distractor = (record["oracle_index"] + 1) % len(record["documents"])
                words = int(math.exp(rng.uniform(0, math.log(400))))  # log-uniform, 1-400
                record["documents"][distractor]["text"] = sentence(rng, words, words)
                ids.append(record["id"])
                index += 1
                handle.write(json.dumps(record) + "\n")
    return ids


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    root = tmp_path_factory.mktemp("mixed")
    write_mixed(root, [8, 7, 8])  # 23 records: ranks of 11 and 12, a short last window
    return load_shards(str(root / "train"))


def settings(group: int = WINDOW, seed: int = 3, **extra: Any) -> StreamSettings:
    base: dict[str, Any] = {"shuffle_shards": True, **extra}
    return StreamSettings(
        max_seq_len=1024, micro_batch_size=MICRO_BATCH, seed=seed, group_by_length=group, **base
    )


def make(shards: list[Any], tokenizer: Any, s: StreamSettings, rank: int = 0, world: int = 1):
    return RankStream(shards, tokenizer, s, rank=rank, world_size=world, seen_ids=[])


def epoch_batches(stream: RankStream) -> list[dict[str, torch.Tensor]]:
    out = []
    while (batch := stream.next_batch()) is not None:
        out.append(batch)
    return out


def examples(batches: list[dict[str, torch.Tensor]]) -> Counter:
    """Every row as (input ids, labels) without its padding."""
    rows: Counter = Counter()
    for batch in batches:
        for ids, labels, mask in zip(
            batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
        ):
            n = int(mask.sum())
            rows[(tuple(ids[:n].tolist()), tuple(labels[:n].tolist()))] += 1
    return rows


def padding_share(batches: list[dict[str, torch.Tensor]]) -> float:
    cells = sum(b["attention_mask"].numel() for b in batches)
    return 1 - sum(int(b["attention_mask"].sum()) for b in batches) / cells


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_every_record_once_per_epoch_in_as_many_batches(
    shards: list[Any], tokenizer: Any, rank: int, world: int
) -> None:
    plain = make(shards, tokenizer, settings(group=0), rank, world)
    grouped = make(shards, tokenizer, settings(), rank, world)
    for epoch in range(2):  # the shard order changes between epochs
        expected, got = epoch_batches(plain), epoch_batches(grouped)
        assert examples(got) == examples(expected)
        assert max(examples(got).values()) == 1  # no record twice
        assert len(got) == len(expected)  # max_steps=null estimates stay right
        assert grouped.seen_ids == plain.seen_ids  # the audit reads records in stream order
        plain.start_epoch(epoch + 1)
        grouped.start_epoch(epoch + 1)


def test_batches_are_length_homogeneous(shards: list[Any], tokenizer: Any) -> None:
    plain = epoch_batches(make(shards, tokenizer, settings(group=0)))
    grouped = epoch_batches(make(shards, tokenizer, settings()))
    lengths = [b["attention_mask"].sum(1).tolist() for b in grouped]
    windows = [lengths[i : i + WINDOW] for i in range(0, len(lengths), WINDOW)]
    for window in windows:
        # Cut from one sorted list: the length ranges of a window's batches do not overlap.
        spans = sorted((min(b), max(b)) for b in window)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), window
    # Long batches are not all at the end of a window: the batch order is shuffled, and
    # differently in each window (the window's index is part of its seed).
    # (Seed 3 happens to give all three full windows the same order; seed 5 does not.)
    other = [
        b["attention_mask"].sum(1).tolist()
        for b in epoch_batches(make(shards, tokenizer, settings(seed=5)))
    ]
    full = [other[i : i + WINDOW] for i in range(0, 3 * WINDOW, WINDOW)]  # 3 x 6 of 23
    assert len({tuple(sorted(range(WINDOW), key=lambda i: max(w[i]))) for w in full}) > 1
    assert any([max(b) for b in w] != sorted(max(b) for b in w) for w in windows)
    assert padding_share(grouped) < padding_share(plain)
    wide = epoch_batches(make(shards, tokenizer, settings(group=6)))
    assert padding_share(wide) < 0.5 * padding_share(plain)


def test_the_order_is_seeded(shards: list[Any], tokenizer: Any) -> None:
    first = epoch_batches(make(shards, tokenizer, settings(seed=5)))
    again = epoch_batches(make(shards, tokenizer, settings(seed=5)))
    other = epoch_batches(make(shards, tokenizer, settings(seed=6)))
    assert same(first, again)
    assert not same(first, other)
    # Not only because the seed reorders the shards: the window order depends on it too.
    fixed = [make(shards, tokenizer, settings(seed=s, shuffle_shards=False)) for s in (5, 6)]
    assert not same(epoch_batches(fixed[0]), epoch_batches(fixed[1]))
    # And on the epoch: the same shards in the same order are grouped anew each epoch.
    stream = fixed[0]
    stream.start_epoch(1)
    again = epoch_batches(stream)
    stream.start_epoch(0)
    assert examples(again) == examples(epoch_batches(stream))
    assert not same(
        again, epoch_batches(make(shards, tokenizer, settings(seed=5, shuffle_shards=False)))
    )


def run_from(stream: RankStream, epochs_left: int) -> list[dict[str, torch.Tensor]]:
    """The rest of the current epoch and `epochs_left` more, as the loop reads them."""
    out = epoch_batches(stream)
    for _ in range(epochs_left):
        stream.start_epoch(stream.state.epoch + 1)
        out += epoch_batches(stream)
    return out


def test_a_position_saved_mid_window_resumes_exactly(shards: list[Any], tokenizer: Any) -> None:
    """Cut after every batch of the first epoch (mid-window, at window ends, at the epoch's
    end): the saved position, through JSON as a checkpoint stores it, continues with exactly
    the batches of one uninterrupted stream, into the next epoch."""
    whole = run_from(make(shards, tokenizer, settings()), 1)
    per_epoch = len(whole) // 2
    assert per_epoch > WINDOW + 1
    for cut in range(per_epoch + 1):
        first = make(shards, tokenizer, settings())
        head = [first.next_batch() for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))
        second = make(shards, tokenizer, settings())
        second.load_state_dict(state)
        tail = run_from(second, 1)
        assert same(head + tail, whole), f"cut after batch {cut}"
        assert second.state_dict() == json.loads(json.dumps(second.state_dict()))


def test_the_prefetch_thread_gives_the_same_batches_and_positions(
    shards: list[Any], tokenizer: Any
) -> None:
    """Through Prefetcher: the same batches across an epoch boundary, and the position the
    loop would checkpoint mid-window (the thread a window ahead) resumes exactly."""
    whole = run_from(make(shards, tokenizer, settings()), 2)
    stream = make(shards, tokenizer, settings())
    feed = Prefetcher(stream, 2)
    got, states = [], []
    while len(got) < len(whole):
        fed = feed.next_batch()
        if fed is None:
            feed.start_epoch(feed.epoch + 1)
            continue
        got.append(fed.batch)
        states.append(json.loads(json.dumps(feed.state_dict())))
    feed.close()
    assert same(got, whole)
    for cut in (1, WINDOW + 1, len(whole) // 3 + 1):  # mid-window, epochs 0 and 1
        assert states[cut - 1]["pending"], "not mid-window"
        resumed = make(shards, tokenizer, settings())
        resumed.load_state_dict(states[cut - 1])
        epochs_left = 2 - states[cut - 1]["epoch"]
        assert same(got[:cut] + run_from(resumed, epochs_left), whole), f"cut after {cut}"


def recipe(*overrides: str) -> Any:
    return load_recipe(None, ["data.train=data/demo", "training.max_steps=4", *overrides])


def test_nonsense_combinations_are_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"data\.group_by_length=4 .*data\.packing=true"):
        recipe("data.group_by_length=4", "data.packing=true")
    with pytest.raises(ConfigError, match=r"data\.group_by_length=2 .*data\.format=text"):
        recipe("data.group_by_length=2", "data.format=text")
    with pytest.raises(ConfigError, match=r"data\.group_by_length: -1 is below the minimum 0"):
        recipe("data.group_by_length=-1")
    # Off (0 or null) combines with anything.
    assert recipe("data.group_by_length=0", "data.packing=true").data.packing
    assert recipe("data.group_by_length=null", "data.format=text").data.group_by_length is None
    assert recipe("data.group_by_length=8").data.group_by_length == 8


def test_a_resume_may_not_change_it() -> None:
    saved, current = recipe().to_dict(), recipe("data.group_by_length=8").to_dict()
    assert changed_keys(saved, current) == ["data.group_by_length: 0 -> 8"]


def test_stop_and_resume_mid_window_trains_like_one_run(tmp_path: Path) -> None:
    """Through the real loop, its prefetch thread and its checkpoints: windows of 3 micro
    batches and 2 micro batches per step, so a stop after step 1 saves a window with one
    batch pending (and the thread already a window ahead). The
    resumed run logs the same losses, ends with bitwise the same weights and reads every
    record once per epoch."""
    from helpers import run_cli, seen_ids, train_losses, write_recipe
    from safetensors.torch import load_file

    ids = write_mixed(tmp_path / "data", [7, 6])  # 7 batches per epoch: windows 3 + 3 + 1
    runs = {}
    for name in ("one", "resumed"):
        runs[name] = write_recipe(
            tmp_path / f"{name}.yaml",
            tmp_path / "data",
            tmp_path / name,
            training={"epochs": 2, "save_every": 100},
            data={"group_by_length": WINDOW, "record_audit": True, "max_seq_len": 1024},
        )
    plan = [("one",), ("resumed", "training.stop_after_steps=1")]
    plan += [("resumed", "training.resume=latest")]
    for name, *overrides in plan:
        result = run_cli("train", "--config", str(runs[name]), *overrides, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(train_losses(tmp_path / "one")) == 8
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "one")
    got = load_file(tmp_path / "resumed/final/model.safetensors")
    expected = load_file(tmp_path / "one/final/model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert Counter(seen_ids(tmp_path / "resumed")) == {i: 2 for i in ids}
