"""The question backends by name: the one place that knows them all.

Backends import the shared types from `questions`; this registry imports the backends (model
backends only when asked for, so the CLI stays free of torch and network code). Keeping it out
of `questions` is what keeps the imports one-way.
"""

from __future__ import annotations

from typing import Any

from raft_dist.errors import ConfigError
from raft_dist.generate.questions import Backend, TemplateBackend

BACKEND_NAMES = ("template", "hf", "openai")


def check_backend(name: str) -> None:
    if name not in BACKEND_NAMES:
        allowed = ", ".join(BACKEND_NAMES)
        raise ConfigError(f"--backend: unknown backend {name!r}; allowed: {allowed}")


def make_backend(name: str, **config: Any) -> Backend:
    """The backend called `name`; `config` holds the backend's own options."""
    check_backend(name)
    if name == "hf":
        from raft_dist.generate.backend_hf import HfBackend

        return HfBackend(**config)
    if name == "openai":
        from raft_dist.generate.backend_openai import OpenAIBackend

        return OpenAIBackend(**config)
    if config:
        raise ConfigError(f"--backend template takes no model options (got {', '.join(config)})")
    return TemplateBackend()
