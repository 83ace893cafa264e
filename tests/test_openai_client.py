"""The openai backend's HTTP client against real local servers: the API key goes only to the
--base-url origin, never into messages, logs, reprs or files; plain http to another machine
needs --allow-insecure-http; Retry-After is honoured up to the backoff cap."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from test_generate_backends import FakeChat, run_main, write_sources

from raft_dist.errors import ConfigError, RaftDistError
from raft_dist.generate import backend_openai
from raft_dist.generate.backend_openai import OpenAIBackend
from raft_dist.generate.chunking import Chunk

KEY = "sk-test-5f1d2c9e0a7b4e21"
CHUNK = Chunk(id=0, text="The mill has six sails. It was built in 1820.", title="Mill", source=0)
# Both the question and the answer a chunk needs: one numbered question, then a quoted answer.
GOOD = (
    "1. How many sails has the mill?\n"
    "##begin_quote## The mill has six sails. ##end_quote##\n<ANSWER>: six"
)

# (status, headers, body) for one request, given (path, request headers).
Reply = tuple[int, dict[str, str], bytes]
Respond = Callable[[str, dict[str, str]], Reply | None]


def chat(content: str) -> Reply:
    message = {"role": "assistant", "content": content}
    body = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
    return 200, {"Content-Type": "application/json"}, body


class Server:
    """A threaded HTTP server on 127.0.0.1 that records every request (path, headers, body) and
    answers with `respond`; a None reply closes the connection without answering."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.seen.append((self.path, headers, body))
                reply = server.respond(self.path, headers)
                if reply is None:
                    return
                status, extra, payload = reply
                try:
                    self.send_response(status)
                    for name, value in {"Content-Length": str(len(payload)), **extra}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout case)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Respond], Server]]:
    servers: list[Server] = []

    def start(respond: Respond) -> Server:
        servers.append(Server(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def backend(base_url: str, **kwargs: object) -> OpenAIBackend:
    config: dict = dict(model="m", base_url=base_url, api_key=KEY, timeout=5.0, backoff=0.01)
    config.update(kwargs)
    return OpenAIBackend(**config)


def ask(client: OpenAIBackend) -> str:
    """The error message of one chunk's questions, or "" when they came back."""
    try:
        client.questions(CHUNK, 1, random.Random(0))
    except RaftDistError as exc:
        return str(exc)
    return ""


# --------------------------------------------------------------------------- redirects


def test_httpx_drops_the_key_on_a_cross_origin_redirect(serve) -> None:
    """What httpx itself does when it follows redirects: no Authorization to another origin."""
    b = serve(lambda path, headers: chat("hi"))
    a = serve(lambda path, headers: (307, {"Location": b.origin + path}, b""))
    with httpx.Client(follow_redirects=True) as client:
        response = client.post(a.origin + "/v1", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and len(b.seen) == 1
    assert a.seen[0][1]["authorization"] == f"Bearer {KEY}"
    assert "authorization" not in b.seen[0][1]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_not_followed(serve, status: int) -> None:
    b = serve(lambda path, headers: chat(GOOD))
    a = serve(lambda path, headers: (status, {"Location": b.origin + path}, b""))
    error = ask(backend(a.origin + "/v1"))
    assert not any(KEY in json.dumps(headers) for _, headers, _ in b.seen)
    assert b.seen == []  # not even without the key: the --base-url host is the only one
    assert f"redirects to {b.origin}; not followed" in error and KEY not in error


def test_redirects_within_the_origin_keep_method_body_and_key(serve) -> None:
    hops = {
        "/v1/chat/completions": (307, {"Location": "/v2/chat/completions"}, b""),
        "/v2/chat/completions": (308, {"Location": "PLACEHOLDER"}, b""),
        "/v3/chat/completions": chat(GOOD),
    }
    a = serve(lambda path, headers: hops[path])
    hops["/v2/chat/completions"][1]["Location"] = a.origin + "/v3/chat/completions"
    [qa] = backend(a.origin + "/v1").questions(CHUNK, 1, random.Random(0))
    assert qa.answer == "six"
    assert [path for path, _, _ in a.seen[:3]] == list(hops)
    assert {headers["authorization"] for _, headers, _ in a.seen} == {f"Bearer {KEY}"}
    assert len({body for _, _, body in a.seen[:3]}) == 1


def test_redirects_that_cannot_carry_a_post_or_never_end_stop_the_run(serve) -> None:
    moved = serve(lambda path, headers: (301, {"Location": "/new/chat/completions"}, b""))
    error = ask(backend(moved.origin + "/v1"))
    assert "answered HTTP 301" in error and "set --base-url to the new address" in error
    assert len(moved.seen) == 1  # not retried
    loop = serve(lambda path, headers: (307, {"Location": path}, b""))
    assert "redirected more than 5 times" in ask(backend(loop.origin + "/v1"))
    assert len(loop.seen) == 6


# --------------------------------------------------------------------------- the key stays secret


def echo(status: int) -> Respond:
    """A server that quotes the request's Authorization header back in its error text."""

    def respond(path: str, headers: dict[str, str]) -> Reply:
        text = f"refused {headers.get('authorization')}"
        return status, {}, json.dumps({"error": {"message": text}}).encode()

    return respond


def test_the_key_stays_out_of_errors_logs_and_reprs(serve, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log every request at INFO/DEBUG
    closed = serve(lambda path, headers: chat(GOOD))
    closed.close()
    other = serve(lambda path, headers: chat(GOOD))

    def slow(path: str, headers: dict[str, str]) -> Reply:
        time.sleep(0.6)
        return chat(GOOD)

    failures = {
        "bad key (401, echoed)": serve(echo(401)).origin,
        "server error (500, echoed)": serve(echo(500)).origin,
        "malformed reply (echoed)": serve(
            lambda path, headers: (200, {}, headers["authorization"].encode())
        ).origin,
        "connection refused": closed.origin,
        "closed without a reply": serve(lambda path, headers: None).origin,
        "timeout": serve(slow).origin,
        "redirect elsewhere": serve(
            lambda path, headers: (307, {"Location": other.origin + path}, b"")
        ).origin,
    }
    messages = {}
    for case, origin in failures.items():
        client = backend(origin + "/v1", max_retries=1, timeout=0.3)
        messages[case] = ask(client)
        assert messages[case], case  # it did fail
        for text in (repr(client), repr(vars(client)), repr(vars(client)["_http"].__dict__)):
            assert KEY not in text, case
        client.close()
    for case in ("bad key (401, echoed)", "server error (500, echoed)"):
        assert "refused Bearer [API key]" in messages[case]  # the echo was there, redacted
    assert "malformed reply: b'Bearer [API key]'" in messages["malformed reply (echoed)"]
    for bad in ("http://192.0.2.7/v1", "http://example.com/v1"):
        with pytest.raises(ConfigError) as refused:
            backend(bad)
        messages[bad] = str(refused.value)
    with pytest.raises(ConfigError) as unsendable:
        backend("https://example.com/v1", api_key=KEY + "\n" + KEY)
    messages["key with a newline"] = str(unsendable.value)
    assert "HTTP Request: POST" in caplog.text  # the client's own log lines were captured
    captured = capsys.readouterr()
    for where, text in {
        **messages,
        "logs": caplog.text,
        "out": captured.out + captured.err,
    }.items():
        assert KEY not in text, where


def test_the_command_line_writes_no_key_anywhere(
    tmp_path: Path, capsys, caplog, monkeypatch
) -> None:
    caplog.set_level(logging.DEBUG)
    sources = write_sources(tmp_path / "docs")
    server = FakeChat(api_key=KEY)
    try:
        args = [
            "generate", str(sources), "--out", str(tmp_path / "out"), "--backend", "openai",
            "--model", "fake-model", "--chunk-size", "200", "--questions-per-chunk", "1",
            "--base-url", server.url, "--api-key", KEY, "--no-progress",
        ]  # fmt: skip
        assert run_main(*args) == 0
    finally:
        server.close()
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "manifest.json" for path in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err + caplog.text


# --------------------------------------------------------------------------- plain http


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST", "127.0.0.1", "127.8.9.10", "[::1]"],
)
def test_plain_http_to_this_machine_is_allowed(host: str) -> None:
    backend(f"http://{host}:8000/v1").close()


@pytest.mark.parametrize(
    "host",
    ["10.0.0.5", "192.0.2.7:8000", "example.com", "localhost.example.com", "127.0.0.1.nip.io"],
)
def test_plain_http_to_another_machine_needs_the_option(host: str, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="pass --allow-insecure-http") as refused:
        backend(f"http://{host}/v1")
    assert "\n" not in str(refused.value) and KEY not in str(refused.value)
    backend(f"http://{host}/v1", allow_insecure_http=True).close()
    backend(f"https://{host}/v1").close()
    backend(f"http://{host}/v1", api_key=None).close()  # no key, nothing to leak
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # a key from the environment counts too
    with pytest.raises(ConfigError, match="pass --allow-insecure-http"):
        backend(f"http://{host}/v1", api_key=None)


def test_plain_http_refusal_on_the_command_line(tmp_path: Path, capsys) -> None:
    sources = write_sources(tmp_path / "docs")
    common = ["generate", str(sources), "--out", str(tmp_path / "out"), "--no-progress"]
    remote = ["--backend", "openai", "--model", "m", "--base-url", "http://192.0.2.7/v1"]
    assert run_main(*common, *remote, "--api-key", KEY) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --base-url http://192.0.2.7/v1 is plain http")
    assert "--allow-insecure-http" in err and err.count("\n") == 1 and KEY not in err
    assert run_main(*common, "--allow-insecure-http") == 2
    assert "--allow-insecure-http applies to --backend openai, not template" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------- Retry-After


def busy_then_ok(retry_after: str) -> Respond:
    replies = iter([(429, {"Retry-After": retry_after}, b'{"error": {"message": "slow down"}}')])
    return lambda path, headers: next(replies, None) or chat(GOOD)


def test_retry_after_is_honoured_up_to_the_cap(serve, monkeypatch) -> None:
    busy = serve(busy_then_ok("1"))
    started = time.monotonic()
    assert backend(busy.origin + "/v1").questions(CHUNK, 1, random.Random(0))
    assert time.monotonic() - started >= 1.0  # not the 0.01 s backoff
    monkeypatch.setattr(backend_openai, "MAX_BACKOFF", 0.2)
    for value in ("3600", format_datetime(datetime.now(timezone.utc) + timedelta(hours=1), True)):
        busy = serve(busy_then_ok(value))
        started = time.monotonic()
        assert backend(busy.origin + "/v1").questions(CHUNK, 1, random.Random(0))
        assert time.monotonic() - started < 2.0  # an hour asked, the cap waited
        assert len(busy.seen) == 3  # 429, then the question and the answer


def test_retry_after_as_an_http_date() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    headers = httpx.Headers({"Retry-After": format_datetime(when, usegmt=True)})
    assert 27 < backend_openai._retry_after(headers) <= 30
    assert backend_openai._retry_after(httpx.Headers({"Retry-After": "soon"})) is None
