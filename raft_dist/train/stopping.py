"""Graceful stops: a signal or a request file asks the run to stop at the next step boundary.

Never checkpoint inside a signal handler (a known cause of hangs): the handler only records
which signal came. The loop folds "stop requested" into the per-step statistics the ranks
already exchange, so every rank learns it at the same step without an extra collective; all
of them then save a checkpoint, write the usual summary and exit 0, and rank 0 leaves a stop
marker that `raft-dist launch` turns into its "stopped, requeue me" exit code.

What asks for a stop:
* SIGTERM (a Slurm preemption or `scancel`, signalled to every process of the step; `kill`),
  SIGINT and SIGUSR1, on any rank;
* a request file in the run folder (`RunDir.stop_request`), which `raft-dist launch` writes
  when it gets SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 outside Slurm, and the sbatch templates
  write when the time-limit warning reaches the batch shell; only global rank 0 looks for it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequests:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.request_file: Path | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequests:
        """Handlers for the stop signals (main thread only: Python allows no other)."""
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name  # and nothing else

    def watch(self, request_file: Path) -> None:
        """Rank 0 also stops when this file appears."""
        self.request_file = request_file

    def requested(self) -> bool:
        if self.signal_name is not None:
            return True
        return self.request_file is not None and self.request_file.exists()

    def reason(self) -> str:
        """This rank's reason; a rank that saw nothing stopped because another one did."""
        if self.signal_name is not None:
            return f"signal {self.signal_name}"
        if self.request_file is not None and self.request_file.exists():
            return f"stop request ({self.request_file.name})"
        return "stop requested on another rank"

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
