#!/usr/bin/env python3
"""Build the small RAFT demo data set in data/demo/ from data/demo_source/.

Deterministic (random.Random(1234)), standard library only.  Run from anywhere:

    python data/build_demo.py

Reads the 24 markdown documents and qa.json in data/demo_source/, turns every
question/answer pair into one RAFT record (oracle document + distractors,
chain-of-thought answer quoting the oracle), splits by source document into
train (20 documents) and eval (4 documents), writes JSONL shards plus
manifest.json atomically, re-reads and checks everything, and exits non-zero
with a message if any check fails.
"""

import hashlib
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(HERE, "demo_source")
OUT_DIR = os.path.join(HERE, "demo")

SEED = 1234
NUM_DISTRACTORS = 3
P_ORACLE = 0.8
NUM_EVAL_DOCS = 4
TRAIN_SHARDS = 3
GENERATOR_NAME = "data/build_demo.py"

BEGIN_QUOTE = "##begin_quote##"
END_QUOTE = "##end_quote##"
ANSWER_TAG = "<ANSWER>:"
FINAL_LINE = (
    "Answer with a chain of thought that quotes the documents between "
    "##begin_quote## and ##end_quote##, then give the final answer after <ANSWER>:."
)

# First sentence of the chain of thought; {q} is the question as an embedded clause.
COT_OPENERS = [
    "To answer the question, look for the passage that tells {q}.",
    "To answer the question, look for the document that says {q}.",
    "To answer this, look for the sentence that states {q}.",
    "To find the answer, look for the part of the documents that explains {q}.",
]

FUNCTION_WORDS = {
    "what",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "why",
    "how",
    "in",
    "on",
    "at",
    "for",
    "about",
    "since",
    "until",
    "with",
    "during",
    "under",
    "the",
    "a",
    "an",
    "from",
    "to",
    "by",
    "of",
}

SLUG_RE = re.compile(r"^\d\d-[a-z0-9-]+\.md$")


class BuildError(Exception):
    pass


def fail(msg):
    raise BuildError(msg)


# --------------------------------------------------------------------------- sources


def readable_slug(name):
    slug = name[3:-3] if SLUG_RE.match(name) else os.path.splitext(name)[0]
    return slug.replace("-", " ").strip().capitalize()


def load_documents():
    names = sorted(n for n in os.listdir(SRC_DIR) if SLUG_RE.match(n))
    if not names:
        fail(f"no NN-slug.md documents found in {SRC_DIR}")
    docs = {}
    for name in names:
        with open(os.path.join(SRC_DIR, name), encoding="utf-8") as f:
            lines = f.read().splitlines()
        title = None
        body = []
        for line in lines:
            s = line.strip()
            if not s:
                continue
            if title is None and not body and s.startswith("#"):
                title = s.lstrip("#").strip()
                continue
            if s.startswith("#"):
                s = s.lstrip("#").strip()
            body.append(s)
        text = re.sub(r"\s+", " ", " ".join(body)).strip()
        if not text:
            fail(f"{name}: empty document body")
        docs[name] = {"title": title or readable_slug(name), "text": text}
    texts = [d["text"] for d in docs.values()]
    if len(set(texts)) != len(texts):
        fail("two source documents have identical text")
    return names, docs


