"""Train the byte-level BPE tokenizer that the built-in tiny models use (raft_dist/assets).

Trained on the demo corpus plus the prompt template, so RAFT prompts tokenize into few tokens.
Byte-level: any text encodes, nothing maps to <unk>. Rebuild with
`python data/build_tiny_tokenizer.py` (deterministic for a given `tokenizers` version).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from raft_dist.data.prompts import INSTRUCTION

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "raft_dist" / "assets" / "tiny-tokenizer"
EOS, PAD = "<|endoftext|>", "<|pad|>"


def corpus() -> list[str]:
    texts = [
        p.read_text(encoding="utf-8") for p in sorted((ROOT / "data/demo_source").glob("*/*.md"))
    ]
    texts.append(
        INSTRUCTION
        + " <DOCUMENT> </DOCUMENT> Question: Answer: ##begin_quote## ##end_quote## <ANSWER>:"
    )
    return texts


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD
    )
    wrapped.model_max_length = 2048
    wrapped.save_pretrained(OUT)
    print(f"wrote {OUT} ({len(wrapped)} tokens)")


if __name__ == "__main__":
    main()
