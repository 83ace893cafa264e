"""`raft-dist generate`, `raft-dist validate` and `raft-dist convert`. Registered on the main
group in cli.py; the work is imported inside the commands so `raft-dist --help` stays instant."""

from __future__ import annotations

from typing import Any

import click

from raft_dist.errors import ConfigError

# Model options and the backends they belong to (any other backend refuses them, so a typo in
# --backend cannot silently fall back to templates).
_MODEL_OPTIONS = {
    "model": ("hf", "openai"),
    "max_new_tokens": ("hf", "openai"),
    "temperature": ("hf", "openai"),
    "device": ("hf",),
    "base_url": ("openai",),
    "api_key": ("openai",),
    "max_retries": ("openai",),
    "concurrency": ("openai",),
    "timeout": ("openai",),
    "allow_insecure_http": ("openai",),
}
CONVERT_FORMATS = (
    "raft",
    "raft_paper",
    "instruction",
    "prompt_completion",
    "chat",
    "parquet",
    "datasets",
)


# Options shared by `generate` and `pipeline` (which generates as its first stage).
_GENERATION_OPTIONS = [
    click.option(
        "--backend",
        type=click.Choice(["template", "hf", "openai"]),
        default="template",
        show_default=True,
        help="Question generator. template: offline and deterministic, questions from the "
        "chunk's own sentences. hf: a local causal LM. openai: any OpenAI-compatible chat "
        "completions server. Model answers without a final <ANSWER>: or with a quote that is not "
        "verbatim in the chunk are dropped and counted.",
    ),
    click.option(
        "--model",
        default=None,
        help="hf: model folder, hub id or builtin:smollm2 (default). openai: model name "
        "(default: $RAFT_DIST_OPENAI_MODEL).",
    ),
    click.option(
        "--max-new-tokens", type=int, default=None, help="hf/openai: reply length limit [512]."
    ),
    click.option(
        "--temperature",
        type=float,
        default=None,
        help="hf/openai: sampling temperature [0: greedy].",
    ),
    click.option("--device", default=None, help="hf: auto (default), cpu, cuda, cuda:N or mps."),
    click.option(
        "--base-url",
        default=None,
        help="openai: server URL ending before /chat/completions "
        "(default: $OPENAI_BASE_URL, else https://api.openai.com/v1).",
    ),
    click.option("--api-key", default=None, help="openai: API key (default: $OPENAI_API_KEY)."),
    click.option(
        "--max-retries",
        type=int,
        default=None,
        help="openai: retries on 429, 5xx and timeouts, with exponential backoff [5].",
    ),
    click.option("--concurrency", type=int, default=None, help="openai: requests at once [8]."),
    click.option(
        "--timeout", type=float, default=None, help="openai: seconds to wait for a reply [60]."
    ),
    click.option(
        "--allow-insecure-http",
        is_flag=True,
        default=None,  # None when absent, so other backends do not see it as given
        help="openai: allow sending the API key over plain http:// to a host other than "
        "localhost (refused by default: the key would cross the network unencrypted).",
    ),
    click.option(
        "--chunk-size",
        type=int,
        default=1200,
        show_default=True,
        help="Maximum chunk length in CHARACTERS (at least 100). Chunks end at sentence "
        "boundaries; only a sentence longer than this is cut.",
    ),
    click.option(
        "--chunk-overlap",
        type=int,
        default=0,
        show_default=True,
        help="Sentences repeated from the end of the previous chunk.",
    ),
    click.option("--questions-per-chunk", type=int, default=3, show_default=True),
    click.option(
        "--distractors",
        type=click.Choice(["random", "bm25"]),
        default="random",
        show_default=True,
        help="random chunks, or the chunks most similar to the question by BM25.",
    ),
    click.option("--num-distractors", type=int, default=3, show_default=True),
    click.option(
        "--p-oracle",
        type=float,
        default=0.8,
        show_default=True,
        help="Probability that the oracle is among the documents; otherwise one more distractor "
        "takes its place (oracle_index null).",
    ),
    click.option(
        "--eval-fraction",
        type=float,
        default=0.1,
        show_default=True,
        help="Share of chunks (or questions, with --split-by question) held out for eval.",
    ),
    click.option(
        "--split-by",
        type=click.Choice(["chunk", "question"]),
        default="chunk",
        show_default=True,
        help="chunk: no eval oracle appears anywhere in train. question: eval questions may share "
        "chunks with train ones.",
    ),
    click.option(
        "--shard-size", type=int, default=1000, show_default=True, help="Records per shard."
    ),
    click.option("--seed", type=int, default=0, show_default=True),
]


def generation_options(command: Any) -> Any:
    """Apply the generation options to a click command (in their --help order)."""
    for option in reversed(_GENERATION_OPTIONS):
        command = option(command)
    return command


