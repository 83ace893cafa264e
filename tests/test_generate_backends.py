"""Model backends of `raft-dist generate` (openai against a local chat completions server, hf with
a tiny random model), `raft-dist convert` round trips, and PDF sources."""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path

import pytest

from raft_dist.data.reader import iter_records
from raft_dist.data.records import Example, RaftRecord, to_example
from raft_dist.errors import DataError, RaftDistError
from raft_dist.generate.backends import make_backend
from raft_dist.generate.convert import FORMATS, convert
from raft_dist.generate.pipeline import GenerateOptions, generate
from raft_dist.generate.questions import check_answer, parse_questions
from raft_dist.generate.validate_set import validate

TOPICS = ("harbour", "orchard", "observatory", "bakery", "railway", "museum")
NOUNS = "crane ladder lens oven signal gallery bell cart lamp gate".split()
PLACES = "pier barn dome cellar junction hall square bridge mill quay".split()


def write_sources(root: Path) -> Path:
    """Six short markdown documents of distinct declarative sentences (two chunks each at 200
    characters)."""
    rng = random.Random(5)
    root.mkdir(parents=True, exist_ok=True)
    for i, topic in enumerate(TOPICS):
        sentences = [
            f"The {topic} {rng.choice(NOUNS)} has {rng.randint(2, 90)} parts near the "
            f"{rng.choice(PLACES)} since {1800 + 7 * i + k}."
            for k in range(6)
        ]
        text = f"# The {topic}\n\n" + " ".join(sentences) + "\n"
        (root / f"{i:02d}-{topic}.md").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sources(tmp_path_factory.mktemp("sources") / "docs")


OPTIONS = dict(
    chunk_size=200,
    questions_per_chunk=2,
    num_distractors=2,
    eval_fraction=0.2,
    shard_size=10,
    seed=1,
)


def run_main(*args: str) -> int:
    """The real CLI entry point in-process (errors become `error: ...` and exit code 2)."""
    from raft_dist.cli import cli, main
    from raft_dist.cli_generate import convert as convert_command
    from raft_dist.cli_generate import generate as generate_command

    for command in (generate_command, convert_command):
        cli.commands.setdefault(command.name, command)
    return main(list(args))


def shards(out: Path) -> dict[str, bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        split: b"".join((out / s["path"]).read_bytes() for s in info["shards"])
        for split, info in manifest["splits"].items()
    }


