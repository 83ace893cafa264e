#!/usr/bin/env python3
"""Build the demo's hand-written RAFT data set in data/demo/ from data/demo_source/.

Deterministic (random.Random(1234)).  Run from anywhere with the project installed:

    python data/build_demo.py

Reads the markdown documents in data/demo_source/trained/ (20, the domain the demo
fine-tunes on) and data/demo_source/unseen/ (4, never trained on) and the 120
hand-written question/answer pairs in qa.json, turns every pair into one RAFT record
(oracle chunk + distractor chunks, chain-of-thought answer quoting the oracle) and
writes three splits:

  train   3 questions per trained document (60)
  eval    the other 2 questions per trained document (40): held-out questions on
          documents the model was trained on (RAFT's setting: known domain, new questions)
  unseen  the 20 questions on the unseen documents: documents never trained on

The documents a record shows are chunks, cut by the same chunker and chunk size as
the demo's `raft-dist generate --chunk-size 500` (about one paragraph each): the
hand-written and the generated examples then show the model the same units of text,
and so does `raft-dist ask --corpus` on these folders.

JSONL shards plus manifest.json are written atomically, re-read and checked
(no held-out question and no unseen document in train); exits non-zero with a
message if any check fails.
"""

import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project's chunker, also from a bare checkout

from raft_dist.generate.chunking import load_corpus  # noqa: E402

SRC_DIR = os.path.join(HERE, "demo_source")
GROUPS = ("trained", "unseen")  # sub-folders of SRC_DIR
OUT_DIR = os.path.join(HERE, "demo")

SEED = 1234
CHUNK_SIZE = 500  # characters; the Makefile's DEMO_PIPELINE passes the same --chunk-size
NUM_DISTRACTORS = 3
P_ORACLE = 0.8
HELD_OUT_PER_DOC = 2  # of the 5 questions per trained document
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
    """name -> {title, text, group}; group is the sub-folder (trained or unseen)."""
    located = []
    for group in GROUPS:
        folder = os.path.join(SRC_DIR, group)
        located += [(n, group) for n in sorted(os.listdir(folder)) if SLUG_RE.match(n)]
    names = sorted(n for n, _ in located)
    if not names:
        fail(f"no NN-slug.md documents found in {SRC_DIR}/{{{','.join(GROUPS)}}}")
    if len(set(names)) != len(names):
        fail("a document name is used in two groups")
    docs = {}
    for name, group in located:
        with open(os.path.join(SRC_DIR, group, name), encoding="utf-8") as f:
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
        docs[name] = {"title": title or readable_slug(name), "text": text, "group": group}
    texts = [d["text"] for d in docs.values()]
    if len(set(texts)) != len(texts):
        fail("two source documents have identical text")
    return names, docs


def load_chunks(docs):
    """'NAME#i' -> {title, text, group}: the chunks `raft-dist generate` cuts from each document."""
    chunks = {}
    for name, doc in docs.items():
        path = Path(SRC_DIR, doc["group"], name)
        for i, chunk in enumerate(load_corpus([path], CHUNK_SIZE).chunks):
            chunks[f"{name}#{i}"] = {
                "title": chunk.title,
                "text": chunk.text,
                "group": doc["group"],
            }
    return chunks


def place_quotes(qa, chunks):
    """Each question's oracle is the one chunk of its document that holds its quote."""
    for i, item in enumerate(qa):
        holders = [
            n
            for n in chunks
            if n.startswith(item["doc"] + "#") and item["quote"] in chunks[n]["text"]
        ]
        if len(holders) != 1:
            fail(f"qa.json[{i}]: quote found in {len(holders)} chunks of {item['doc']}, not 1")
        item["chunk"] = holders[0]


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
    oracle_name = item["chunk"]
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


