"""`raft-dist generate` speed and memory on a synthetic corpus (template backend).

    python bench/generate_bench.py            # 20 MB corpus, random and bm25 distractors
    python bench/generate_bench.py --big      # 200 MB corpus (target: peak memory under 1 GB)
    python bench/generate_bench.py --mb 5 --methods random --json out.json

Each measurement runs in a fresh subprocess pinned to one core, so peak memory (max RSS) is that
run's alone. Throughput is examples written per second of the whole run: reading, chunking,
indexing, generating and writing. The corpus is Zipf-distributed made-up words in markdown files
of about 100 KB, built in a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

TARGET_EXAMPLES_PER_S = 2000
TARGET_BIG_PEAK_MB = 1024
FILE_BYTES = 100_000
AUX = ("is", "was", "has", "had", "can", "will")


def vocabulary(rng: random.Random, size: int) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def make_corpus(root: Path, megabytes: float, seed: int = 0) -> int:
    """Markdown files with a heading and paragraphs of sentences; returns the bytes written."""
    rng = random.Random(seed)
    words = vocabulary(rng, 30_000)
    rng.shuffle(words)
    cumulative, total = [], 0.0
    for rank in range(1, len(words) + 1):
        total += 1.0 / rank**1.07
        cumulative.append(total)
    root.mkdir(parents=True, exist_ok=True)
    budget, written, index = int(megabytes * 1_000_000), 0, 0
    while written < budget:
        bag = iter(rng.choices(words, cum_weights=cumulative, k=20_000))
        parts = [f"# {next(bag).capitalize()} {next(bag)}\n"]
        size = 0
        while size < FILE_BYTES:
            sentences = []
            for _ in range(rng.randint(3, 8)):
                body = " ".join(next(bag) for _ in range(rng.randint(5, 22)))
                number = f" in {rng.randint(1700, 2024)}" if rng.random() < 0.3 else ""
                sentences.append(
                    f"The {next(bag)} {next(bag)} {rng.choice(AUX)} {body}{number} "
                    f"near the {next(bag)}."
                )
            paragraph = " ".join(sentences)
            parts.append(paragraph)
            size += len(paragraph) + 2
        text = "\n\n".join(parts) + "\n"
        (root / f"doc-{index:05d}.md").write_text(text, encoding="utf-8")
        written += len(text)
        index += 1
    return written


def child(corpus: str, out: str, method: str) -> None:
    """One measured run; prints a JSON line."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from raft_dist.generate.pipeline import GenerateOptions, generate

    start = time.perf_counter()
    first: list[float] = []

    def on_chunk(done: int) -> None:
        if done == 1:
            first.append(time.perf_counter() - start)

    result = generate(
        [corpus], out, GenerateOptions(distractors=method), progress=False, on_chunk=on_chunk
    )
    seconds = time.perf_counter() - start
    splits = result.manifest["splits"]
    records = sum(info["records"] for info in splits.values())
    out_bytes = sum(p.stat().st_size for p in Path(out).rglob("*.jsonl"))
    print(
        json.dumps(
            {
                "method": method,
                "chunks": result.manifest["generator"]["stats"]["chunks"],
                "records": records,
                "setup_s": first[0] if first else seconds,
                "seconds": seconds,
                "examples_per_s": records / seconds,
                "peak_rss_mb": common.peak_rss_bytes() / common.MIB,
                "output_mb": out_bytes / 1e6,
            }
        )
    )


def measure(corpus: Path, method: str, workdir: Path) -> dict:
    out = workdir / f"out-{method}"
    command = [sys.executable, __file__, "--child", str(corpus), str(out), method]
    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=common.ROOT)
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"{method} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(corpus_mb: float, rows: list[dict], big: bool) -> str:
    header = (
        f"{'corpus':>8} {'distractors':>11} {'chunks':>8} {'examples':>9} {'setup s':>8} "
        f"{'total s':>8} {'ex/s':>7} {'peak MB':>8} {'out MB':>8}  verdict"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        checks = []
        if row["method"] == "random":
            ok = row["examples_per_s"] >= TARGET_EXAMPLES_PER_S
            checks.append(f"ex/s >= {TARGET_EXAMPLES_PER_S}: {'ok' if ok else 'MISSED'}")
        if big:
            ok = row["peak_rss_mb"] < TARGET_BIG_PEAK_MB
            checks.append(f"peak < {TARGET_BIG_PEAK_MB} MB: {'ok' if ok else 'MISSED'}")
        lines.append(
            f"{corpus_mb:>6.0f}MB {row['method']:>11} {row['chunks']:>8} {row['records']:>9} "
            f"{row['setup_s']:>8.1f} {row['seconds']:>8.1f} {row['examples_per_s']:>7.0f} "
            f"{row['peak_rss_mb']:>8.0f} {row['output_mb']:>8.0f}  {'; '.join(checks)}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="200 MB corpus instead of 20 MB")
    parser.add_argument("--mb", type=float, default=None, help="corpus size in MB")
    parser.add_argument("--methods", default="random,bm25")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--child", nargs=3, metavar=("CORPUS", "OUT", "METHOD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    megabytes = args.mb or (200.0 if args.big else 20.0)
    with tempfile.TemporaryDirectory(prefix="raft-gen-bench-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        size = make_corpus(workdir / "corpus", megabytes)
        print(f"corpus: {size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s", flush=True)
        rows = []
        for method in args.methods.split(","):
            rows.append(measure(workdir / "corpus", method, workdir))
            print(f"{method}: done in {rows[-1]['seconds']:.1f} s", flush=True)
    print(table(size / 1e6, rows, args.big or megabytes >= 200))
    if args.json:
        common.write_json(Path(args.json), {"corpus_mb": size / 1e6, "runs": rows})


if __name__ == "__main__":
    main()
