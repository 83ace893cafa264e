"""Per-rank streaming without processes: ranges, resume positions, packing, policies, sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_dataset

from raft_dist.data.records import parse_record, to_example
from raft_dist.data.sources import Shard, load_shards, resolve_files
from raft_dist.data.streaming import RankStream, StreamSettings, iter_range, rank_range
from raft_dist.errors import DataError
from raft_dist.model import TINY_TOKENIZER


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("total", [1, 5, 29, 100])
def test_rank_ranges_partition_the_records(world: int, total: int) -> None:
    ranges = [rank_range(total, world, r) for r in range(world)]
    covered = [i for start, end in ranges for i in range(start, end)]
    assert covered == list(range(total))
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_iter_range_reads_across_uneven_shards(tmp_path: Path) -> None:
    write_dataset(tmp_path, [3, 1, 4])
    shards = load_shards(str(tmp_path))
    assert [s.records for s in shards] == [3, 1, 4]
    lines = [(r.path.name, r.line) for r in iter_range(shards, 2, 6, text=False)]
    assert lines == [
        ("shard-00000.jsonl", 3),
        ("shard-00001.jsonl", 1),
        ("shard-00002.jsonl", 1),
        ("shard-00002.jsonl", 2),
    ]


def collect(stream: RankStream, limit: int | None = None) -> list[list[int]]:
    rows = []
    while limit is None or len(rows) < limit:
        batch = stream.next_batch()
        if batch is None:
            break
        rows += [row[row != -100].tolist() for row in batch["labels"]]
    return rows


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_state_continues_exactly(tmp_path: Path, tokenizer, packing: bool) -> None:
    write_dataset(tmp_path, [5, 6, 4])
    shards = load_shards(str(tmp_path))
    settings = StreamSettings(
        max_seq_len=64, micro_batch_size=2, packing=packing, shuffle_shards=True, seed=3
    )
    whole = collect(RankStream(shards, tokenizer, settings, rank=1, world_size=2))
    first = RankStream(shards, tokenizer, settings, rank=1, world_size=2)
    head = collect(first, limit=3)
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores
    second = RankStream(shards, tokenizer, settings, rank=1, world_size=2)
    second.load_state_dict(state)
    assert head + collect(second) == whole


def test_packing_keeps_every_target_token(tmp_path: Path, tokenizer) -> None:
    write_dataset(tmp_path, [9])
    shards = load_shards(str(tmp_path))
    plain = StreamSettings(max_seq_len=512, micro_batch_size=3)
    packed = StreamSettings(max_seq_len=512, micro_batch_size=1, packing=True)
    targets = sum(
        len(r) for r in collect(RankStream(shards, tokenizer, plain, rank=0, world_size=1))
    )
    stream = RankStream(shards, tokenizer, packed, rank=0, world_size=1)
    widths = []
    total = 0
    while (batch := stream.next_batch()) is not None:
        widths.append(batch["input_ids"].shape[1])
        total += int((batch["labels"] != -100).sum())
    assert total == targets
    # Whole examples only: rows stay within 512 tokens and hold several examples each.
    assert 1 < len(widths) < 9 and max(widths) <= 512


@pytest.mark.parametrize(("policy", "kept"), [("truncate", 3), ("drop", 0)])
def test_overlong_policy_is_counted(tmp_path: Path, tokenizer, policy: str, kept: int) -> None:
    write_dataset(tmp_path, [3])
    shards = load_shards(str(tmp_path))
    lines = (tmp_path / "train/shard-00000.jsonl").read_text().splitlines()
    prompts = [to_example(parse_record(json.loads(line), "x", 1)).prompt for line in lines]
    longest_prompt = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    # Every prompt fits, every answer is cut.
    settings = StreamSettings(max_seq_len=longest_prompt + 2, micro_batch_size=8, overlong=policy)
    stream = RankStream(shards, tokenizer, settings, rank=0, world_size=1)
    rows = collect(stream)
    assert len(rows) + stream.lengths.dropped == 3
    assert stream.lengths.truncated + stream.lengths.dropped == 3
    assert len(rows) == kept


def test_text_format_trains_on_every_token(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "a.txt").write_text("the tide mill turns\nthe ferry leaves\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("the lantern burns\n", encoding="utf-8")
    shards = load_shards(str(tmp_path), text=True)
    assert [s.records for s in shards] == [2, 1]
    settings = StreamSettings(max_seq_len=8, micro_batch_size=2, text=True)
    stream = RankStream(shards, tokenizer, settings, rank=0, world_size=1)
    batch = stream.next_batch()
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"].equal(batch["input_ids"])  # loss on every token, no prompt mask
    rows = [batch] + [b for b in iter(stream.next_batch, None)]
    ids = [
        t
        for b in rows
        for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
        for t in row[mask.bool()].tolist()
    ]
    assert tokenizer.decode(ids) == (
        "the tide mill turns\nthe ferry leaves\n<|endoftext|>the lantern burns\n"
    )


def test_sources_folder_glob_file_and_manifest(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", [2, 2], eval_sizes=(1,))
    train = tmp_path / "ds/train"
    assert resolve_files(str(tmp_path / "ds")) == sorted(train.glob("*.jsonl"))
    assert resolve_files(str(tmp_path / "ds"), "eval") == [tmp_path / "ds/eval/shard-00000.jsonl"]
    assert resolve_files(str(train / "*.jsonl")) == sorted(train.glob("*.jsonl"))
    assert resolve_files(str(train / "shard-00001.jsonl")) == [train / "shard-00001.jsonl"]
    manifest = {"splits": {"train": {"shards": [{"path": "train/shard-00001.jsonl"}]}}}
    (tmp_path / "ds/manifest.json").write_text(json.dumps(manifest))
    assert resolve_files(str(tmp_path / "ds")) == [train / "shard-00001.jsonl"]


def test_missing_and_empty_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_files(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="glob matches no file"):
        resolve_files(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl file"):
        resolve_files(str(tmp_path / "empty"))
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.jsonl: the shard is empty"):
        load_shards(str(tmp_path / "blank.jsonl"))


def test_state_from_another_world_size_is_refused(tmp_path: Path, tokenizer) -> None:
    shards = [Shard(tmp_path / "x.jsonl", 10)]
    settings = StreamSettings(max_seq_len=64, micro_batch_size=1)
    saved = RankStream(shards, tokenizer, settings, rank=0, world_size=2).state_dict()
    other = RankStream(shards, tokenizer, settings, rank=0, world_size=4)
    with pytest.raises(DataError, match="saved with 2 ranks .* this run has 4 ranks"):
        other.load_state_dict(saved)


def epochs_of(stream: RankStream, epochs: int) -> list[dict]:
    """Every batch (all its tensors) of `epochs` epochs, and the audit and statistics."""
    batches = []
    for epoch in range(epochs):
        stream.start_epoch(epoch)
        while (batch := stream.next_batch()) is not None:
            batches.append({k: v.tolist() for k, v in batch.items()})
    return batches


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"packing": True},
        {"group_by_length": 2, "shuffle_shards": True},
        {"overlong": "drop"},  # dropped examples are remembered as dropped
    ],
)
def test_later_epochs_reuse_the_encoded_examples_and_give_the_same_batches(
    tmp_path: Path, tokenizer, options: dict
) -> None:
    from raft_dist.data.encoded_cache import EncodedCache

    write_dataset(tmp_path, [6, 5, 4], seed=2)
    shards = load_shards(str(tmp_path))
    # 200 tokens: some examples are truncated (or dropped), others are kept whole
    settings = StreamSettings(max_seq_len=200, micro_batch_size=2, seed=5, **options)
    calls = {"n": 0}

    class CountingTokenizer:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            calls["n"] += 1
            return tokenizer(*args, **kwargs)

    cached_ids: list[str] = []
    cached = RankStream(
        shards, CountingTokenizer(), settings, rank=1, world_size=2, seen_ids=cached_ids
    )
    got = epochs_of(cached, 1)
    first_epoch_calls = calls["n"]
    assert first_epoch_calls > 0
    for epoch in (1, 2):
        cached.start_epoch(epoch)
        while (batch := cached.next_batch()) is not None:
            got.append({k: v.tolist() for k, v in batch.items()})
    plain_ids: list[str] = []
    plain = RankStream(shards, tokenizer, settings, rank=1, world_size=2, seen_ids=plain_ids)
    plain._encoded = EncodedCache(max_tokens=0)  # nothing kept: every epoch tokenizes
    assert got == epochs_of(plain, 3)
    assert cached_ids == plain_ids
    assert cached.lengths == plain.lengths
    stats = cached.lengths
    assert stats.examples > 0 and stats.truncated + stats.dropped > 0  # kept and cut ones
    if not options.get("shuffle_shards"):  # the same range every epoch: all hits
        assert calls["n"] == first_epoch_calls
        assert cached._encoded.hits == 2 * len(plain_ids) // 3
