"""Evaluation: the token loss shared with training, and the held-out loss of a run."""

from __future__ import annotations

import functools
import math
from typing import Any

from raft_dist.data.tokenize import IGNORE_INDEX
from raft_dist.distributed import sum_over_ranks

# The loss is computed over chunks of this many logits (tokens x vocabulary), so the fp32
# temporaries of one chunk (its upcast logits, log-softmax and their gradients, about four
# tensors) stay near 4 x 32 MiB whatever the vocabulary: 65 tokens at Llama 3's 128k, 170 at
# SmolLM2's 49k, 256 at 32k. Unchunked, a 2k-token row at 128k holds 1 GiB per fp32 tensor.
# Smaller chunks only add a Python step per chunk (~0.1 ms against ~5 ms of softmax each).
LOSS_CHUNK_ELEMENTS = 1 << 23


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per loss chunk for a vocabulary: LOSS_CHUNK_ELEMENTS logits, at least one token."""
    return max(1, LOSS_CHUNK_ELEMENTS // max(vocab_size, 1))


def _loss_spans(rows: int, targets: int, chunk: int) -> list[tuple[int, int, int]]:
    """(row, start, stop) over the positions that predict a next token, chunk by chunk."""
    return [
        (row, start, min(start + chunk, targets))
        for row in range(rows)
        for start in range(0, targets, chunk)
    ]


@functools.cache
def _chunked_loss_function() -> Any:
    """The autograd Function behind chunked_token_loss (built on first use: torch is imported
    lazily, so that importing this module stays cheap)."""
    import torch
    import torch.nn.functional as F

    def chunk_loss(piece: Any, target: Any) -> Any:
        return F.cross_entropy(piece, target, ignore_index=IGNORE_INDEX, reduction="sum")

    class ChunkedTokenLoss(torch.autograd.Function):
        """Summed cross entropy of logits[:, :T] against targets (B, T), one chunk at a time:
        T = L - 1 for the next-token targets of full logits (the last position predicts
        nothing), T = L for logits taken only at the predicting positions.

        Forward keeps nothing of a chunk but its loss; backward recomputes each chunk's
        log-softmax from the saved logits (the model's dtype) and writes that chunk's gradient.
        Plain chunking under autograd would save every chunk's fp32 log-softmax, i.e. the full
        fp32 tensor again; this saves only the logits the model already produced.
        """

        @staticmethod
        def forward(ctx: Any, logits: Any, targets: Any, chunk: int, overwrite: bool) -> Any:
            total = torch.zeros((), dtype=torch.float64, device=logits.device)
            spans = _loss_spans(logits.size(0), targets.size(1), chunk)
            for row, start, stop in spans:
                piece = logits[row, start:stop].float()
                total += chunk_loss(piece, targets[row, start:stop])
            ctx.save_for_backward(logits, targets)
            ctx.spans, ctx.overwrite, ctx.done = spans, overwrite, False
            return total.float()

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> Any:
            if not ctx.needs_input_grad[0]:
                return None, None, None, None
            if ctx.overwrite and ctx.done:
                raise RuntimeError(
                    "chunked token loss: the logits were overwritten by their gradient in the "
                    "first backward; a second backward through it is not possible"
                )
            logits, targets = ctx.saved_tensors
            # Overwriting: each chunk's gradient depends on that chunk's logits only, so it can
            # take their place; the full-size gradient then costs no memory of its own.
            grad = logits if ctx.overwrite else torch.empty_like(logits)
            grad[:, targets.size(1) :].zero_()  # the last position predicts nothing
            for row, start, stop in ctx.spans:
                # The same kernels as the unchunked loss (log-softmax, nll, their backward),
                # applied to fewer rows: the gradient matches it, then is cast back as .float()'s
                # backward would.
                piece = logits[row, start:stop].detach().float().requires_grad_()
                with torch.enable_grad():
                    loss = chunk_loss(piece, targets[row, start:stop])
                    (piece_grad,) = torch.autograd.grad(loss, piece, grad_total)
                grad[row, start:stop].copy_(piece_grad)
            ctx.done = True
            return grad, None, None, None

    return ChunkedTokenLoss


def chunked_token_loss(
    logits: Any, labels: Any, chunk_tokens: int | None = None, *, overwrite: bool = False
) -> Any:
    """Summed next-token cross entropy of (B, L, V) logits against labels shifted by one, in
    fp32, computed over chunks of chunk_tokens positions (default: loss_chunk_tokens(V)).

    overwrite=True lets backward write the logits' gradient into the logits tensor itself,
    chunk by chunk: only for logits nothing else reads afterwards (token_loss_sum's own).
    """
    chunk = chunk_tokens or loss_chunk_tokens(logits.size(-1))
    return _chunked_loss_function().apply(logits, labels[:, 1:], chunk, overwrite)


def model_logits(model: Any, batch: dict[str, Any], keep: Any = None) -> Any:
    """The model's (B, L, V) logits for a batch, plain or packed; with `keep` (a 1D tensor of
    positions, or an int: the last positions), only those positions' logits: the model then
    never multiplies the other positions' hidden states by its output matrix."""
    kwargs = {} if keep is None else {"logits_to_keep": keep}
    if "sequence_ids" in batch:  # packed rows: examples apart (packed_attention.py)
        from raft_dist.packed_attention import packed_model_inputs

        return model(**packed_model_inputs(model, batch), **kwargs).logits
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
    ).logits


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def unwrapped(model: Any) -> Any:
    """The causal LM inside model's wrappers (DDP or a DeepSpeed engine: .module; PEFT:
    get_base_model(), which passes every keyword on)."""
    for _ in range(4):
        inner = getattr(model, "module", None)
        if inner is None and hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        if inner is None or inner is model:
            break
        model = inner
    return model


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM inside model's wrappers accepts `logits_to_keep`."""
    return _forward_takes_logits_to_keep(type(unwrapped(model)))


