"""Attention for packed rows (data.packing): examples in one row never see each other.

Two ways, one result (tests/test_packing.py checks both against the examples run unpacked):

- the block-diagonal mask (`block_causal_mask`), a (B, 1, L, L) mask every kernel reads.
  The kernel still computes every row's full L x L scores and throws most away: a 2048-token
  row of eight examples does eight times the attention work it needs.
- per-example attention (`use_per_example_attention`): the model's attention is swapped for
  one that runs SDPA causally on each example's own span of the row, so the work is the sum
  of the examples' squares, not the row's. This is what flash-attention's varlen kernel does
  on a GPU; on the CPU, where no such kernel exists, it is what makes packing pay
  (bench/packing_bench.py). The training loop turns it on for packed runs on the CPU with
  SDPA attention (the default) and without torch.compile (each batch's spans would be a new
  graph). Calls without spans (unpacked batches, generation) go to plain SDPA with
  transformers' own SDPA mask, so the swapped model stays correct for everything else.

Neither way narrows attention to a sliding or chunked window (Mistral, Gemma 3, Llama 4), so
packing such a model is refused unless no example can outgrow its window (`check_packing`).

Both ways rely on the model's code: restarted `position_ids` must reach its positions, the 4D
mask its attention, and the spans (a keyword) every attention call. A model class that drops
any of them (StableLM's layers do not pass keywords on to attention, so the spans never arrive)
would silently train examples that see each other. `verify_packing` therefore runs the model
itself on a probe before training: two short examples packed in a row, and each alone. Per-
example attention that fails it falls back to the block mask; a block mask that fails it stops
the run.
"""

from __future__ import annotations

from typing import Any

from raft_dist.data.batching import block_causal_mask

PER_EXAMPLE = "raft_dist_per_example_sdpa"  # the registered attn_implementation
SPANS_KWARG = "packed_spans"  # travels from the model's forward to every attention call
PROBE_LENGTHS = (6, 9)  # verify_packing's two examples: short, so the probe costs ~nothing
# Largest |packed - alone| logit difference allowed, relative to the largest logit: float32 runs
# agree to ~1e-6 when examples are kept apart, bf16 to ~2e-2 (SmolLM2); a neighbour seen by
# mistake moves them by ~0.5.
PROBE_TOLERANCE = {"float32": 1e-3, "other": 0.1}

Spans = list[list[tuple[int, int, bool]]]  # per row: (start, end, is_example)


