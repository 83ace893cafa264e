"""`--backend openai`: questions and answers from any OpenAI-compatible chat completions server.

Requests for several chunks run at once in a thread pool (at most `concurrency` in flight),
but results are handed back in chunk order, so the output and the resume checkpoints are the
same as with one request at a time. Rate limits (429), server errors (5xx), broken connections
and timeouts are retried with exponential backoff; other HTTP errors (bad key, unknown model)
stop the run with the server's message, since retrying cannot fix them.

The API key goes to the --base-url origin (scheme, host and port) and nowhere else: redirects
are followed by hand and only within that origin, and a key over plain http to another machine
needs `allow_insecure_http`. The key is kept out of messages, logs and reprs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any

import httpx

from raft_dist.errors import ConfigError, RaftDistError
from raft_dist.generate.chunking import Chunk
from raft_dist.generate.questions import (
    DROP_REASONS,
    QA,
    Answered,
    Job,
    Messages,
    answer_chunk,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_BACKOFF = 60.0  # seconds; also the cap on a server's Retry-After
MAX_REDIRECTS = 5
# Only these keep the method and body; after 301/302/303 a client re-sends a POST as a GET,
# which can never reach a chat completions endpoint.
_KEEP_POST = (307, 308)
# httpx failures another attempt may not have; the rest (an unsupported scheme, a request
# httpx refuses to send) would fail the same way every time.
_TRANSIENT = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
    httpx.DecodingError,
)


class _Stopped(Exception):
    """The run stopped (an error elsewhere, Ctrl-C): queued requests give up at once."""


class _Retryable(Exception):
    """A failure that another attempt may not have (429, 5xx, timeout, dropped connection)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIBackend:
    """Chat completions over HTTP; see the module docstring for retries, ordering and the key."""

    name = "openai"
    drop_reasons = DROP_REASONS

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        max_retries: int = 5,
        concurrency: int = 8,
        timeout: float = 60.0,
        backoff: float = 1.0,
        allow_insecure_http: bool = False,
    ) -> None:
        model = model or os.environ.get("RAFT_DIST_OPENAI_MODEL")
        if not model:
            raise ConfigError(
                "--backend openai needs a model: pass --model or set RAFT_DIST_OPENAI_MODEL"
            )
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url must start with http:// or https://, got {base_url!r}")
        for option, value, low in (
            ("--max-new-tokens", max_new_tokens, 1),
            ("--max-retries", max_retries, 0),
            ("--concurrency", concurrency, 1),
        ):
            if value < low:
                raise ConfigError(f"{option} must be at least {low}, got {value}")
        if temperature < 0:
            raise ConfigError(f"--temperature must be 0 or more, got {temperature}")
        if timeout <= 0:
            raise ConfigError(f"--timeout must be above 0 seconds, got {timeout}")
        url = _parse_url(base_url.rstrip("/") + "/chat/completions")
        key = _api_key(api_key if api_key is not None else os.environ.get("OPENAI_API_KEY"))
        if key and url.scheme == "http" and not _is_local(url.host) and not allow_insecure_http:
            raise ConfigError(
                f"--base-url {base_url} is plain http to another machine, so the API key would "
                "cross the network unencrypted: use https://, or pass --allow-insecure-http if "
                "that network is trusted"
            )
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.timeout = timeout
        self.backoff = backoff
        self._jitter = random.Random()  # timing only; never touches the output
        self._lock = threading.Lock()
        headers = httpx.Headers({"Content-Type": "application/json", "Accept": "application/json"})
        if key:
            # Kept only here: httpx.Headers shows Authorization as [secure] in its repr.
            headers["Authorization"] = f"Bearer {key}"
        # One client for the backend's life: its connections are reused across requests and
        # threads. The thread pool bounds the requests in flight, so the connection pool does not
        # (a limit there would only turn waits into pool timeouts). Redirects are followed by
        # hand (see _send) so the key cannot follow one to another origin.
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=concurrency),
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, url={self.url!r})"

    @property
    def settings(self) -> dict[str, Any]:
        """What changes the output (goes into the data set's fingerprint): not the address,
        key, concurrency or retry policy, so a resume may change those."""
        return {
            "model": self.model,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    # ---- the Backend protocol

    def questions(self, chunk: Chunk, count: int, rng: random.Random) -> list[QA]:
        return answer_chunk(partial(self._complete, stop=threading.Event()), chunk, count)[0]

    def ask_many(self, jobs: Iterable[Job]) -> Iterator[Answered]:
        """Keep up to 2 x concurrency chunks queued so no worker waits, and hand results back
        in job order. Stopping early cancels what has not started and ends retry waits, so the
        process does not linger on requests nobody will read."""
        stop = threading.Event()
        complete = partial(self._complete, stop=stop)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="raft-dist-openai")
        pending: deque[tuple[Job, Future]] = deque()
        try:
            for job in jobs:
                pending.append((job, pool.submit(answer_chunk, complete, job[0], job[1])))
                if len(pending) >= 2 * self.concurrency:
                    yield _collect(*pending.popleft())
            while pending:
                yield _collect(*pending.popleft())
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    # ---- HTTP

    def _complete(self, prompts: list[Messages], *, stop: threading.Event) -> list[str]:
        """One request per prompt, one after another (parallelism is across chunks)."""
        return [self._chat(messages, stop) for messages in prompts]

    def _chat(self, messages: Messages, stop: threading.Event) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_new_tokens,
            }
        ).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise _Stopped
            try:
                return self._post(body)
            except _Retryable as exc:
                last = str(exc)
                if attempt == self.max_retries:
                    break
                delay = min(self.backoff * 2**attempt, MAX_BACKOFF)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, MAX_BACKOFF))
                with self._lock:
                    delay *= 1 + 0.25 * self._jitter.random()
                stop.wait(delay)
        raise RaftDistError(
            f"openai backend: {self.url} failed {self.max_retries + 1} times; last error: {last}"
        )

    def _post(self, body: bytes) -> str:
        """One attempt. Every message raised here has the key removed: a server may echo the
        Authorization header back in its error text."""
        try:
            return _reply(self._send(body), self.url)
        except _Retryable as exc:
            raise _Retryable(self._redact(str(exc)), exc.retry_after) from None
        except RaftDistError as exc:
            raise RaftDistError(self._redact(str(exc))) from None

    def _send(self, body: bytes) -> httpx.Response:
        """POST to self.url, following 307/308 redirects within its origin only."""
        url = httpx.URL(self.url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self._http.post(url, content=body)
            except _TRANSIENT as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from None
            except httpx.HTTPError as exc:
                raise RaftDistError(f"openai backend: {url}: {type(exc).__name__}: {exc}") from None
            if not response.is_redirect:
                return response
            try:
                target = url.join(response.headers["Location"])
            except httpx.InvalidURL:
                raise RaftDistError(
                    f"openai backend: {self.url} answered HTTP {response.status_code} with an "
                    "invalid Location"
                ) from None
            if _origin(target) != _origin(url):
                raise RaftDistError(
                    f"openai backend: {self.url} redirects to {_origin_text(target)}; not "
                    "followed, so the API key only goes to the --base-url host: set --base-url "
                    "to the server's own address"
                )
            if response.status_code not in _KEEP_POST:
                raise RaftDistError(
                    f"openai backend: {self.url} answered HTTP {response.status_code} "
                    f"(a redirect to {target}); set --base-url to the new address"
                )
            url = target
        raise RaftDistError(
            f"openai backend: {self.url} redirected more than {MAX_REDIRECTS} times"
        )

    def _redact(self, text: str) -> str:
        auth = self._http.headers.get("Authorization")
        key = auth.removeprefix("Bearer ") if auth else ""
        return text.replace(key, "[API key]") if key else text


def _reply(response: httpx.Response, url: str) -> str:
    status = response.status_code
    if status >= 400:
        detail = _detail(response)
        if status in (408, 409, 429) or status >= 500:
            raise _Retryable(f"HTTP {status}: {detail}", _retry_after(response.headers))
        raise RaftDistError(f"openai backend: {url} answered HTTP {status}: {detail}")
    return _content(response.content)


def _collect(job: Job, future: Future) -> Answered:
    pairs, dropped = future.result()
    chunk, _, rng = job
    return Answered(chunk, rng, pairs, dropped)


def _content(payload: bytes) -> str:
    """The first choice's text; a refusal or empty reply is "" (dropped later, not retried)."""
    try:
        reply = json.loads(payload)
        content = reply["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise _Retryable(f"malformed reply: {payload[:200]!r}") from None
    return content if isinstance(content, str) else ""


def _detail(response: httpx.Response) -> str:
    """The server's error message when it sent the usual {"error": {"message": ...}}."""
    try:
        message = json.loads(response.content)["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (ValueError, KeyError, TypeError):
        pass
    text = response.content.decode("utf-8", "replace").strip()
    return text[:300] or response.reason_phrase or "no details"


def _retry_after(headers: httpx.Headers) -> float | None:
    """Retry-After in seconds, given as a number or as an HTTP date."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse as naive; HTTP dates are always UTC
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _parse_url(text: str) -> httpx.URL:
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"--base-url is not a valid URL: {exc}") from None
    if not url.host:
        raise ConfigError(f"--base-url has no host: {text!r}")
    return url


def _api_key(value: str | None) -> str | None:
    """The key without surrounding whitespace (a stray newline from a file is common); refused,
    without echoing it, when a header cannot carry it (httpx's error would quote it)."""
    key = (value or "").strip()
    if key and not all("!" <= c <= "~" for c in key):
        raise ConfigError(
            "the API key (--api-key or $OPENAI_API_KEY) has spaces or characters that an HTTP "
            "header cannot carry"
        )
    return key or None


def _is_local(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port  # httpx gives None for the scheme's default port


def _origin_text(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii')}"
