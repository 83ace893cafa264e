"""Greedy generation for evaluation and `ask`: batched, left-padded, KV-cached.

Prompts are tokenized by `encode_prompt`, the function training uses, and padded on the left
by hand, so each row holds exactly the ids the model was trained on (a tokenizer's own batch
padding may add or place special tokens differently). A row stops at EOS or at the end of its
final-answer line: what follows `<ANSWER>: ...\\n` is never scored, and on CPU every extra
token of every row costs time.

On CPU each prompt of a batch is prefilled alone and the caches are joined, left-padded, for
the batched decoding: a CPU computes every padded position of a padded prefill, and prompts of
one batch differ (one evaluation mixes a question with 1 document and the same question with 9).
The decoding stays batched. In the demo's evaluation (bf16, 2 processes of one thread) this took
the base model from 173 s to 130 s and the fine-tuned one from 153 s to 114 s
(bench/prefill_bench.py times the prefill alone). A GPU runs a padded batch in parallel, so it
keeps the one padded prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from raft_dist.data.answers import cut_after_final_answer, extract_final_answer


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 8

    def as_dict(self) -> dict[str, Any]:
        return {"decoding": "greedy", **asdict(self)}


def answer_line_done(text: str) -> bool:
    """The final-answer line is complete: a tag, an answer after it, then a newline."""
    return bool(extract_final_answer(text)) and cut_after_final_answer(text) != text


def _stopper(tokenizer: Any, prompt_len: int) -> Any:
    import torch
    from transformers import StoppingCriteria

    class AnswerLineComplete(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            new = input_ids[:, prompt_len:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            return torch.tensor(
                [answer_line_done(t) for t in texts], dtype=torch.bool, device=input_ids.device
            )

    return AnswerLineComplete()


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _cache_argument(model: Any) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x, `past_key_values`
    before (still accepted, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill_alone(model: Any, rows: Sequence[list[int]]) -> Any | None:
    """A KV cache of the rows' prompts but their last tokens, each row prefilled alone and
    left-padded to the longest (what `generate` continues from: it feeds the last prompt token
    and the mask hides the padding). The caches are built without the model's config, so every
    layer keeps all its positions (a sliding window is applied by the mask, not by the cache).
    None where a prefix did not leave one plain key/value tensor per layer covering every
    position (a model that keeps its cache another way): that batch takes the padded path.
    """
    import inspect

    import torch
    from transformers import DynamicCache

    width = max(len(r) for r in rows) - 1
    extra = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # a prefix's logits are not used
    joined: list[tuple[Any, Any]] = []  # per layer: keys, values (batch, heads, width, dim)
    for index, row in enumerate(rows):
        cache = DynamicCache()
        prefix = torch.tensor([row[:-1]], device=model.device)
        model(input_ids=prefix, use_cache=True, **{_cache_argument(model): cache}, **extra)
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None
        if any(layer.keys.shape[2] != len(row) - 1 for layer in layers):
            return None
        for number, layer in enumerate(layers):
            if number == len(joined):  # keys and values may differ in head size (MLA)
                joined.append(
                    tuple(
                        t.new_zeros((len(rows), t.shape[1], width, t.shape[3]))
                        for t in (layer.keys, layer.values)
                    )
                )
            keys, values = joined[number]
            # Right-aligned: the row's padding comes first, as in `left_pad`.
            keys[index, :, width - (len(row) - 1) :] = layer.keys[0]
            values[index, :, width - (len(row) - 1) :] = layer.values[0]
    batch = DynamicCache()
    for number, (keys, values) in enumerate(joined):
        batch.update(keys, values, number)
    return batch


def use_prefill_alone(model: Any, rows: Sequence[list[int]]) -> bool:
    """CPU only, and only when a row would be padded (a prompt of one token has no prefix)."""
    from transformers import PreTrainedModel

    lengths = {len(r) for r in rows}
    return (
        model.device.type == "cpu"
        and isinstance(model, PreTrainedModel)  # not a PEFT wrapper: its forward differs
        and len(lengths) > 1
        and min(lengths) > 1
    )


def generate_ids(
    model: Any,
    tokenizer: Any,
    rows: Sequence[list[int]],
    max_new_tokens: int,
    *,
    streamer: Any = None,
) -> list[str]:
    """One batch of token-id prompts -> the decoded continuations (answer line cut clean)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.inference_mode():
        prefilled = prefill_alone(model, rows) if use_prefill_alone(model, rows) else None
        cache = {} if prefilled is None else {_cache_argument(model): prefilled}
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # Greedy: sampling knobs a model's generation_config may carry are cleared.
            temperature=None,
            top_p=None,
            top_k=None,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=[_stopper(tokenizer, ids.shape[1])],
            streamer=streamer,
            use_cache=True,
        )
    texts = tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
    return [cut_after_final_answer(t) for t in texts]


def generate_all(
    model: Any,
    tokenizer: Any,
    rows: Sequence[list[int]],
    settings: GenerationSettings,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Outputs in input order for prompts given as token ids (`encode_prompt`). Prompts are
    batched by length, longest first, so a batch holds little padding and the first batch shows
    at once whether memory suffices."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    outputs: list[str] = [""] * len(rows)
    for start in range(0, len(order), settings.batch_size):
        chunk = order[start : start + settings.batch_size]
        texts = generate_ids(model, tokenizer, [rows[i] for i in chunk], settings.max_new_tokens)
        for i, text in zip(chunk, texts, strict=True):
            outputs[i] = text
        if on_batch is not None:
            on_batch(len(chunk))
    return outputs
