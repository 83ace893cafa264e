"""Packing keeps examples apart: a packed batch gives the same summed loss and the same
gradients as the same examples run one by one, and no example is split across rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_dataset

from raft_dist.config import ModelConfig
from raft_dist.data.batching import collate, collate_packed, pack_examples
from raft_dist.data.records import parse_record, to_example
from raft_dist.data.sources import load_shards
from raft_dist.data.streaming import RankStream, StreamSettings
from raft_dist.data.tokenize import LengthStats, encode_example
from raft_dist.evaluate import token_loss_sum
from raft_dist.model import enable_gradient_checkpointing, load_model, load_tokenizer
from raft_dist.packed_attention import (
    PER_EXAMPLE,
    example_spans,
    use_per_example_attention,
    verify_packing,
)

EXAMPLE_LEN = 256  # the longest example (overlong ones are truncated to it)
ROW_LEN = 640  # a packed row holds two or three of them


def encoded_examples(tmp_path: Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    write_dataset(tmp_path, [12], seed=4)
    out = []
    for line in (tmp_path / "train/shard-00000.jsonl").read_text().splitlines():
        example = to_example(parse_record(json.loads(line), "x", 1))
        encoded = encode_example(
            tokenizer,
            example.prompt,
            example.completion,
            max_len=EXAMPLE_LEN,
            overlong="truncate",
            stats=LengthStats(),
        )
        out.append((encoded.input_ids, encoded.labels))
    return out


def loss_and_grads(model, batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        loss, _ = token_loss_sum(model, batch)
        loss.backward()
        total += loss.detach().double()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def assert_packed_like_unpacked(
    model: torch.nn.Module, tmp_path: Path, tokenizer, noise_floor: float = 0.0
) -> None:
    """The summed loss and every gradient of packed batches equal those of the examples run
    one by one; `noise_floor` (a share of the largest gradient) bounds each gradient's scale
    from below."""
    examples = encoded_examples(tmp_path, tokenizer)
    pad = tokenizer.pad_token_id
    rows = pack_examples(iter(examples), [], [], row_len=ROW_LEN, rows=len(examples))
    assert sum(len(row) for row in rows) == len(examples)
    assert any(len(row) > 1 for row in rows)  # rows really hold several examples
    packed = [collate_packed(rows[i : i + 2], pad_id=pad) for i in range(0, len(rows), 2)]
    unpacked = [collate([example], pad_id=pad) for example in examples]
    loss_u, grads_u = loss_and_grads(model, unpacked)
    loss_p, grads_p = loss_and_grads(model, packed)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=0.0)
    assert grads_u.keys() == grads_p.keys()
    floor = noise_floor * max(float(g.abs().max()) for g in grads_u.values())
    for name, grad in grads_u.items():
        scale = max(float(grad.abs().max()), floor) or 1.0
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize(
    ("arch", "attention"),
    [
        ("builtin:tiny-llama", None),
        ("builtin:tiny-gpt2", None),
        # eager adds the mask to the scores: a boolean block mask would let examples mix
        ("builtin:tiny-llama", "eager"),
        ("builtin:tiny-gpt2", "eager"),
        # SDPA on each example's span instead of a mask (the loop's choice on the CPU), also
        # through gradient checkpointing, whose recompute must see the spans again
        ("builtin:tiny-llama", "per-example"),
        ("builtin:tiny-gpt2", "per-example"),
        ("builtin:tiny-llama", "per-example+checkpointing"),
    ],
)
def test_packed_loss_and_gradients_equal_unpacked(
    tmp_path: Path, arch: str, attention: str | None
) -> None:
    per_example = attention is not None and attention.startswith("per-example")
    cfg = ModelConfig(name_or_path=arch, attn_implementation=None if per_example else attention)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer)
    assert model.config._attn_implementation == ("sdpa" if per_example else attention or "sdpa")
    if per_example:
        assert use_per_example_attention(model)
        assert model.config._attn_implementation == PER_EXAMPLE
    if attention == "per-example+checkpointing":
        enable_gradient_checkpointing(model)
    model.train()
    assert_packed_like_unpacked(model, tmp_path, tokenizer)


def test_per_example_attention_attends_within_examples_only(tmp_path: Path) -> None:
    """The work really goes: with per-example attention no SDPA call spans two examples of a
    row (with the block mask every call is a whole row wide), and unpacked batches through
    the same swapped model still get transformers' own mask (same logits as plain SDPA)."""
    cfg = ModelConfig()
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer)
    examples = encoded_examples(tmp_path, tokenizer)
    pad = tokenizer.pad_token_id
    rows = pack_examples(iter(examples), [], [], row_len=ROW_LEN, rows=2)
    batch = collate_packed(rows, pad_id=pad)
    lengths = {len(ids) for row in rows for ids, _ in row}
    plain = collate(examples[:3], pad_id=pad)
    with torch.no_grad():
        before = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    widths: list[int] = []

    def recording(query, *args, **kwargs):
        widths.append(query.size(-2))
        return sdpa(query, *args, **kwargs)

    assert use_per_example_attention(model)
    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            token_loss_sum(model, batch, trim=False)
            assert widths and set(widths) <= lengths, (sorted(set(widths)), sorted(lengths))
            widths.clear()
            after = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"])
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    assert set(widths) == {plain["input_ids"].size(1)}  # unpacked: whole rows, masked
    real = plain["attention_mask"].bool()
    torch.testing.assert_close(after.logits[real], before.logits[real], rtol=1e-5, atol=1e-6)