def load_qa(docs):
    with open(os.path.join(SRC_DIR, "qa.json"), encoding="utf-8") as f:
        qa = json.load(f)
    if not isinstance(qa, list) or not qa:
        fail("qa.json must be a non-empty list")
    for i, item in enumerate(qa):
        where = f"qa.json[{i}]"
        for key in ("doc", "question", "quote", "answer"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                fail(f"{where}: missing or empty '{key}'")
        if item["doc"] not in docs:
            fail(f"{where}: unknown document {item['doc']!r}")
        if item["quote"] not in docs[item["doc"]]["text"]:
            fail(f"{where}: quote is not verbatim in {item['doc']}: {item['quote']!r}")
        if item["answer"] not in item["quote"]:
            fail(f"{where}: answer {item['answer']!r} is not inside its quote")
        if not item["question"].endswith("?"):
            fail(f"{where}: question does not end with '?'")
    return qa


# --------------------------------------------------------------------------- records


def embedded_question(question):
    q = question.strip().rstrip("?").strip()
    first = q.split(" ", 1)[0]
    if first.lower() in FUNCTION_WORDS:
        q = q[0].lower() + q[1:]
    return q


def render_instruction(documents, question):
    lines = [f"<DOCUMENT>{d['title']}: {d['text']}</DOCUMENT>" for d in documents]
    lines.append(f"Question: {question}")
    lines.append(FINAL_LINE)
    return "\n".join(lines)


def make_record(rng, item, docs, pool_names):
    oracle_name = item["doc"]
    pool = [n for n in pool_names if n != oracle_name]
    with_oracle = rng.random() < P_ORACLE
    if with_oracle:
        chosen = [oracle_name] + rng.sample(pool, NUM_DISTRACTORS)
    else:
        chosen = rng.sample(pool, NUM_DISTRACTORS + 1)
    rng.shuffle(chosen)
    documents = [{"title": docs[n]["title"], "text": docs[n]["text"]} for n in chosen]
    oracle_index = chosen.index(oracle_name) if with_oracle else None
    opener = rng.choice(COT_OPENERS).format(q=embedded_question(item["question"]))
    cot = (
        f"{opener} The relevant passage says: {BEGIN_QUOTE} {item['quote']} {END_QUOTE} "
        f"Therefore the answer is {item['answer']}.\n{ANSWER_TAG} {item['answer']}"
    )
    return {
        "id": None,  # assigned after shuffling
        "question": item["question"],
        "documents": documents,
        "oracle_index": oracle_index,
        "oracle": docs[oracle_name]["text"],
        "cot_answer": cot,
        "instruction": render_instruction(documents, item["question"]),
        "meta": {"source": oracle_name},
    }


def shard_sizes(n, k):
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


# --------------------------------------------------------------------------- output


def dump_line(record):
    return json.dumps(record, ensure_ascii=False) + "\n"


def atomic_write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_split(split, records, sizes):
    split_dir = os.path.join(OUT_DIR, split)
    os.makedirs(split_dir, exist_ok=True)
    shards = []
    start = 0
    for i, size in enumerate(sizes):
        rel = f"{split}/shard-{i:05d}.jsonl"
        data = "".join(dump_line(r) for r in records[start : start + size]).encode("utf-8")
        atomic_write(os.path.join(OUT_DIR, rel), data)
        shards.append({"path": rel, "records": size, "sha256": hashlib.sha256(data).hexdigest()})
        start += size
    expected = {os.path.basename(s["path"]) for s in shards}
    for name in sorted(os.listdir(split_dir)):  # drop stale shards from older builds
        if re.match(r"^shard-\d{5}\.jsonl$", name) and name not in expected:
            os.remove(os.path.join(split_dir, name))
    return {"records": len(records), "shards": shards}


# --------------------------------------------------------------------------- checks


def check_record(rec, docs, where):
    documents = rec["documents"]
    texts = [d["text"] for d in documents]
    if len(documents) != NUM_DISTRACTORS + 1:
        fail(f"{where}: expected {NUM_DISTRACTORS + 1} documents, got {len(documents)}")
    if len(set(texts)) != len(texts):
        fail(f"{where}: duplicate documents")
    oracle = rec["oracle"]
    if oracle != docs[rec["meta"]["source"]]["text"]:
        fail(f"{where}: oracle text does not match its source document")
    oi = rec["oracle_index"]
    if oi is None:
        if oracle in texts:
            fail(f"{where}: oracle_index is null but the oracle is among the documents")
    else:
        if texts[oi] != oracle:
            fail(f"{where}: documents[oracle_index] is not the oracle")
        if texts.count(oracle) != 1:
            fail(f"{where}: the oracle appears among the distractors")
    m = re.search(
        re.escape(BEGIN_QUOTE) + r" (.*?) " + re.escape(END_QUOTE), rec["cot_answer"], re.S
    )
    if not m:
        fail(f"{where}: cot_answer has no quote")
    quote = m.group(1)
    if quote not in oracle:
        fail(f"{where}: quote is not verbatim in the oracle")
    tail = rec["cot_answer"].rsplit("\n" + ANSWER_TAG + " ", 1)
    if len(tail) != 2 or not tail[1]:
        fail(f"{where}: cot_answer does not end with '{ANSWER_TAG} <answer>'")
    if tail[1] not in quote:
        fail(f"{where}: answer {tail[1]!r} is not inside its quote")
    if rec["instruction"] != render_instruction(documents, rec["question"]):
        fail(f"{where}: instruction does not match documents and question")


def verify(manifest, docs, eval_doc_names):
    eval_texts = {docs[n]["text"] for n in eval_doc_names}
    seen_ids = set()
    for split, info in manifest["splits"].items():
        count = 0
        for shard in info["shards"]:
            path = os.path.join(OUT_DIR, shard["path"])
            with open(path, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                fail(f"{shard['path']}: sha256 mismatch")
            if not data.endswith(b"\n"):
                fail(f"{shard['path']}: does not end with a newline")
            lines = data.decode("utf-8").splitlines()
            if len(lines) != shard["records"]:
                fail(f"{shard['path']}: {len(lines)} lines, manifest says {shard['records']}")
            for ln, line in enumerate(lines, 1):
                rec = json.loads(line)
                where = f"{shard['path']}:{ln} ({rec.get('id')})"
                if rec["id"] in seen_ids:
                    fail(f"{where}: duplicate id")
                seen_ids.add(rec["id"])
                check_record(rec, docs, where)
                src = rec["meta"]["source"]
                if split == "train":
                    if src in eval_doc_names:
                        fail(f"{where}: train record built from eval document {src}")
                    used = {d["text"] for d in rec["documents"]} | {rec["oracle"]}
                    if used & eval_texts:
                        fail(f"{where}: an eval oracle document appears in a train record")
                elif src not in eval_doc_names:
                    fail(f"{where}: eval record built from train document {src}")
                count += 1
        if count != info["records"]:
            fail(f"split {split}: {count} records, manifest says {info['records']}")


# --------------------------------------------------------------------------- main


def build():
    names, docs = load_documents()
    qa = load_qa(docs)
    rng = random.Random(SEED)

    eval_docs = sorted(rng.sample(names, NUM_EVAL_DOCS))
    train_docs = [n for n in names if n not in eval_docs]
    if len(train_docs) < NUM_DISTRACTORS + 2:
        fail("not enough train documents to draw distractors from")

    train, evals = [], []
    for item in qa:
        if item["doc"] in eval_docs:
            evals.append(make_record(rng, item, docs, names))
        else:
            train.append(make_record(rng, item, docs, train_docs))
    rng.shuffle(train)
    rng.shuffle(evals)
    for i, rec in enumerate(train + evals, 1):
        rec["id"] = f"demo-{i:04d}"

    manifest = {
        "format": "raft",
        "version": 1,
        "generator": {
            "name": GENERATOR_NAME,
            "seed": SEED,
            "num_distractors": NUM_DISTRACTORS,
            "p_oracle": P_ORACLE,
        },
        "splits": {
            "train": write_split("train", train, shard_sizes(len(train), TRAIN_SHARDS)),
            "eval": write_split("eval", evals, [len(evals)]),
        },
    }
    data = (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    atomic_write(os.path.join(OUT_DIR, "manifest.json"), data)

    verify(manifest, docs, set(eval_docs))
    missing = sum(1 for r in train + evals if r["oracle_index"] is None)
    print(
        f"wrote {OUT_DIR}: train {len(train)} records in "
        f"{len(manifest['splits']['train']['shards'])} shards "
        f"{[s['records'] for s in manifest['splits']['train']['shards']]}, "
        f"eval {len(evals)} records; {missing} records without the oracle; "
        f"eval documents: {', '.join(eval_docs)}"
    )


def main():
    try:
        build()
    except BuildError as e:
        print(f"build_demo.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