def keeps_listed_positions(model: Any) -> bool:
    """Whether `logits_to_keep` may be a tensor of positions: transformers' own model classes
    take one (since 4.49, where the keyword appeared). Remote code may only slice with an int,
    `hidden[:, -keep:]`, which a tensor would break or, with one position, silently misread."""
    return type(unwrapped(model)).__module__.startswith("transformers.")


def predicting_positions(labels: Any) -> Any:
    """The positions whose logits predict a target token (labels shifted by one) in any row,
    as a 1D index tensor on labels' device; when there is none, the last position that
    predicts a label at all (the graph then still reaches every parameter, with zero
    gradients). Rows of at least two tokens."""
    import torch

    found = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if found.numel():
        return found
    return torch.tensor([labels.size(1) - 2], dtype=torch.long, device=labels.device)


def token_loss_sum(
    model: Any, batch: dict[str, Any], *, trim: bool = True, positions: Any = None
) -> tuple[Any, Any]:
    """Summed next-token cross entropy over target tokens, in fp32, and their count.

    A sum, not a mean: the caller divides by the target tokens of the whole accumulation window
    across ranks, so every token weighs the same whatever batch it fell into. The loss is taken
    chunk by chunk (chunked_token_loss), never upcasting all logits at once: unchunked, a
    2k-token row at a 128k vocabulary holds 1 GiB of fp32 logits plus as much for backward.

    trim: logits only at the positions that predict a target in some row (`logits_to_keep`
    with an index tensor, where the model takes it). A RAFT prompt (documents and question) is
    most of a row and is never a target, so its output-matrix products and its log-softmax
    over the vocabulary (forward and backward) were pure waste: SmolLM2's output matrix is a
    fifth of its forward FLOPs. In a packed row the later examples' prompts sit between
    answers, so positions, not a prefix, are what can be skipped. The loss and every gradient
    are the same; only the work on ignored positions goes. Off for fixed-shape torch.compile,
    where each new count would be a recompile. `positions`: predicting_positions of the batch's
    labels, if the caller found them on a CPU copy (found from labels on a GPU, they would
    wait for the device once per call).
    """
    import torch

    labels = batch["labels"]
    targets = labels[:, 1:]
    count = (targets != IGNORE_INDEX).sum().to(torch.float64)
    # The model's output is ours alone (the model object returned with it is dropped here), so
    # backward may overwrite the logits with their gradient.
    if trim and labels.size(1) > 1 and takes_logits_to_keep(model):
        if positions is None:
            positions = predicting_positions(labels)
        if keeps_listed_positions(model):
            logits = model_logits(model, batch, positions)
            chunk = loss_chunk_tokens(logits.size(-1))
            loss = _chunked_loss_function().apply(logits, targets[:, positions], chunk, True)
            return loss, count
        # An int keeps the last positions: everything from the first predicting one on.
        first = int(positions[0])
        logits = model_logits(model, batch, labels.size(1) - first)
        return chunked_token_loss(logits, labels[:, first:], overwrite=True), count
    loss = chunked_token_loss(model_logits(model, batch), labels, overwrite=True)
    return loss, count


def target_count(batch: dict[str, Any]) -> float:
    """Tokens the loss is computed on: labels shifted by one, as in token_loss_sum."""
    return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate_loss(
    accelerator: Any, model: Any, stream: Any, pad: dict, max_batches: int | None
) -> dict[str, float]:
    """Token-weighted loss over the held-out split; ranks step in lockstep until all are done
    (a rank whose part ended feeds a zero-weight padding batch, so no collective hangs)."""
    import torch

    model.eval()
    stream.start_epoch(0)
    loss_sum, tokens, batches = 0.0, 0.0, 0
    with torch.no_grad():
        while max_batches is None or batches < max_batches:
            batch = stream.next_batch()
            (any_left,) = sum_over_ranks(accelerator, [1.0 if batch is not None else 0.0])
            if any_left == 0:
                break
            feed = {k: v.to(accelerator.device) for k, v in (batch or pad).items()}
            loss, count = token_loss_sum(model, feed)
            if batch is not None:
                loss_sum += float(loss)
                tokens += float(count)
            batches += 1
    model.train()
    total_loss, total_tokens = sum_over_ranks(accelerator, [loss_sum, tokens])
    mean = total_loss / max(total_tokens, 1.0)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens}