def generation_settings(params: dict[str, Any]) -> tuple[Any, Any]:
    """(GenerateOptions, backend) from the parsed generation options; pops them from `params`
    so a caller keeps only its own."""
    from raft_dist.generate.backends import make_backend
    from raft_dist.generate.pipeline import GenerateOptions

    backend = params.pop("backend")
    options = GenerateOptions(
        backend=backend,
        chunk_size=params.pop("chunk_size"),
        chunk_overlap=params.pop("chunk_overlap"),
        questions_per_chunk=params.pop("questions_per_chunk"),
        distractors=params.pop("distractors"),
        num_distractors=params.pop("num_distractors"),
        p_oracle=params.pop("p_oracle"),
        eval_fraction=params.pop("eval_fraction"),
        split_by=params.pop("split_by"),
        shard_size=params.pop("shard_size"),
        seed=params.pop("seed"),
    )
    model_options = {name: params.pop(name) for name in _MODEL_OPTIONS}
    return options, make_backend(backend, **_backend_config(backend, model_options))


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: manifest.json plus train/ and eval/ shards.",
)
@generation_options
@click.option(
    "--overwrite", is_flag=True, help="Replace a data set in --out made with other settings."
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate(
    sources: tuple[str, ...], out: str, overwrite: bool, progress: bool, **params: Any
) -> None:
    """Build a RAFT data set from SOURCES (.txt, .md, .jsonl with a "text" field, or folders).

    An interrupted run resumes where it stopped when started again with the same settings, and
    writes the same bytes as an uninterrupted run. A finished data set is left alone.

    \b
    Examples:
      raft-dist generate docs/ --out data/mydocs
      raft-dist generate notes.md faq.jsonl --out data/qa --distractors bm25 --seed 7
      raft-dist generate docs/ --out data/llm --backend hf --model builtin:smollm2
      raft-dist generate docs/ --out data/api --backend openai \\
          --base-url http://localhost:8000/v1 --model my-model --concurrency 16
    """
    from raft_dist.generate.pipeline import generate as run_generate

    options, backend = generation_settings(params)
    result = run_generate(
        sources, out, options, overwrite=overwrite, progress=progress, backend=backend
    )
    click.echo(result.summary())


def _backend_config(backend: str, given: dict[str, Any]) -> dict[str, Any]:
    """The model options that were given, refusing those the backend does not take."""
    config = {name: value for name, value in given.items() if value is not None}
    for name in config:
        if backend not in _MODEL_OPTIONS[name]:
            flag = "--" + name.replace("_", "-")
            takers = " and ".join(_MODEL_OPTIONS[name])
            raise ConfigError(f"{flag} applies to --backend {takers}, not {backend}")
    return config


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--tokenizer",
    default=None,
    help="Report lengths in tokens of this tokenizer (folder, hub id or builtin:...); "
    "characters by default.",
)
def validate(paths: tuple[str, ...], tokenizer: str | None) -> None:
    """Check a RAFT data set folder (manifest hashes and counts) or JSONL files.

    Reports every bad record as file:line (schema, duplicate ids, quotes not verbatim in the
    oracle, eval oracles inside train) and describes the set: records, achieved P(oracle),
    distractors per record, length distribution. Exits non-zero on any error.
    """
    from raft_dist.generate.validate_set import describe, raise_on_errors
    from raft_dist.generate.validate_set import validate as run_validate

    report = run_validate(paths, tokenizer=tokenizer)
    click.echo(describe(report))
    for line in report.errors:
        click.echo(line, err=True)
    raise_on_errors(report)
    click.echo("ok")


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--to",
    "fmt",
    required=True,
    type=click.Choice(CONVERT_FORMATS),
    help="raft: native RAFT JSONL. raft_paper: the RAFT paper's JSONL. instruction: "
    "instruction/output JSONL. prompt_completion, chat: JSONL. parquet: Parquet. datasets: "
    "a Hugging Face datasets folder (save_to_disk).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="A file (.jsonl, or .parquet for --to parquet) gets all splits in one file; any "
    "other path becomes a folder with one part per split (train/, eval/).",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def convert(inputs: tuple[str, ...], fmt: str, out: str, overwrite: bool) -> None:
    """Convert RAFT data between formats.

    INPUTS are data set folders (manifest + train/eval), folders or files of JSONL in any format
    the trainer reads (chat included), .json arrays of records, Parquet files, or datasets
    folders. Splits are kept.
    Converting back to raft restores every record the target format could hold: raft_paper
    drops "meta"; instruction, prompt_completion and chat hold only the rendered prompt and
    the answer (documents, oracle and question are not separate any more), and come back as
    prompt/completion records.

    \b
    Examples:
      raft-dist convert data/demo --to chat --out data/demo-chat
      raft-dist convert data/demo --to parquet --out demo.parquet
      raft-dist convert hub-export/ --to raft --out data/imported
      raft-dist convert alpaca_data.json --to raft --out alpaca.jsonl
    """
    from raft_dist.generate.convert import convert as run_convert

    result = run_convert(inputs, fmt, out, overwrite=overwrite)
    click.echo(result.summary())