def verify(manifest, docs, held_out_questions):
    """Every record is well formed, and the splits keep apart what the demo measures: no
    held-out question and no unseen document (as oracle or distractor) in train."""
    unseen_texts = {d["text"] for d in docs.values() if d["group"] == "unseen"}
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
                group = docs[rec["meta"]["source"]]["group"]
                if split == "train":
                    if group != "trained":
                        fail(f"{where}: train record about an unseen document")
                    used = {d["text"] for d in rec["documents"]} | {rec["oracle"]}
                    if used & unseen_texts:
                        fail(f"{where}: an unseen document appears in a train record")
                    if rec["question"] in held_out_questions:
                        fail(f"{where}: a held-out question is in train")
                elif split == "eval" and (
                    group != "trained" or rec["question"] not in held_out_questions
                ):
                    fail(f"{where}: eval must hold held-out questions on trained documents")
                elif split == "unseen" and group != "unseen":
                    fail(f"{where}: unseen record about a trained document")
                count += 1
        if count != info["records"]:
            fail(f"split {split}: {count} records, manifest says {info['records']}")


# --------------------------------------------------------------------------- main


def build():
    names, docs = load_documents()
    qa = load_qa(docs)
    chunks = load_chunks(docs)
    place_quotes(qa, chunks)
    rng = random.Random(SEED)
    trained = [n for n in names if docs[n]["group"] == "trained"]
    trained_chunks = [n for n in chunks if chunks[n]["group"] == "trained"]
    if len(trained_chunks) < NUM_DISTRACTORS + 2:
        fail("not enough trained chunks to draw distractors from")

    by_doc = {}
    for item in qa:
        by_doc.setdefault(item["doc"], []).append(item)
    held_out = set()
    for name in trained:
        questions = [item["question"] for item in by_doc.get(name, [])]
        if len(questions) <= HELD_OUT_PER_DOC:
            fail(f"{name}: needs more than {HELD_OUT_PER_DOC} questions in qa.json")
        held_out.update(rng.sample(questions, HELD_OUT_PER_DOC))

    splits = {"train": [], "eval": [], "unseen": []}
    for item in qa:
        if docs[item["doc"]]["group"] == "unseen":
            # Distractors from every document: only the oracle must be new to the model.
            splits["unseen"].append(make_record(rng, item, chunks, list(chunks)))
        elif item["question"] in held_out:
            splits["eval"].append(make_record(rng, item, chunks, trained_chunks))
        else:
            splits["train"].append(make_record(rng, item, chunks, trained_chunks))
    number = 0
    for records in splits.values():
        rng.shuffle(records)
        for rec in records:
            number += 1
            rec["id"] = f"demo-{number:04d}"

    manifest = {
        "format": "raft",
        "version": 1,
        "generator": {
            "name": GENERATOR_NAME,
            "seed": SEED,
            "num_distractors": NUM_DISTRACTORS,
            "chunk_size": CHUNK_SIZE,
            "p_oracle": P_ORACLE,
            "held_out_per_document": HELD_OUT_PER_DOC,
            # Held-out questions share their documents with train questions by design.
            "settings": {"split_by": "question"},
        },
        "splits": {
            "train": write_split(
                "train", splits["train"], shard_sizes(len(splits["train"]), TRAIN_SHARDS)
            ),
            "eval": write_split("eval", splits["eval"], [len(splits["eval"])]),
            "unseen": write_split("unseen", splits["unseen"], [len(splits["unseen"])]),
        },
    }
    data = (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    atomic_write(os.path.join(OUT_DIR, "manifest.json"), data)

    verify(manifest, chunks, held_out)
    counts = ", ".join(f"{split} {len(records)}" for split, records in splits.items())
    missing = sum(1 for r in sum(splits.values(), []) if r["oracle_index"] is None)
    unseen = sorted(n for n in names if docs[n]["group"] == "unseen")
    print(
        f"wrote {OUT_DIR}: {counts} records; {missing} without the oracle; "
        f"unseen documents: {', '.join(unseen)}"
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
