"""The chunked token loss equals the unchunked one (loss and every parameter gradient) at any
chunk boundary, with ignored targets, packed rows and bf16 logits, and saves no vocabulary-wide
fp32 tensor for backward (the memory it exists to save)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from raft_dist import evaluate
from raft_dist.data.batching import collate, collate_packed
from raft_dist.data.tokenize import IGNORE_INDEX
from raft_dist.evaluate import chunked_token_loss, model_logits, token_loss_sum

VOCAB = 211  # odd, so that no chunk of tokens is a power of two of logits
SEQ = 17  # 16 positions predict a next token


def tiny_model(dtype: torch.dtype = torch.float32) -> Any:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).train()


def reference_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """token_loss_sum as it was before chunking: all logits upcast, one cross entropy."""
    targets = batch["labels"][:, 1:]
    logits = model_logits(model, batch)[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum().to(torch.float64)


def plain_batch(rows: int = 2, seq: int = SEQ, seed: int = 1) -> dict[str, Any]:
    """Rows of different lengths (right padding) whose prompt tokens are not targets."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for row in range(rows):
        length = seq - 3 * row
        ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        prompt = 4 + row
        examples.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate(examples, pad_id=0)


def packed_batch(seed: int = 2) -> dict[str, Any]:
    """Two rows holding two and three examples, the way the packed stream builds them."""
    generator = torch.Generator().manual_seed(seed)

    def example(length: int, prompt: int) -> tuple[list[int], list[int]]:
        ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        return ids, [IGNORE_INDEX] * prompt + ids[prompt:]

    rows = [[example(9, 3), example(8, 2)], [example(5, 1), example(6, 4), example(4, 2)]]
    return collate_packed(rows, pad_id=0)


def loss_and_grads(fn: Any, model: Any, batch: dict[str, Any]) -> tuple[Any, Any, dict]:
    model.zero_grad(set_to_none=True)
    loss, count = fn(model, batch)
    # The loop's scaling: a gradient of the mean over the window, not of the sum.
    (loss * (1.0 / 37.0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), count, grads


def assert_same(model: Any, batch: dict[str, Any]) -> None:
    ref_loss, ref_count, ref_grads = loss_and_grads(reference_loss_sum, model, batch)
    loss, count, grads = loss_and_grads(token_loss_sum, model, batch)
    assert loss.dtype == torch.float32
    assert count.dtype == torch.float64 and float(count) == float(ref_count)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0.0)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in ref_grads.items():
        scale = float(grad.float().abs().max()) or 1.0
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def use_chunks(monkeypatch: pytest.MonkeyPatch, tokens: int) -> None:
    monkeypatch.setattr(evaluate, "LOSS_CHUNK_ELEMENTS", tokens * VOCAB)
    assert evaluate.loss_chunk_tokens(VOCAB) == tokens


# 16 target positions per row: chunks longer than a row, exactly a row, not dividing it, one.
@pytest.mark.parametrize("chunk", [64, SEQ - 1, 5, 1])
def test_loss_and_gradients_equal_the_unchunked_loss(monkeypatch, chunk: int) -> None:
    use_chunks(monkeypatch, chunk)
    model = tiny_model()
    batch = plain_batch()
    assert (batch["labels"] == IGNORE_INDEX).any()
    assert_same(model, batch)


@pytest.mark.parametrize("chunk", [64, 3])
def test_packed_rows_equal_the_unchunked_loss(monkeypatch, chunk: int) -> None:
    use_chunks(monkeypatch, chunk)
    assert_same(tiny_model(), packed_batch())


@pytest.mark.parametrize("chunk", [64, 6])
def test_bf16_logits_equal_the_upcast_reference(monkeypatch, chunk: int) -> None:
    use_chunks(monkeypatch, chunk)
    model = tiny_model(torch.bfloat16)
    logits = model(input_ids=plain_batch()["input_ids"]).logits
    assert logits.dtype == torch.bfloat16
    assert_same(model, plain_batch())
    assert_same(model, packed_batch())


