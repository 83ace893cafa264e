"""`raft-dist cache`: what the token cache holds (data/token_cache.py), and clearing it."""

from __future__ import annotations

import click


@click.command("cache")
@click.option("--clear", is_flag=True, help="Delete the token cache (runs rebuild it as they go).")
def cache(clear: bool) -> None:
    """Show the token cache: its folder, and per tokenizer its files and size.

    \b
    Training keeps the token ids of RAFT examples there, so that the next run on the same data
    and tokenizer does not tokenize them again (data.token_cache, default on). Move it with
    RAFT_DIST_TOKEN_CACHE (or RAFT_DIST_CACHE); turn it off with data.token_cache=false.
    """
    from raft_dist.data.token_cache import cache_usage, clear_cache, tokens_root

    root = tokens_root()
    if clear:
        freed = clear_cache(root)
        click.echo(f"cleared {root} ({freed / 2**20:.1f} MiB freed)")
        return
    usage = cache_usage(root)
    if not usage:
        click.echo(f"{root}: empty")
        return
    click.echo(f"{root}:")
    for fingerprint, files, size in usage:
        click.echo(f"  tokenizer {fingerprint}  {files} files  {size / 2**20:.1f} MiB")
    click.echo(f"  total {sum(u[2] for u in usage) / 2**20:.1f} MiB  (raft-dist cache --clear)")
