"""`--backend openai`: questions and answers from any OpenAI-compatible chat completions server.

Requests for several chunks run at once in a thread pool (at most `concurrency` in flight),
but results are handed back in chunk order, so the output and the resume checkpoints are the
same as with one request at a time. Rate limits (429), server errors (5xx), broken connections
and timeouts are retried with exponential backoff; other HTTP errors (bad key, unknown model)
stop the run with the server's message, since retrying cannot fix them.

Only the stdlib HTTP client is used, so this backend adds no dependency.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

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


class _Stopped(Exception):
    """The run stopped (an error elsewhere, Ctrl-C): queued requests give up at once."""


class _Retryable(Exception):
    """A failure that another attempt may not have (429, 5xx, timeout, dropped connection)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIBackend:
    """Chat completions over HTTP; see the module docstring for retries and ordering."""

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
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.timeout = timeout
        self.backoff = backoff
        self._jitter = random.Random()  # timing only; never touches the output
        self._lock = threading.Lock()

    @property
    def settings(self) -> dict[str, Any]:
        """What changes the output (goes into the data set's fingerprint): not the address,
        key, concurrency or retry policy, so a resume may change those."""
        return {
            "model": self.model,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }

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
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise _Stopped
            try:
                return self._post(body, headers)
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

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = _detail(exc)
            if exc.code in (408, 409, 429) or exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}: {detail}", _retry_after(exc)) from None
            raise RaftDistError(
                f"openai backend: {self.url} answered HTTP {exc.code}: {detail}"
            ) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        except urllib.error.URLError as exc:  # wraps timeouts and refused connections
            raise _Retryable(f"{exc.reason}") from None
        except OSError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        return _content(payload)


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


def _detail(exc: urllib.error.HTTPError) -> str:
    """The server's error message when it sent the usual {"error": {"message": ...}}."""
    try:
        raw = exc.read()
    except OSError:
        raw = b""
    try:
        message = json.loads(raw)["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (ValueError, KeyError, TypeError):
        pass
    text = raw.decode("utf-8", "replace").strip()
    return text[:300] or exc.reason or "no details"


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