def test_default_chunk_covers_a_real_vocabulary() -> None:
    assert evaluate.loss_chunk_tokens(128_256) == 65
    assert evaluate.loss_chunk_tokens(49_152) == 170
    assert evaluate.loss_chunk_tokens(10**9) == 1


def test_no_grad_evaluation_equals_the_reference(monkeypatch) -> None:
    use_chunks(monkeypatch, 4)
    model = tiny_model().eval()
    batch = packed_batch()
    with torch.no_grad():
        loss, count = token_loss_sum(model, batch)
        ref_loss, ref_count = reference_loss_sum(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0.0)
    assert float(count) == float(ref_count)


def test_row_without_targets_gives_zero_loss_and_gradient() -> None:
    logits = torch.randn(1, 1, VOCAB, requires_grad=True)
    loss = chunked_token_loss(logits, torch.zeros(1, 1, dtype=torch.long), 4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(logits.grad.abs().max()) == 0.0


def test_overwritten_logits_refuse_a_second_backward() -> None:
    weight = torch.randn(8, VOCAB, requires_grad=True)
    logits = (torch.randn(1, 6, 8) @ weight).contiguous()
    labels = torch.randint(0, VOCAB, (1, 6))
    loss = chunked_token_loss(logits, labels, 2, overwrite=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def vocabulary_wide_saves(fn: Any, model: Any, batch: dict[str, Any]) -> list[tuple]:
    """Tensors with a vocabulary-sized last dimension that the forward saves for backward,
    other than the model's logits themselves: (dtype, numel) of each."""
    outputs: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, _i, out: outputs.append(out.logits))
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = fn(model, batch)
    finally:
        hook.remove()
    (logits,) = outputs
    # The model's own (its output head's weight) and the logits are not the loss's saves.
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own.add(logits.untyped_storage().data_ptr())
    wide = [
        (t.dtype, t.numel())
        for t in saved
        if t.dim() and t.size(-1) == VOCAB and t.untyped_storage().data_ptr() not in own
    ]
    loss.backward()  # the saved logits are used (and overwritten) only now
    return wide


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_fp32_logits_are_saved_for_backward(monkeypatch, dtype: torch.dtype) -> None:
    use_chunks(monkeypatch, 4)
    model, batch = tiny_model(dtype), plain_batch()
    # The check can fail: the unchunked loss saves its fp32 log-softmax of every position.
    reference = vocabulary_wide_saves(reference_loss_sum, model, batch)
    assert sum(numel for _, numel in reference) >= 2 * (SEQ - 1) * VOCAB
    assert all(saved_dtype == torch.float32 for saved_dtype, _ in reference)
    # Chunked: nothing vocabulary-wide but the logits the model returned, not even per chunk.
    assert vocabulary_wide_saves(token_loss_sum, model, batch) == []


def example_row(generator: torch.Generator, prompt: int, answer: int):
    """A random example: `prompt` masked tokens, then `answer` target tokens."""
    ids = torch.randint(0, VOCAB, (prompt + answer,), generator=generator).tolist()
    return ids, [IGNORE_INDEX] * prompt + ids[prompt:]


def lm_head_widths(model: Any, run: Any) -> list[int]:
    """The positions each output-matrix call saw while run() ran."""
    seen: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].size(1)))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_prompt_positions_never_reach_the_output_matrix() -> None:
    """RAFT rows are mostly prompt: the loss asks only for the logits of the positions that
    predict a target in some row, and loss and gradients stay those of the full logits."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(3)
    batch = collate(
        [example_row(generator, p, a) for p, a in ((30, 6), (22, 9), (41, 4))], pad_id=0
    )
    width = batch["input_ids"].size(1)
    # Targets sit at 30-35, 22-30 and 41-44, so positions 21-34 and 40-43 predict them: the
    # reference computes all 45 positions, token_loss_sum those 18.
    wanted = [*range(21, 35), *range(40, 44)]
    assert evaluate.predicting_positions(batch["labels"]).tolist() == wanted
    assert lm_head_widths(model, lambda: assert_same(model, batch)) == [width, len(wanted)]
    # The loop hands over the positions found on the batch's CPU copy (prefetch.counted), so
    # the device copy's labels are never read back: the given positions are the ones used.
    from raft_dist.data.prefetch import counted

    assert counted(batch).loss_positions.tolist() == wanted
    losses = []

    def both() -> None:
        with torch.no_grad():
            losses.append(token_loss_sum(model, batch, positions=torch.arange(10, width - 1))[0])
            losses.append(token_loss_sum(model, batch)[0])

    assert lm_head_widths(model, both) == [width - 11, len(wanted)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0.0)


def test_packed_rows_keep_only_the_answers_logits() -> None:
    """In a packed row the second example's prompt lies between the answers: its positions are
    skipped too, which a prefix trim could not do."""
    from raft_dist.data.batching import collate_packed

    model = tiny_model()
    generator = torch.Generator().manual_seed(4)
    row = [example_row(generator, 20, 5), example_row(generator, 25, 4)]
    batch = collate_packed([row], pad_id=0)
    # the answers are tokens 20-24 and 50-53 (the second example starts at 25)
    wanted = [*range(19, 24), *range(49, 53)]
    assert evaluate.predicting_positions(batch["labels"]).tolist() == wanted
    widths = lm_head_widths(model, lambda: assert_same(model, batch))
    assert widths == [batch["input_ids"].size(1), len(wanted)]


class IntOnlyLlama(LlamaForCausalLM):
    """Remote code as some repositories write it: `logits_to_keep` sliced as an int only."""

    def forward(self, *args: Any, logits_to_keep: Any = 0, **kwargs: Any) -> Any:
        if not isinstance(logits_to_keep, int):
            raise TypeError("logits_to_keep must be an int here")
        return super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)


def test_models_outside_transformers_keep_a_prefix() -> None:
    """A class from outside transformers gets an int (everything from the first predicting
    position on), never a tensor of positions it might misread."""
    reference = tiny_model()
    model = IntOnlyLlama(reference.config)
    model.load_state_dict(reference.state_dict())
    model.train()
    assert evaluate.takes_logits_to_keep(model)
    assert evaluate.keeps_listed_positions(reference)
    assert not evaluate.keeps_listed_positions(model)
    from raft_dist.packed_attention import use_per_example_attention

    # nor is its attention swapped: its own code might read the placeholder mask as a mask
    assert model.config._attn_implementation == "sdpa"
    assert not use_per_example_attention(model)
    generator = torch.Generator().manual_seed(5)
    batch = collate([example_row(generator, p, a) for p, a in ((12, 3), (7, 5))], pad_id=0)
    width = batch["input_ids"].size(1)
    # first predicting position: 6 (the second row's first target is token 7)
    assert lm_head_widths(model, lambda: assert_same(model, batch)) == [width, width - 6]


def test_wrapped_models_still_trim() -> None:
    """PEFT (get_base_model) and DDP/DeepSpeed (.module) wrappers pass logits_to_keep on."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    wrapper = torch.nn.Module()
    wrapper.module = lora  # the shape of DDP and DeepSpeed's engine
    assert evaluate.takes_logits_to_keep(model)
    assert evaluate.takes_logits_to_keep(lora)
    assert evaluate.takes_logits_to_keep(wrapper)
    batch = plain_batch()
    ref_loss, _, ref_grads = loss_and_grads(reference_loss_sum, lora, batch)
    loss, _, grads = loss_and_grads(token_loss_sum, lora, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0.0)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in name for name in grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_no_target_keeps_one_position() -> None:
    labels = torch.full((2, 7), IGNORE_INDEX)
    assert evaluate.predicting_positions(labels).tolist() == [5]  # predicts label 6
    labels[1, 1] = 5  # the first label is never predicted; the second is, by position 0
    assert evaluate.predicting_positions(labels).tolist() == [0]