def stats(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["generator"]["stats"]


# --------------------------------------------------------------------------- a chat server


class FakeChat:
    """An OpenAI-compatible chat completions server on 127.0.0.1 that answers from the prompt:
    numbered questions, then answers quoting a sentence of the document verbatim. Some answers
    are bad on purpose (by a hash of the prompt, so reruns agree): no <ANSWER>: tag, or a quote
    that is not in the document. `script` lists what the first requests get instead
    ("500", "429", "sleep": reply only after `sleep` seconds)."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        script: tuple[str, ...] = (),
        api_key: str | None = None,
        sleep: float = 1.0,
        always: str | None = None,
    ) -> None:
        self.delay, self.script, self.api_key = delay, list(script), api_key
        self.sleep, self.always = sleep, always
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.served: Counter = Counter()
        self.no_answer: set[str] = set()
        self.bad_quote: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, user: str) -> str:
        document = re.search(r"<DOCUMENT>(.*?)</DOCUMENT>", user, re.S)
        assert document is not None, user
        wanted = re.search(r"Write (\d+) different questions", user)
        if wanted:
            title = re.search(r"Document title: (.*)", user)
            about = title.group(1) if title else "it"
            count = int(wanted.group(1))
            return "\n".join(
                f"{k}. What does sentence {k} about {about} say?" for k in range(1, count + 1)
            )
        question = re.search(r"\nQuestion: (.*)\n", user)
        assert question is not None, user
        k = int(re.search(r"sentence (\d+)", question.group(1)).group(1))
        sentences = [s.strip() for s in re.findall(r"[^.!?]+[.!?]", document.group(1))]
        sentence = sentences[(k - 1) % len(sentences)]
        kind = zlib.crc32(user.encode()) % 5
        with self.lock:
            if kind == 0:
                self.no_answer.add(user)
                return f"The text says {sentence} and nothing more."
            if kind == 1:
                self.bad_quote.add(user)
                return f"##begin_quote## {sentence} (paraphrased) ##end_quote##\n<ANSWER>: no"
        first = sentence.split()[1]
        return (
            f"The text says ##begin_quote## {sentence} ##end_quote## which names the {first}.\n"
            f"<ANSWER>: {first}\nAnything after the answer line is cut off."
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        chat = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers["Content-Length"])
                request = json.loads(self.rfile.read(length))
                if chat.api_key and self.headers.get("Authorization") != f"Bearer {chat.api_key}":
                    self.send(401, {"error": {"message": "Incorrect API key provided"}})
                    return
                with chat.lock:
                    action = chat.script.pop(0) if chat.script else chat.always or "ok"
                    chat.served[action] += 1
                    chat.in_flight += 1
                    chat.max_in_flight = max(chat.max_in_flight, chat.in_flight)
                try:
                    time.sleep(chat.delay)
                    if action in ("500", "429"):
                        status, payload = int(action), {"error": {"message": "try again"}}
                    else:
                        if action == "sleep":
                            time.sleep(chat.sleep)
                        assert request["model"] == "fake-model" and request["temperature"] == 0.0
                        content = chat.reply(request["messages"][-1]["content"])
                        message = {"role": "assistant", "content": content}
                        status, payload = 200, {"choices": [{"index": 0, "message": message}]}
                finally:
                    # Before the reply is written: once the client has it, it may send the
                    # next request before this thread gets to run again.
                    with chat.lock:
                        chat.in_flight -= 1
                self.send(status, payload)

        return Handler


@pytest.fixture
def server_factory() -> Iterator:
    servers: list[FakeChat] = []

    def start(**kwargs: object) -> FakeChat:
        servers.append(FakeChat(**kwargs))  # type: ignore[arg-type]
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def openai_backend(server: FakeChat, **kwargs: object):
    config = dict(model="fake-model", base_url=server.url, timeout=5.0, backoff=0.01)
    config.update(kwargs)
    return make_backend("openai", **config)


def run_openai(sources: Path, out: Path, server: FakeChat, **kwargs: object):
    options = GenerateOptions(backend="openai", **OPTIONS)  # type: ignore[arg-type]
    return generate([str(sources)], out, options, backend=openai_backend(server, **kwargs))


@pytest.fixture(scope="module")
def reference(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One request at a time, no failures: the output every other run must reproduce."""
    server = FakeChat()
    try:
        out = tmp_path_factory.mktemp("openai") / "reference"
        run_openai(sources, out, server, concurrency=1)
    finally:
        server.close()
    return out


# --------------------------------------------------------------------------- openai backend


def test_openai_keeps_good_answers_and_counts_the_rest(
    reference: Path, sources: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory()
    result = run_openai(sources, tmp_path / "out", server, concurrency=4)
    assert shards(result.out) == shards(reference)  # results placed by chunk, not by finish
    counts = stats(result.out)
    records = sum(info["records"] for info in result.manifest["splits"].values())
    dropped = counts["dropped"]
    assert dropped["no_answer"] == len(server.no_answer) > 0
    assert dropped["quote_not_verbatim"] == len(server.bad_quote) > 0
    assert records > 0 and records + sum(dropped.values()) == counts["chunks"] * 2
    assert "dropped" in result.summary() and "no_answer" in result.summary()
    assert validate([str(result.out)]).ok
    for split in ("train", "eval"):
        for line in shards(result.out)[split].splitlines():
            cot = json.loads(line)["cot_answer"]
            assert "cut off" not in cot and cot.splitlines()[-1].startswith("<ANSWER>: ")


def test_openai_retries_server_errors_and_timeouts(
    reference: Path, sources: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(script=("500", "sleep", "429"), sleep=1.5)
    result = run_openai(sources, tmp_path / "out", server, concurrency=2, timeout=0.4)
    assert server.served["500"] == server.served["sleep"] == server.served["429"] == 1
    assert shards(result.out) == shards(reference)  # every failed request was retried and kept


def test_openai_requests_at_once_stay_within_concurrency(
    reference: Path, sources: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(delay=0.05)
    run_openai(sources, tmp_path / "out", server, concurrency=3)
    assert 2 <= server.max_in_flight <= 3
    assert shards(tmp_path / "out") == shards(reference)


def test_openai_resume_after_interruption_matches(
    reference: Path, sources: Path, tmp_path: Path, server_factory
) -> None:
    class Stop(Exception):
        pass

    def stop_after(n: int):
        def hook(done: int) -> None:
            if done == n:
                raise Stop

        return hook

    server = server_factory()
    options = GenerateOptions(backend="openai", **OPTIONS)  # type: ignore[arg-type]
    out = tmp_path / "out"
    with pytest.raises(Stop):
        backend = openai_backend(server, concurrency=4)
        generate([str(sources)], out, options, backend=backend, on_chunk=stop_after(3))
    assert not (out / "manifest.json").exists()
    other = server_factory()  # another address and concurrency: still the same data set
    result = run_openai(sources, out, other, concurrency=2)
    assert result.status == "resumed"
    assert shards(out) == shards(reference)
    assert stats(out) == stats(reference)


def test_openai_gives_up_after_max_retries(
    sources: Path, tmp_path: Path, server_factory, capsys
) -> None:
    server = server_factory(always="500")
    with pytest.raises(RaftDistError, match="failed 3 times; last error: HTTP 500: try again"):
        run_openai(sources, tmp_path / "out", server, max_retries=2, concurrency=2)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_openai_from_the_command_line(
    sources: Path, tmp_path: Path, server_factory, capsys, monkeypatch
) -> None:
    server = server_factory(api_key="sk-secret")
    common = [
        "generate", str(sources), "--backend", "openai", "--model", "fake-model",
        "--chunk-size", "200", "--questions-per-chunk", "2", "--no-progress",
    ]  # fmt: skip
    out = tmp_path / "cli"
    args = [*common, "--out", str(out), "--base-url", server.url, "--api-key", "sk-secret"]
    assert run_main(*args, "--concurrency", "2", "--timeout", "5", "--max-retries", "1") == 0
    assert "dropped" in capsys.readouterr().out
    manifest = (out / "manifest.json").read_text()
    assert "sk-secret" not in manifest and server.url not in manifest
    # the key and address from the environment; a wrong key is one error line, no retries
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    assert run_main(*common, "--out", str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err
    assert "HTTP 401: Incorrect API key provided" in err and "Traceback" not in err
    monkeypatch.delenv("RAFT_DIST_OPENAI_MODEL", raising=False)
    no_model = [a for a in common if a not in ("--model", "fake-model")]
    assert run_main(*no_model, "--out", str(tmp_path / "x")) == 2
    assert "needs a model" in capsys.readouterr().err
    assert run_main(*common, "--out", str(tmp_path / "x"), "--device", "cpu") == 2
    assert "--device applies to --backend hf, not openai" in capsys.readouterr().err
    assert run_main(*common, "--out", str(tmp_path / "x"), "--concurrency", "0") == 2
    assert "--concurrency must be at least 1" in capsys.readouterr().err


def test_answer_checks() -> None:
    oracle = "The mill has six sails. It was built in 1820."
    good = "It says ##begin_quote## The mill has six sails. ##end_quote##\n<ANSWER>: six\nmore"
    made = check_answer(" How many sails? ", good, oracle)
    assert not isinstance(made, str)
    assert made.cot_answer.endswith("<ANSWER>: six") and made.question == "How many sails?"
    assert check_answer("Q?", "six sails", oracle) == "no_answer"
    assert check_answer("Q?", "It has six.\n<ANSWER>:  \n", oracle) == "no_answer"
    assert check_answer("", good, oracle) == "empty_question"
    unclosed = "##begin_quote## The mill has six sails.\n<ANSWER>: six"
    assert check_answer("Q?", unclosed, oracle) == "quote_not_verbatim"
    other = "##begin_quote## The mill has 6 sails. ##end_quote##\n<ANSWER>: six"
    assert check_answer("Q?", other, oracle) == "quote_not_verbatim"
    questions, dropped = parse_questions("1. Why?\n\n- Why?\nQ3: When?\n", 4)
    assert questions == ["Why?", "When?"]
    assert dropped == {"duplicate_question": 1, "empty_question": 1}


# --------------------------------------------------------------------------- hf backend


def test_hf_backend_with_a_random_model_drops_and_counts(
    sources: Path, tmp_path: Path, capsys
) -> None:
    args = [  # one source of two chunks: loading torch is most of the time
        "generate", str(sources / "00-harbour.md"), "--backend", "hf",
        "--model", "builtin:tiny-llama", "--max-new-tokens", "6", "--temperature", "1.0",
        "--device", "cpu",
        "--chunk-size", "200", "--questions-per-chunk", "2", "--num-distractors", "1",
        "--eval-fraction", "0", "--no-progress",
    ]  # fmt: skip
    out = tmp_path / "hf"
    assert run_main(*args, "--out", str(out)) == 0
    assert "dropped" in capsys.readouterr().out
    counts = stats(out)
    records = sum(
        s["records"] for s in json.loads((out / "manifest.json").read_text())["splits"].values()
    )
    assert sum(counts["dropped"].values()) > 0
    assert records + sum(counts["dropped"].values()) == counts["chunks"] * 2
    assert validate([str(out)]).ok  # whatever was kept is valid
    settings = json.loads((out / "manifest.json").read_text())["generator"]["settings"]
    assert settings["backend_settings"]["model"] == "builtin:tiny-llama"
    assert run_main(*args, "--out", str(out)) == 0  # same settings: up to date
    assert "up to date" in capsys.readouterr().out


# --------------------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def native(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template-backend data set: meta on every record, some without the oracle, two splits."""
    out = tmp_path_factory.mktemp("native") / "set"
    generate([str(sources)], out, GenerateOptions(**OPTIONS, p_oracle=0.6))  # type: ignore[arg-type]
    return out


def records_by_split(out: Path) -> dict[str, list[RaftRecord | Example]]:
    """Every record of a data set folder, per split, in shard order."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        split: [r for shard in info["shards"] for _, r in iter_records(out / shard["path"])]
        for split, info in manifest["splits"].items()
    }


def without_meta(data: bytes) -> list[dict]:
    rows = [json.loads(line) for line in data.splitlines()]
    for row in rows:
        row.pop("meta", None)
    return rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_round_trip(native: Path, tmp_path: Path, fmt: str) -> None:
    there, back = tmp_path / fmt, tmp_path / "back"
    assert run_main("convert", str(native), "--to", fmt, "--out", str(there)) == 0
    assert run_main("convert", str(there), "--to", "raft", "--out", str(back)) == 0
    original = shards(native)
    assert set(shards(back)) == {"train", "eval"}
    if fmt in ("raft", "parquet", "datasets"):
        assert shards(back) == original  # byte for byte, meta included
        assert validate([str(back)]).ok
    elif fmt == "raft_paper":
        for split, data in shards(back).items():
            assert without_meta(data) == without_meta(original[split])
    else:
        expected = {
            split: [to_example(r) for r in records]
            for split, records in records_by_split(native).items()
        }
        if fmt == "instruction":  # instruction/output always reads back a final newline
            expected = {
                split: [Example(e.id, e.prompt + "\n", e.completion) for e in examples]
                for split, examples in expected.items()
            }
        assert records_by_split(back) == expected


def test_convert_single_files_and_chat_shape(native: Path, tmp_path: Path) -> None:
    chat = tmp_path / "all.jsonl"
    assert run_main("convert", str(native), "--to", "chat", "--out", str(chat)) == 0
    rows = [json.loads(line) for line in chat.read_text().splitlines()]
    assert len(rows) == sum(len(v) for v in records_by_split(native).values())
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    table = tmp_path / "all.parquet"
    assert run_main("convert", str(native), "--to", "parquet", "--out", str(table)) == 0
    back = tmp_path / "back.jsonl"
    assert run_main("convert", str(table), "--to", "raft", "--out", str(back)) == 0
    assert back.read_bytes() == shards(native)["train"] + shards(native)["eval"]


def test_convert_mixed_records_through_parquet(native: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.jsonl"
    lines = shards(native)["train"].splitlines()[:3]
    extra = {"id": "pc-1", "prompt": "Say hi.\n", "completion": "hi <ANSWER>: hi"}
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Say hi."},
                         {"role": "assistant", "content": "hi"}]}  # fmt: skip
    mixed.write_bytes(b"\n".join(lines) + b"\n" + json.dumps(extra).encode() + b"\n")
    with mixed.open("a") as handle:
        handle.write(json.dumps(chat) + "\n")
    table = tmp_path / "mixed.parquet"
    assert run_main("convert", str(mixed), "--to", "parquet", "--out", str(table)) == 0
    back = tmp_path / "back.jsonl"
    assert run_main("convert", str(table), "--to", "raft", "--out", str(back)) == 0
    got = [record for _, record in iter_records(back)]
    want = [record for _, record in islice(iter_records(mixed), 4)]  # before the chat line
    assert got[:4] == want
    assert got[4] == Example("mixed.jsonl:5", "Be brief.\n\nSay hi.", "hi")


def test_convert_reads_json_files(tmp_path: Path, capsys) -> None:
    """A .json array (Alpaca's shape), one record, or JSON Lines under a .json name all convert;
    the array's items are numbered as lines."""
    rows = [
        {"instruction": "What is 2+2?", "input": "", "output": "4"},
        {"id": "c1", "messages": [{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello"}]},
    ]  # fmt: skip
    as_jsonl = tmp_path / "rows.jsonl"
    as_jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    want = [record for _, record in iter_records(as_jsonl)]
    files = {
        "array.json": json.dumps(rows, indent=2),
        "lines.json": as_jsonl.read_text(),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"{name}.out.jsonl"
        assert run_main("convert", str(tmp_path / name), "--to", "raft", "--out", str(out)) == 0
        got = [record for _, record in iter_records(out)]
        assert [(r.prompt, r.completion) for r in got] == [(r.prompt, r.completion) for r in want]
        assert got[0].id == f"{name}:1" and got[1].id == "c1"
    single = tmp_path / "single.json"
    single.write_text(json.dumps(rows[0], indent=1))
    assert convert([str(single)], "raft", tmp_path / "single.jsonl", overwrite=False).splits == {
        "train": 1
    }
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([rows[0], {"prompt": 3, "completion": "x"}], indent=1))
    assert run_main("convert", str(bad), "--to", "raft", "--out", str(tmp_path / "x.jsonl")) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: " in err and 'field "prompt" must be a string' in err, err
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a",\n  oops}]')
    assert run_main("convert", str(broken), "--to", "raft", "--out", str(tmp_path / "y.jsonl")) == 2
    assert f"{broken}:2: malformed JSON" in capsys.readouterr().err
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    assert run_main("convert", str(scalar), "--to", "raft", "--out", str(tmp_path / "z.jsonl")) == 2
    assert "an array of records or one record" in capsys.readouterr().err
    # In a folder only .jsonl and .parquet are data: a dataset_info.json beside them is not read.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(as_jsonl.read_text())
    (folder / "dataset_info.json").write_text('{"description": "not a record"}')
    assert convert([str(folder)], "raft", tmp_path / "f.jsonl", overwrite=False).splits == {
        "train": 2
    }


def test_convert_bad_inputs(native: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    first = shards(native)["train"].splitlines()[0]
    bad.write_bytes(first + b"\n{not json\n")
    out = tmp_path / "out"
    assert run_main("convert", str(bad), "--to", "chat", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: malformed JSON" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written

    cases = {
        "pc.jsonl": (
            {"id": "x", "prompt": "p", "completion": "c"},
            "raft_paper",
            "cannot become raft_paper",
        ),
        "turns.jsonl": (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "raft",
            "found roles [user, user]",
        ),
    }
    for name, (record, fmt, message) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(record) + "\n")
        assert run_main("convert", str(path), "--to", fmt, "--out", str(out)) == 2
        assert f"{path}:1: " in (err := capsys.readouterr().err) and message in err, err
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert run_main("convert", str(garbage), "--to", "raft", "--out", str(out)) == 2
    assert "cannot read Parquet" in capsys.readouterr().err
    assert run_main("convert", str(tmp_path / "none"), "--to", "raft", "--out", str(out)) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert (
        run_main("convert", str(native), "--to", "chat", "--out", str(tmp_path / "x.parquet")) == 2
    )
    assert "cannot hold chat" in capsys.readouterr().err
    out.mkdir()
    assert run_main("convert", str(native), "--to", "raft", "--out", str(out)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (
        run_main("convert", str(native), "--to", "raft", "--out", str(native), "--overwrite") == 2
    )
    assert "would replace the input" in capsys.readouterr().err
    assert run_main("convert", str(native), "--to", "yaml", "--out", str(out)) == 2
    result = convert([str(native)], "raft", out, overwrite=True)  # replaces the folder
    splits = json.loads((native / "manifest.json").read_text())["splits"]
    assert result.splits == {split: info["records"] for split, info in splits.items()}


# --------------------------------------------------------------------------- PDF sources


def test_pdf_without_pypdf_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    from raft_dist.generate.pdf import pdf_text

    monkeypatch.setitem(sys.modules, "pypdf", None)
    with pytest.raises(DataError, match=r"install raft-dist\[pdf\]"):
        pdf_text(tmp_path / "a.pdf", b"%PDF-1.4")


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with a text layer, written by hand (no PDF library needed)."""
    stream = "BT /F1 12 Tf 50 750 Td 14 TL " + " ".join(f"({t}) Tj T*" for t in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    trailer = f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out + trailer.encode()


def test_pdf_text_with_pypdf(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    from raft_dist.generate.pdf import pdf_text

    data = minimal_pdf(
        [
            "The lighthouse was built in 1852 by the",
            "harbour board. Its lamp is vis-",
            "ible for 18 miles.",
        ]
    )
    text = pdf_text(tmp_path / "a.pdf", data)
    assert "built in 1852" in text and "visible for 18 miles" in text
    with pytest.raises(DataError, match="cannot read PDF"):
        pdf_text(tmp_path / "b.pdf", b"%PDF-1.4 broken")


def test_help_imports_no_heavy_library() -> None:
    import subprocess

    from helpers import ROOT, offline_env

    probe = (
        "import sys\n"
        "from raft_dist.cli import cli, main\n"
        "from raft_dist.cli_generate import convert, generate\n"
        "for command in (convert, generate): cli.commands.setdefault(command.name, command)\n"
        "assert main(['convert', '--help']) == 0 and main(['generate', '--help']) == 0\n"
        "heavy = ('torch', 'transformers', 'datasets', 'pyarrow', 'urllib.request')\n"
        "print('HEAVY', [m for m in heavy if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=offline_env(), cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout and "--concurrency" in result.stdout
