"""Batches prefetched in a thread (data/prefetch.py) change nothing the loop guarantees: the same
batches in the same order, checkpoints at the position of the last batch *taken*, every record
once in the audit after a stop and resume, and a data error as one `error:` line."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    offline_env,
    run_cli,
    seen_ids,
    train_losses,
    write_dataset,
    write_recipe,
)
from safetensors.torch import load_file

from raft_dist.data import streaming
from raft_dist.data.prefetch import Prefetcher
from raft_dist.data.sources import load_shards
from raft_dist.data.streaming import RankStream, StreamSettings
from raft_dist.errors import DataError
from raft_dist.model import TINY_TOKENIZER


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def settle(feed: Prefetcher) -> None:
    """Wait until the thread has filled its queue: it is then as far ahead as it gets, which
    is when handing out its position instead of the loop's would show."""
    deadline = time.monotonic() + 10
    while not feed._queue.full() and time.monotonic() < deadline:
        time.sleep(0.001)


def drive(stream: Any, steps: int, audit: list[str], feed: Prefetcher | None) -> list[Any]:
    """What the loop sees, call by call: each batch with the checkpointable position and audit
    after it; on None the next epoch starts, as fit() does when every rank is done."""
    source = feed if feed is not None else stream
    seen: list[Any] = []
    for _ in range(steps):
        got = source.next_batch()
        if feed is not None:
            settle(feed)
        if got is None:
            seen.append(("end", source.state_dict(), list(audit)))
            epoch = (feed.epoch if feed is not None else stream.state.epoch) + 1
            source.start_epoch(epoch)
            seen.append(("epoch", source.state_dict(), list(audit)))
            continue
        batch = got.batch if feed is not None else got
        seen.append(({k: v.tolist() for k, v in batch.items()}, source.state_dict(), list(audit)))
    return seen


@pytest.mark.parametrize(("packing", "depth", "rank"), [(False, 2, 0), (True, 2, 1), (True, 1, 0)])
def test_prefetched_batches_and_positions_equal_the_streams(
    tmp_path: Path, tokenizer: Any, packing: bool, depth: int, rank: int
) -> None:
    """Over several epochs (reshuffled shards): the same batches in the same order, and after
    each one the same checkpointable position and audit as the stream alone gives."""
    write_dataset(tmp_path, [5, 6, 4])
    shards = load_shards(str(tmp_path))
    settings = StreamSettings(
        max_seq_len=400, micro_batch_size=2, packing=packing, shuffle_shards=True, seed=3
    )

    def stream(audit: list[str]) -> RankStream:
        return RankStream(shards, tokenizer, settings, rank=rank, world_size=2, seen_ids=audit)

    plain_audit: list[str] = []
    plain = stream(plain_audit)
    expected = drive(plain, 12, plain_audit, None)
    assert sum(1 for x in expected if x[0] == "end") >= 2  # epoch boundaries were crossed
    assert not any(x[0] == "end" for x in expected[-2:])  # and the last epoch is under way

    audit: list[str] = []
    prefetched = stream(audit)
    feed = Prefetcher(prefetched, depth)
    got = drive(prefetched, 12, audit, feed)
    feed.close()
    assert got == expected
    # Closed, the stream itself is back where the loop is (what the run summary counts).
    assert prefetched.state_dict() == plain.state_dict()
    assert prefetched.seen_ids is audit and audit == plain_audit