def packed_model_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The forward's keywords for a packed batch: restarted positions, no cache, and either the
    example spans (per-example attention) or the block mask in the kernel's form."""
    from raft_dist.evaluate import unwrapped

    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    config = getattr(unwrapped(model), "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == PER_EXAMPLE:
        import torch

        # The spans say who attends to whom. transformers passes a 4D mask through untouched,
        # so this (B, 1, 1, 1) placeholder only stops it from building a (B, 1, L, L) block
        # mask per forward that nothing would read (3-4 % of a tiny-model step at 1k tokens).
        ids = batch["sequence_ids"]
        inputs["attention_mask"] = torch.ones((ids.size(0), 1, 1, 1), dtype=torch.bool)
        inputs[SPANS_KWARG] = example_spans(ids)
    else:
        inputs["attention_mask"] = block_mask_for(implementation, batch["sequence_ids"])
    return inputs


def block_mask_for(implementation: str | None, sequence_ids: Any) -> Any:
    """The block-diagonal mask in the form the kernel reads. transformers hands a 4D mask to
    the kernel as it is: SDPA and flex read a boolean one, but eager adds the mask to the
    attention scores, where True/False would add 1/0 and let every example see the others."""
    import torch

    mask = block_causal_mask(sequence_ids)
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    return mask


def example_spans(sequence_ids: Any) -> Spans:
    """Per row, the runs of equal example ids as (start, end, is_example); padding (id -1)
    makes a run with is_example False. Read on the host: the loop uses spans on the CPU only."""
    import torch

    ids = sequence_ids.cpu()
    width = ids.size(1)
    out: Spans = []
    for row in ids:
        starts = [0, *((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist()]
        ends = [*starts[1:], width]
        firsts = row[torch.tensor(starts)].tolist()
        out.append([(s, e, first >= 0) for s, e, first in zip(starts, ends, firsts, strict=True)])
    return out


def per_example_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention signature: query (B, heads, L, D), key and value (B, kv_heads,
    L, D); returns (B, L, heads, D). With spans, SDPA runs causally on each example alone and
    padding gets zeros (no target reads a padding position, and nothing attends to one)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = kwargs.pop(SPANS_KWARG, None)
    if spans is None:
        if attention_mask is not None and attention_mask.shape[-2:] == (1, 1) and query.size(2) > 1:
            # packed_model_inputs' placeholder: a packed row whose spans the model's layers did
            # not pass on. Plain SDPA would read it as "everything sees everything".
            raise RuntimeError(
                f"{type(module).__name__} does not pass keywords on to its attention function, "
                "so per-example attention cannot see where packed examples start"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # What plain causal SDPA on a span cannot apply must not be dropped silently.
    unsupported = [k for k in ("softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    window = kwargs.get("sliding_window")
    if window is not None and any(e - s > window for row in spans for s, e, _ in row):
        unsupported.append(f"sliding_window={window} (an example is longer)")
    if unsupported:
        raise RuntimeError(
            f"per-example attention cannot apply {', '.join(unsupported)}; train this model "
            "without data.packing"
        )
    rows = []
    # unbind and split, not indexing: their backward is one stack and one cat, where each
    # indexed slice's backward would write a zero-filled tensor of the whole input.
    for row, q, k, v in zip(spans, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
        sizes = [end - start for start, end, _ in row]
        parts = []
        pieces = zip(row, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), strict=True)
        for (start, end, is_example), q_part, k_part, v_part in pieces:
            if not is_example:
                parts.append(query.new_zeros(1, end - start, query.size(1), value.size(-1)))
                continue
            out, _ = sdpa_attention_forward(
                module,
                q_part[None],
                k_part[None],
                v_part[None],
                None,
                dropout=dropout,
                scaling=scaling,
                is_causal=True,
            )
            parts.append(out)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PER_EXAMPLE, per_example_attention)
    # Unpacked calls need transformers' SDPA mask (padding, causality); without a registered
    # mask function transformers would build none at all for an unknown implementation.
    AttentionMaskInterface.register(PER_EXAMPLE, sdpa_mask)


def use_per_example_attention(model: Any) -> bool:
    """Swap the model's SDPA attention for per-example attention; False (nothing changed) when
    the model does not run SDPA, is not one of transformers' own classes (remote code may not
    dispatch through the attention interface, and would then read the placeholder mask), or
    transformers is too old for registered attention functions. The swap is not saved:
    config.json does not record it."""
    from raft_dist.evaluate import unwrapped

    inner = unwrapped(model)
    if getattr(getattr(inner, "config", None), "_attn_implementation", None) != "sdpa":
        return False
    if not type(inner).__module__.startswith("transformers."):
        return False
    try:
        _register()
        inner.set_attn_implementation(PER_EXAMPLE)
    except (ImportError, AttributeError):  # before AttentionMaskInterface/set_attn_implementation
        return False
    return inner.config._attn_implementation == PER_EXAMPLE


def local_attention_window(model: Any) -> int | None:
    """The narrowest window of the model's local-attention layers (sliding or chunked), None
    when every layer attends to the whole sequence."""
    from raft_dist.evaluate import unwrapped

    config = getattr(unwrapped(model), "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    windows = [
        w
        for w in (
            getattr(config, "sliding_window", None),
            getattr(config, "attention_chunk_size", None),
        )
        if isinstance(w, int) and w > 0
    ]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        local = any(
            kind != "full_attention" and ("sliding" in kind or "chunk" in kind)
            for kind in layer_types
        )
        return min(windows) if local and windows else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return min(windows) if windows else None


def check_packing(model: Any, max_seq_len: int, name: str) -> None:
    """Packed rows keep examples apart but cannot narrow attention to a sliding or chunked
    window: neither the block mask nor per-example SDPA carries it, so a local layer would see
    further back than it was trained to. Exact when no example can exceed the window."""
    from raft_dist.errors import ConfigError

    window = local_attention_window(model)
    if window is not None and window < max_seq_len:
        raise ConfigError(
            f"data.packing=true: {name} attends within a {window}-token window on some "
            f"layers, shorter than data.max_seq_len={max_seq_len}, and packed attention does "
            f"not apply that window; set data.max_seq_len <= {window}, or use "
            "data.group_by_length instead of packing"
        )


def verify_packing(model: Any, name: str, device: Any) -> str:
    """Check on the model itself that a packed row keeps its examples apart, before training.

    Every rank runs it (a ZeRO-3 forward gathers parameters from all of them) on the same
    probe. Returns the way packed rows run ("per-example" or "block mask"); per-example
    attention that fails the probe is switched back to SDPA with the block mask, and a model
    that fails with the block mask too raises a ConfigError: training it packed would let
    examples see each other, or would not run.
    """
    from raft_dist.errors import ConfigError
    from raft_dist.evaluate import unwrapped

    inner = unwrapped(model)
    if inner.config._attn_implementation == PER_EXAMPLE:
        problem = _probe(model, device)
        if problem is None:
            return "per-example"
        import logging

        logging.getLogger("raft_dist").warning(
            "data.packing: per-example attention does not work for %s (%s); packed rows use "
            "the block-diagonal mask instead",
            name,
            problem,
        )
        inner.set_attn_implementation("sdpa")
    problem = _probe(model, device)
    if problem is not None:
        raise ConfigError(
            f"data.packing=true: {name} ({inner.config.model_type}) fails the check that packed "
            f"examples stay apart: {problem}; train it with data.packing=false "
            "(data.group_by_length also saves padding)"
        )
    return "block mask"


def _probe(model: Any, device: Any) -> str | None:
    """None when a packed batch gives each example the logits it gets alone; else what
    differed. Rows: [a, b] and [b, padding], so both a neighbour and padding are tried."""
    import torch

    from raft_dist.data.batching import collate, collate_packed
    from raft_dist.evaluate import model_logits, unwrapped

    vocab = unwrapped(model).config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, vocab, (n,), generator=generator).tolist() for n in PROBE_LENGTHS)
    packed = collate_packed([[(a, a), (b, b)], [(b, b)]], pad_id=0)
    was_training = model.training
    model.eval()  # no dropout: the two runs must be the same function
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            raw = model_logits(model, {k: v.to(device) for k, v in packed.items()})
            alone = [
                model_logits(
                    model, {k: v.to(device) for k, v in collate([(x, x)], pad_id=0).items()}
                ).float()[0]
                for x in (a, b)
            ]
    except Exception as exc:  # the model's own code refusing packed inputs
        return f"a packed forward fails: {type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    # Tight only where every number is float32: under autocast the logits come out 16-bit.
    exact = raw.dtype == torch.float32 and all(
        p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point()
    )
    kind = "float32" if exact else "other"
    rows = raw.float()
    pairs = [
        (rows[0, : len(a)], alone[0]),
        (rows[0, len(a) :], alone[1]),
        (rows[1, : len(b)], alone[1]),
    ]
    scale = max(float(want.abs().max()) for _, want in pairs) or 1.0
    worst = max(float((got - want).abs().max()) for got, want in pairs) / scale
    if worst > PROBE_TOLERANCE[kind]:
        return (
            f"a packed row's logits differ from the same examples run alone by {worst:.2g} of "
            f"their scale (allowed {PROBE_TOLERANCE[kind]:g})"
        )
    return None
