"""The on-disk token cache: later runs read ids instead of tokenizing, and get the same batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dataset, write_recipe

from raft_dist.data.sources import load_shards
from raft_dist.data.streaming import RankStream, StreamSettings
from raft_dist.data.token_cache import (
    ROOT_VARIABLE,
    TokenCache,
    _file_folder,
    tokenizer_fingerprint,
)
from raft_dist.model import TINY_TOKENIZER


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(ROOT_VARIABLE, str(root))
    return root


class Counting:
    """The tokenizer, counting its calls (to tell a hit from tokenizing). Its class is part of
    the fingerprint, so the runs a test compares all use this wrapper."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


def one_epoch(data: Path, tokenizer, **options) -> tuple[list[dict], RankStream]:
    settings = StreamSettings(**{"max_seq_len": 200, "micro_batch_size": 2, "seed": 3, **options})
    stream = RankStream(load_shards(str(data)), tokenizer, settings, rank=0, world_size=1)
    batches = []
    while (batch := stream.next_batch()) is not None:
        batches.append({k: v.tolist() for k, v in batch.items()})
    return batches, stream


def cache_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.npz"))


@pytest.mark.parametrize(
    "options",
    [{}, {"packing": True}, {"max_seq_len": 90, "overlong": "drop"}, {"group_by_length": 2}],
)
def test_a_later_run_reads_the_ids_and_trains_the_same_batches(
    tmp_path: Path, tokenizer, cache_root: Path, options: dict
) -> None:
    write_dataset(tmp_path / "data", [5, 4], seed=4)
    plain, plain_stream = one_epoch(tmp_path / "data", tokenizer, **options)
    first = Counting(tokenizer)
    cold, cold_stream = one_epoch(tmp_path / "data", first, token_cache=True, **options)
    assert first.calls == 2 * 9  # a prompt and an answer per record
    assert cache_files(cache_root)  # the end of the range wrote them
    second = Counting(tokenizer)
    warm, warm_stream = one_epoch(tmp_path / "data", second, token_cache=True, **options)
    assert second.calls == 2  # only the first hit, tokenized again to check the cache
    assert warm_stream._token_cache.hits == 9
    assert cold == warm == plain
    # what the overlong policy did is counted as without the cache
    assert warm_stream.lengths == cold_stream.lengths == plain_stream.lengths


def test_entries_serve_every_row_length(tmp_path: Path, tokenizer, cache_root: Path) -> None:
    write_dataset(tmp_path / "data", [6], seed=1)
    one_epoch(tmp_path / "data", Counting(tokenizer), token_cache=True, max_seq_len=400)
    counting = Counting(tokenizer)
    short, stream = one_epoch(tmp_path / "data", counting, token_cache=True, max_seq_len=60)
    assert counting.calls == 2
    assert stream.lengths.truncated + stream.lengths.dropped > 0
    assert short == one_epoch(tmp_path / "data", tokenizer, max_seq_len=60)[0]


def test_an_edited_record_is_tokenized_again(tmp_path: Path, tokenizer, cache_root: Path) -> None:
    write_dataset(tmp_path / "data", [4], seed=2)
    one_epoch(tmp_path / "data", Counting(tokenizer), token_cache=True)
    shard = tmp_path / "data" / "train" / "shard-00000.jsonl"
    lines = shard.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[2])
    record["cot_answer"] = "A different answer. <ANSWER>: tide"
    lines[2] = json.dumps(record)
    shard.write_text("\n".join(lines) + "\n", encoding="utf-8")
    counting = Counting(tokenizer)
    edited, stream = one_epoch(tmp_path / "data", counting, token_cache=True)
    assert stream._token_cache.misses == 1 and stream._token_cache.hits == 3
    assert edited == one_epoch(tmp_path / "data", tokenizer)[0]