def test_a_data_error_is_raised_at_the_batch_that_hit_it(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error already waits in the queue behind two good batches: those come first, then
    the stream's own DataError, raised again if asked again."""
    write_dataset(tmp_path, [9])
    real_parse = streaming.parse_line

    def parse(record: Any) -> Any:
        if record.line == 6:
            raise DataError(record.path, record.line, "not a record (test)")
        return real_parse(record)

    monkeypatch.setattr(streaming, "parse_line", parse)
    settings = StreamSettings(max_seq_len=400, micro_batch_size=2)
    stream = RankStream(load_shards(str(tmp_path)), tokenizer, settings, rank=0, world_size=1)
    feed = Prefetcher(stream, 3)
    settle(feed)  # lines 1-2, lines 3-4, the error
    assert feed.next_batch() is not None and feed.next_batch() is not None
    for _ in range(2):
        with pytest.raises(DataError, match=r"shard-00000.jsonl:6: not a record \(test\)$"):
            feed.next_batch()
    feed.close()
    assert stream.state_dict()["consumed"] == 4


def _train(recipe: Path, *overrides: str) -> None:
    result = run_cli("train", "--config", str(recipe), *overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


NAMES = ("reference", "resumed")


def test_stop_and_resume_with_prefetch_equals_an_unprefetched_run(tmp_path: Path) -> None:
    """Stopped mid-epoch (the thread a batch or two ahead), at the end of an epoch, mid-epoch
    again, then resumed to the end: the same losses and bitwise the same weights as one run
    without prefetching, and the audit holds every record once per epoch, in the same order."""
    ids = write_dataset(tmp_path / "data", [7, 6])
    # 13 records in batches of 2, 2 per step: 4 steps per epoch, 8 in all.
    training = {"epochs": 2, "save_every": 100}
    data = {"record_audit": True, "shuffle_shards": True}

    def recipe(name: str, depth: int) -> Path:
        return write_recipe(
            tmp_path / f"{name}.yaml",
            tmp_path / "data",
            tmp_path / name,
            training=training,
            data={**data, "prefetch_batches": depth},
        )

    reference = recipe(NAMES[0], 0)
    _train(reference)
    resumed = recipe(NAMES[1], 2)
    _train(resumed, "training.stop_after_steps=3")  # mid-epoch 0
    # Step 4 ends epoch 0: the loop has taken the end of its range while the thread has
    # already started epoch 1. Then step 6, mid-epoch 1.
    _train(resumed, "training.resume=latest", "training.stop_after_steps=1")
    _train(resumed, "training.resume=latest", "training.stop_after_steps=2")
    _train(resumed, "training.resume=latest")

    assert len(train_losses(tmp_path / "reference")) == 8
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "reference")
    fresh = load_file(tmp_path / "resumed/final/model.safetensors")
    expected = load_file(tmp_path / "reference/final/model.safetensors")
    assert fresh.keys() == expected.keys()
    assert all(torch.equal(fresh[k], expected[k]) for k in fresh)
    audit = seen_ids(tmp_path / "resumed")
    assert audit == seen_ids(tmp_path / "reference")
    assert Counter(audit) == {i: 2 for i in ids}
    # The summary counts what was trained on, not what the thread read ahead.
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in NAMES]
    assert [s["examples_tokenized"] for s in summaries] == [26, 26]


BAD_LINE_RUN = """
import sys
from raft_dist import cli
from raft_dist.data import streaming
from raft_dist.errors import DataError

real_parse = streaming.parse_line

def parse(record):
    # A record the preflight check let through but the stream cannot use.
    if record.line == 7:
        raise DataError(record.path, record.line, "not a record (test)")
    return real_parse(record)

streaming.parse_line = parse
sys.exit(cli.main(["train", "--config", sys.argv[1]]))
"""


def test_a_data_error_while_prefetching_is_one_error_line(tmp_path: Path) -> None:
    """Raised in the thread, reported by the CLI as one line, and only when the loop reaches
    that batch: the step before it is trained and logged."""
    import subprocess

    write_dataset(tmp_path / "data", [12])
    # One micro-batch per step, so the thread is two steps ahead of the loop.
    training = {"gradient_accumulation_steps": 1}
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "run",
        training=training,
        data={"prefetch_batches": 2},
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BAD_LINE_RUN), str(recipe)],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("shard-00000.jsonl:7: not a record (test)")
    # Record 7 is in step 4's batch; the thread read it during step 2.
    assert list(train_losses(tmp_path / "run")) == [1, 2, 3]
