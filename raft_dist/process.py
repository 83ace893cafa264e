"""How a raft-dist process ends once its work is done (one helper, used by cli.run and by the
launcher's accelerate agent; kept apart from cli.py so that the agent imports nothing else)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Flush the standard streams and end the process, skipping interpreter finalization."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`raft-dist ask ... | head`)
            pass
    os._exit(code)
