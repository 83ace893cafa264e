"""`raft-dist ask`: answer a question from documents, or chat with a fine-tune interactively."""

from __future__ import annotations

import sys

import click

from raft_dist.cli_eval import device_option, dtype_option
from raft_dist.errors import ConfigError


@click.command("ask")
@click.argument("question", required=False)
@click.option(
    "--model",
    required=True,
    help="Model folder, hub id or builtin:smollm2, optionally +ADAPTER_FOLDER.",
)
@click.option(
    "--doc",
    "docs",
    multiple=True,
    type=click.Path(exists=True),
    help="A document (.txt, .md, .jsonl, .pdf) or folder to answer from; repeatable.",
)
@click.option(
    "--corpus",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A folder of documents; BM25 picks the --top-k chunks closest to each question.",
)
@click.option("--top-k", type=int, default=4, show_default=True, help="Chunks given to the model.")
@click.option(
    "--chunk-size",
    type=int,
    default=1200,
    show_default=True,
    help="Chunk length in characters, as in `generate` (use the value the data was made with).",
)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@dtype_option
@device_option
@click.option(
    "--stream/--no-stream", default=True, show_default=True, help="Print tokens as they come."
)
def ask(
    question: str | None,
    model: str,
    docs: tuple[str, ...],
    corpus: str | None,
    top_k: int,
    chunk_size: int,
    max_new_tokens: int,
    dtype: str,
    device: str,
    stream: bool,
) -> None:
    """Answer QUESTION from documents the way the model was trained (RAFT prompt), printing the
    answer, its quotes and the document each came from. Without QUESTION: a prompt loop.
    Without --doc/--corpus the question alone is the prompt (plain-text fine-tunes).

    \b
    Examples:
      raft-dist ask --model builtin:smollm2+runs/demo/final --corpus data/demo_source/trained \\
          "Who keeps the Corran Point light?"
      raft-dist ask --model runs/full/final --doc notes.md
    """
    from raft_dist.ask import answer_question, describe, interactive, library_from
    from raft_dist.evaluation.models import ModelCache, ModelSpec, pick_dtype
    from raft_dist.model import pick_device

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    spec = ModelSpec.parse(model)
    library = library_from(docs, corpus, chunk_size)
    target = pick_device(device)
    cache = ModelCache(target, pick_dtype(dtype, target))
    with cache.use(spec) as (loaded, tokenizer):

        def ask_one(text: str) -> None:
            documents = library.documents_for(text, top_k) if library is not None else ()
            result = answer_question(
                loaded,
                tokenizer,
                text,
                documents,
                max_new_tokens,
                stream=sys.stdout if stream else None,
            )
            if not stream:
                click.echo(result.output)
            summary = describe(result)
            if summary:
                click.echo(summary)

        if question:
            ask_one(question)
        else:
            interactive(ask_one)
