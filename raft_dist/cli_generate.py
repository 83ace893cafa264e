"""`raft-dist generate` and `raft-dist validate`. Registered on the main group in cli.py;
the work is imported inside the commands so `raft-dist --help` stays instant."""

from __future__ import annotations

import click


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: manifest.json plus train/ and eval/ shards.",
)
@click.option(
    "--backend",
    default="template",
    show_default=True,
    help="Question generator. template: offline and deterministic, questions from the "
    "chunk's own sentences.",
)
@click.option(
    "--chunk-size",
    type=int,
    default=1200,
    show_default=True,
    help="Maximum chunk length in CHARACTERS (at least 100). Chunks end at sentence "
    "boundaries; only a sentence longer than this is cut.",
)
@click.option(
    "--chunk-overlap",
    type=int,
    default=0,
    show_default=True,
    help="Sentences repeated from the end of the previous chunk.",
)
@click.option("--questions-per-chunk", type=int, default=3, show_default=True)
@click.option(
    "--distractors",
    type=click.Choice(["random", "bm25"]),
    default="random",
    show_default=True,
    help="random chunks, or the chunks most similar to the question by BM25.",
)
@click.option("--num-distractors", type=int, default=3, show_default=True)
@click.option(
    "--p-oracle",
    type=float,
    default=0.8,
    show_default=True,
    help="Probability that the oracle is among the documents; otherwise one more distractor "
    "takes its place (oracle_index null).",
)
@click.option(
    "--eval-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Share of chunks (or questions, with --split-by question) held out for eval.",
)
@click.option(
    "--split-by",
    type=click.Choice(["chunk", "question"]),
    default="chunk",
    show_default=True,
    help="chunk: no eval oracle appears anywhere in train. question: eval questions may share "
    "chunks with train ones.",
)
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Records per shard.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--overwrite", is_flag=True, help="Replace a data set in --out made with other settings."
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate(
    sources: tuple[str, ...],
    out: str,
    backend: str,
    chunk_size: int,
    chunk_overlap: int,
    questions_per_chunk: int,
    distractors: str,
    num_distractors: int,
    p_oracle: float,
    eval_fraction: float,
    split_by: str,
    shard_size: int,
    seed: int,
    overwrite: bool,
    progress: bool,
) -> None:
    """Build a RAFT data set from SOURCES (.txt, .md, .jsonl with a "text" field, or folders).

    An interrupted run resumes where it stopped when started again with the same settings, and
    writes the same bytes as an uninterrupted run. A finished data set is left alone.

    \b
    Examples:
      raft-dist generate docs/ --out data/mydocs
      raft-dist generate notes.md faq.jsonl --out data/qa --distractors bm25 --seed 7
    """
    from raft_dist.generate.pipeline import GenerateOptions
    from raft_dist.generate.pipeline import generate as run_generate

    options = GenerateOptions(
        backend=backend,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        questions_per_chunk=questions_per_chunk,
        distractors=distractors,  # type: ignore[arg-type]
        num_distractors=num_distractors,
        p_oracle=p_oracle,
        eval_fraction=eval_fraction,
        split_by=split_by,  # type: ignore[arg-type]
        shard_size=shard_size,
        seed=seed,
    )
    result = run_generate(sources, out, options, overwrite=overwrite, progress=progress)
    click.echo(result.summary())


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
