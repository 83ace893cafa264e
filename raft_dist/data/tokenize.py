"""Prompt/completion -> token ids with the loss mask, under an explicit overlong policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


@dataclass
class LengthStats:
    """What the overlong policy did; reported in the run summary so nothing is dropped silently."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"examples": self.examples, "truncated": self.truncated, "dropped": self.dropped}


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids exactly as training sees them; evaluation and `ask` feed the model these
    same ids, so a fine-tuned model is never asked in a layout it was not trained on."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def tokenize_pair(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """The prompt's ids (with the tokenizer's special tokens) and the answer's (without, and
    without EOS): all the tokenizer work of an example, and what data/token_cache.py keeps."""
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return encode_prompt(tokenizer, prompt), answer_ids


def fit_example(
    prompt_ids: list[int],
    answer_ids: list[int],
    *,
    eos_token_id: int | None,
    max_len: int,
    overlong: Literal["truncate", "drop"],
    stats: LengthStats,
) -> Tokenized | None:
    """Mask the prompt (-100) so the loss is on the answer; end the answer with EOS.

    Truncation cuts the answer's end. An example whose prompt alone fills max_len keeps no
    target token and is dropped under either policy (and counted).
    """
    if eos_token_id is not None:
        answer_ids = answer_ids + [eos_token_id]
    ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    if len(ids) > max_len:
        if overlong == "drop" or len(prompt_ids) >= max_len:
            stats.dropped += 1
            return None
        ids, labels = ids[:max_len], labels[:max_len]
        stats.truncated += 1
    stats.examples += 1
    return Tokenized(ids, labels)


def encode_example(
    tokenizer: Any,
    prompt: str,
    completion: str,
    *,
    max_len: int,
    overlong: Literal["truncate", "drop"],
    stats: LengthStats,
) -> Tokenized | None:
    """tokenize_pair, then fit_example."""
    prompt_ids, answer_ids = tokenize_pair(tokenizer, prompt, completion)
    return fit_example(
        prompt_ids,
        answer_ids,
        eos_token_id=tokenizer.eos_token_id,
        max_len=max_len,
        overlong=overlong,
        stats=stats,
    )


def encode_text_line(tokenizer: Any, line: str, *, new_document: bool) -> list[int]:
    """Plain-text fine-tuning: every token is a target; documents are joined by EOS."""
    ids = tokenizer(line, add_special_tokens=False)["input_ids"]
    if new_document and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id] + ids
    return ids
