"""Reading boolean environment flags, one rule for all of them."""

from __future__ import annotations

import os
from collections.abc import Mapping

TRUE_VALUES = ("1", "true", "yes", "on")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """ACCELERATE_USE_CPU=1, =true, =YES ... are all on; unset, empty or anything else is off."""
    source = os.environ if environ is None else environ
    return source.get(name, "").strip().lower() in TRUE_VALUES
