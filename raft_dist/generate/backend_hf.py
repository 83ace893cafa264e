"""`--backend hf`: questions and answers written by a local causal LM.

The model is a folder, a hub id or a built-in (`builtin:smollm2` is the bundled
SmolLM2-135M-Instruct and works offline). Prompts go through the tokenizer's chat template when
it has one. Decoding is greedy unless a temperature is given; sampling is then seeded from the
chunk's own generator, so a resumed run writes the same records as an uninterrupted one.
torch and transformers are imported when the model is first needed, never at import time.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from typing import Any

from raft_dist.errors import ConfigError
from raft_dist.generate.chunking import Chunk
from raft_dist.generate.questions import (
    DROP_REASONS,
    QA,
    Answered,
    Job,
    Messages,
    answer_chunk,
)

DEFAULT_MODEL = "builtin:smollm2"
DEVICES = ("auto", "cpu", "cuda", "mps")


class HfBackend:
    """A transformers causal LM on one device; answers of one chunk are generated as a batch."""

    name = "hf"
    drop_reasons = DROP_REASONS

    def __init__(
        self,
        model: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        device: str = "auto",
    ) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise ConfigError(f"--temperature must be 0 or more, got {temperature}")
        if device not in DEVICES and not device.startswith("cuda:"):
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)} or cuda:N")
        self.model_name = model or DEFAULT_MODEL
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device_name = device
        self._model: Any = None
        self._tokenizer: Any = None
        self._seed: int | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """What changes the output; the device is left out so a resume may move devices."""
        return {
            "model": self.model_name,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }

    # ---- the Backend protocol

    def questions(self, chunk: Chunk, count: int, rng: random.Random) -> list[QA]:
        return self._answer(chunk, count, rng)[0]

    def ask_many(self, jobs: Iterable[Job]) -> Iterator[Answered]:
        for chunk, count, rng in jobs:
            pairs, dropped = self._answer(chunk, count, rng)
            yield Answered(chunk, rng, pairs, dropped)

    def _answer(
        self, chunk: Chunk, count: int, rng: random.Random
    ) -> tuple[list[QA], dict[str, int]]:
        # Draw the sampling seed before any work, so the chunk's generator advances the same
        # way whatever the model says.
        self._seed = rng.getrandbits(32) if self.temperature > 0 else None
        return answer_chunk(self._complete, chunk, count)

    # ---- the model

    def _load(self) -> None:
        import torch

        from raft_dist.config import ModelConfig
        from raft_dist.model import load_model, load_tokenizer, pick_device

        device = pick_device(self.device_name)
        dtype = "float32"
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            dtype = "bfloat16"
        cfg = ModelConfig(name_or_path=self.model_name, dtype=dtype)  # type: ignore[arg-type]
        tokenizer = load_tokenizer(cfg)
        tokenizer.padding_side = "left"  # generation continues at the right edge
        torch.manual_seed(0)  # built-in models are random: the same weights on every run
        model = load_model(cfg, tokenizer).to(device)
        model.eval()
        self._tokenizer, self._model = tokenizer, model

    def _texts(self, prompts: list[Messages]) -> tuple[list[str], bool]:
        """Prompt strings, and whether special tokens still have to be added."""
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            texts = [
                tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                for m in prompts
            ]
            return texts, False
        return ["\n\n".join(turn["content"] for turn in m) + "\n\n" for m in prompts], True

    def _complete(self, prompts: list[Messages]) -> list[str]:
        import torch

        if self._model is None:
            self._load()
        tokenizer, model = self._tokenizer, self._model
        texts, special = self._texts(prompts)
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special).to(
            model.device
        )
        config = copy.deepcopy(model.generation_config)
        config.max_new_tokens = self.max_new_tokens
        config.pad_token_id = tokenizer.pad_token_id
        config.do_sample = self.temperature > 0
        if config.do_sample:
            config.temperature = self.temperature
            torch.manual_seed(self._seed or 0)
        else:
            config.temperature, config.top_p, config.top_k = None, None, None
        with torch.inference_mode():
            output = model.generate(**batch, generation_config=config)
        new = output[:, batch["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new, skip_special_tokens=True)