def test_another_tokenizer_does_not_share_the_entries(tokenizer) -> None:
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tokenizer)
    other.add_tokens(["harbourmaster"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    other.add_special_tokens({"pad_token": "<pad2>"})
    assert tokenizer_fingerprint(other) is not None


def rewrite_entries(root: Path, change) -> None:
    for file in cache_files(root):
        with np.load(file) as parts:
            arrays = {k: parts[k] for k in parts.files}
        change(arrays)
        with file.open("wb") as out:
            np.savez(out, **arrays)


def test_a_cache_that_disagrees_with_the_tokenizer_is_not_used(
    tmp_path: Path, tokenizer, cache_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_dataset(tmp_path / "data", [5], seed=5)
    one_epoch(tmp_path / "data", tokenizer, token_cache=True)

    def shift(arrays: dict) -> None:  # every id off by one: what a stale cache would hold
        arrays["ids"] = (arrays["ids"] + 1).astype(np.int32)

    rewrite_entries(cache_root, shift)
    with caplog.at_level(logging.WARNING, logger="raft_dist.data.token_cache"):
        got, stream = one_epoch(tmp_path / "data", tokenizer, token_cache=True)
    assert got == one_epoch(tmp_path / "data", tokenizer)[0]
    assert not stream._token_cache.enabled
    assert "gives other ids than the tokenizer" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "inconsistent"])
def test_an_unreadable_cache_file_is_skipped(
    tmp_path: Path, tokenizer, cache_root: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    write_dataset(tmp_path / "data", [5], seed=6)
    one_epoch(tmp_path / "data", tokenizer, token_cache=True)
    if damage == "truncated":  # a file cut short (a disk filled up under another writer)
        for file in cache_files(cache_root):
            file.write_bytes(file.read_bytes()[:100])
    else:

        def drop_ids(arrays: dict) -> None:
            arrays["ids"] = arrays["ids"][:-3]

        rewrite_entries(cache_root, drop_ids)
    with caplog.at_level(logging.WARNING, logger="raft_dist.data.token_cache"):
        got, stream = one_epoch(tmp_path / "data", tokenizer, token_cache=True)
    assert got == one_epoch(tmp_path / "data", tokenizer)[0]
    assert stream._token_cache.hits == 0
    assert "skipping the unreadable token cache file" in caplog.text


def test_a_cache_folder_that_cannot_be_written_does_not_stop_the_run(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(ROOT_VARIABLE, str(blocker / "tokens"))
    write_dataset(tmp_path / "data", [3], seed=7)
    with caplog.at_level(logging.WARNING, logger="raft_dist.data.token_cache"):
        got, _ = one_epoch(tmp_path / "data", tokenizer, token_cache=True)
    assert got == one_epoch(tmp_path / "data", tokenizer)[0]
    assert "cannot write the token cache" in caplog.text


def test_a_write_killed_half_way_leaves_no_file_a_reader_takes(
    tmp_path: Path, tokenizer, cache_root: Path
) -> None:
    write_dataset(tmp_path / "data", [3], seed=8)
    one_epoch(tmp_path / "data", Counting(tokenizer), token_cache=True)
    (done,) = cache_files(cache_root)
    torn = done.parent / f".{'0' * 32}.npz.tmp"  # what a kill before the rename leaves
    torn.write_bytes(done.read_bytes()[:50])
    done.unlink()
    counting = Counting(tokenizer)
    one_epoch(tmp_path / "data", counting, token_cache=True)
    assert counting.calls == 2 * 3  # nothing read from the torn file, nothing failed


def test_a_slow_tokenizer_is_not_cached() -> None:
    class Slow:  # no `backend_tokenizer`: nothing to fingerprint
        pass

    assert TokenCache.open(Slow()) is None


def test_the_training_loop_keeps_what_it_tokenized(
    tmp_path: Path, cache_root: Path, tiny_data: Path
) -> None:
    """A run stopped by max_steps before its range ends still writes what it tokenized; the
    next run reads it, and its summary says so."""
    from raft_dist.config import load_recipe
    from raft_dist.train.loop import train

    summaries = []
    for name in ("first", "second"):
        recipe = write_recipe(
            tmp_path / f"{name}.yaml",
            tiny_data,
            tmp_path / name,
            training={"max_steps": 1, "micro_batch_size": 1},
            data={"prefetch_batches": 0},
        )
        summaries.append(train(load_recipe(recipe, [])))
    (fingerprint,) = [p for p in cache_root.iterdir() if p.is_dir()]
    shard = tiny_data / "train" / "shard-00000.jsonl"  # the first 2 of its 6 records trained
    files = cache_files(fingerprint / _file_folder(shard))
    assert sum(len(np.load(f)["keys"]) for f in files) >= 2
    assert summaries[0]["token_cache_hits"] == 0
    assert summaries[1]["token_cache_hits"] == 2  # the training stream's (the summary's count)
    assert len(files) == 1  # the second run had nothing new to write


def test_the_cache_command_shows_and_clears_only_the_cache(
    tmp_path: Path, tokenizer, cache_root: Path
) -> None:
    from helpers import offline_env, run_cli

    write_dataset(tmp_path / "data", [3], seed=9)
    one_epoch(tmp_path / "data", tokenizer, token_cache=True)
    keep = cache_root / "mine" / "notes.txt"  # a root set to a folder that holds other things
    keep.parent.mkdir()
    keep.write_text("mine")
    env = offline_env(**{ROOT_VARIABLE: str(cache_root)})
    shown = run_cli("cache", env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"tokenizer {tokenizer_fingerprint(tokenizer)}  1 files" in shown.stdout
    cleared = run_cli("cache", "--clear", env=env)
    assert cleared.returncode == 0 and "cleared" in cleared.stdout
    assert not cache_files(cache_root) and keep.read_text() == "mine"
    assert "empty" in run_cli("cache", env=env).stdout


def test_a_file_whose_entries_do_not_fit_in_memory_is_not_written_again(
    tmp_path: Path, tokenizer, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raft_dist.data import token_cache

    write_dataset(tmp_path / "data", [6], seed=10)
    one_epoch(tmp_path / "data", tokenizer, token_cache=True)
    before = cache_files(cache_root)
    (file,) = before
    first_size = int(np.load(file)["lengths"][0])
    monkeypatch.setattr(token_cache, "MAX_TOKENS", first_size)  # one example's ids fit
    got, stream = one_epoch(tmp_path / "data", tokenizer, token_cache=True)
    assert got == one_epoch(tmp_path / "data", tokenizer)[0]
    assert stream._token_cache.hits == 1  # one entry held, the others tokenized
    assert cache_files(cache_root) == before  # ... and not written once more