def test_local_attention_windows_are_found() -> None:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    from raft_dist.packed_attention import local_attention_window

    class Holder:  # local_attention_window reads the model's config
        def __init__(self, config) -> None:
            self.config = config

    assert local_attention_window(Holder(LlamaConfig())) is None
    assert local_attention_window(Holder(MistralConfig(sliding_window=16))) == 16
    assert local_attention_window(Holder(MistralConfig(sliding_window=None))) is None
    assert local_attention_window(Holder(Qwen2Config())) is None  # use_sliding_window=False
    gemma = Gemma3TextConfig(sliding_window=32, num_hidden_layers=2)
    assert local_attention_window(Holder(gemma)) == 32
    gemma.layer_types = ["full_attention", "full_attention"]
    assert local_attention_window(Holder(gemma)) is None


def test_packing_a_sliding_window_model_past_its_window_is_refused(tmp_path: Path) -> None:
    """Neither packed kernel narrows attention to a window: a packed sliding-window model
    would silently attend further back than it should. Refused when an example could be
    longer than the window; and should one be, per-example attention stops instead of
    dropping the window."""
    from transformers import MistralConfig, MistralForCausalLM

    from raft_dist.errors import ConfigError
    from raft_dist.packed_attention import check_packing

    config = MistralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    with pytest.raises(ConfigError, match=r"8-token window .*data\.max_seq_len=64"):
        check_packing(model, 64, "tiny-mistral")
    check_packing(model, 8, "tiny-mistral")  # no example can outgrow the window
    assert use_per_example_attention(model)
    ids = torch.randint(0, 300, (12,)).tolist()
    batch = collate_packed([[(ids[:4], ids[:4]), (ids, ids)]], pad_id=0)
    with pytest.raises(RuntimeError, match="sliding_window=8"):
        token_loss_sum(model, batch)


def test_example_spans_cover_each_row_in_runs() -> None:
    ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 2, 2, -1, -1]])
    assert example_spans(ids) == [
        [(0, 3, True), (3, 5, True), (5, 6, False)],
        [(0, 1, True), (1, 2, True), (2, 4, True), (4, 6, False)],
    ]


def test_the_stream_packs_whole_examples_and_resumes_exactly(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(ModelConfig())
    write_dataset(tmp_path, [9, 7])
    shards = load_shards(str(tmp_path))
    settings = StreamSettings(max_seq_len=ROW_LEN, micro_batch_size=2, packing=True)
    stream = RankStream(shards, tokenizer, settings, rank=0, world_size=1)
    examples, rows = 0, 0
    while (batch := stream.next_batch()) is not None:
        assert batch["input_ids"].shape[1] <= ROW_LEN
        for sequences, positions in zip(batch["sequence_ids"], batch["position_ids"], strict=True):
            rows += 1
            real = sequences >= 0
            examples += int(sequences.max()) + 1
            # Positions restart at 0 where each example starts.
            starts = torch.nonzero(positions[real] == 0).flatten().tolist()
            assert len(starts) == int(sequences.max()) + 1
    assert examples == 16 and rows < 16


def test_an_attention_kernel_that_cannot_load_is_a_config_error() -> None:
    """flash_attention_2 without the flash-attn package (never installed here): the error
    names the recipe key, not a transformers traceback."""
    from raft_dist.errors import ConfigError

    cfg = ModelConfig(name_or_path="builtin:tiny-llama", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match=r"model\.attn_implementation=flash_attention_2"):
        load_model(cfg, load_tokenizer(cfg))


# --------------------------------------------------------------------------- models' own code

# Tiny random models of two families whose code breaks packing in two ways: StableLM's layers
# do not pass keywords on to attention (the spans never arrive), Bloom's forward cannot take a
# 4D mask at all.
OTHER_FAMILIES = {
    "stablelm": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
    # and families that pack as they are (Falcon through the block mask: its attention is not
    # swappable); OPT and GPT-NeoX have learned / partial rotary positions, Gemma a head_dim
    # of its own
    "qwen2": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "gpt_neox": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "opt": {
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
        "dropout": 0.0,
    },
    "gemma": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "falcon": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "new_decoder_architecture": False,
        "alibi": False,
    },
}


def other_family(model_type: str, tokenizer) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **OTHER_FAMILIES[model_type],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_per_example_attention_refuses_a_packed_row_without_its_spans(tmp_path: Path) -> None:
    """Without the spans, per-example attention would run plain SDPA on the placeholder mask,
    where every token of the row sees every other: it raises instead."""
    tokenizer = load_tokenizer(ModelConfig())
    model = other_family("stablelm", tokenizer)
    assert use_per_example_attention(model)
    rows = pack_examples(
        iter(encoded_examples(tmp_path, tokenizer)), [], [], row_len=ROW_LEN, rows=1
    )
    with pytest.raises(RuntimeError, match="does not pass keywords on to its attention"):
        token_loss_sum(model, collate_packed(rows, pad_id=tokenizer.pad_token_id))


@pytest.mark.parametrize(
    ("model_type", "way"),
    [
        ("qwen2", "per-example"),
        ("gpt_neox", "per-example"),
        ("opt", "per-example"),
        ("gemma", "per-example"),
        ("falcon", "block mask"),
    ],
)
def test_other_families_pass_the_check_and_pack_exactly(
    tmp_path: Path, model_type: str, way: str
) -> None:
    tokenizer = load_tokenizer(ModelConfig())
    model = other_family(model_type, tokenizer)
    use_per_example_attention(model)
    assert verify_packing(model, model_type, "cpu") == way
    model.train()
    # 1e-9-sized gradients that are zero in exact arithmetic (OPT's key bias: softmax does not
    # see it) are rounding noise, compared against the largest gradient instead.
    assert_packed_like_unpacked(model, tmp_path, tokenizer, noise_floor=1e-3)


def test_verify_packing_falls_back_to_the_block_mask_and_stays_exact(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(ModelConfig())
    model = other_family("stablelm", tokenizer)
    assert use_per_example_attention(model)
    assert verify_packing(model, "tiny-stablelm", "cpu") == "block mask"
    assert model.config._attn_implementation == "sdpa" and model.training
    assert_packed_like_unpacked(model, tmp_path, tokenizer)

    llama = load_model(ModelConfig(), tokenizer)
    assert use_per_example_attention(llama)
    assert verify_packing(llama, "tiny-llama", "cpu") == "per-example"
    assert llama.config._attn_implementation == PER_EXAMPLE


def test_a_model_whose_code_cannot_pack_is_refused_before_training(tmp_path: Path) -> None:
    """Through the CLI: exit 2 naming data.packing and the way out, no traceback, no step."""
    from helpers import run_cli, write_recipe

    tokenizer = load_tokenizer(ModelConfig())
    folder = tmp_path / "tiny-bloom"
    other_family("bloom", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_dataset(tmp_path / "data", [8])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "out",
        model={"name_or_path": str(folder)},
        data={"packing": True},
        training={"max_steps": 1},
    )
    result = run_cli("train", "--config", str(recipe))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "data.packing=true" in result.stderr and "data.packing=false" in result.stderr
    assert "fails the check that packed examples stay apart" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
