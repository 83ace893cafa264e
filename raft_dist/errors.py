"""User-facing errors: the CLI prints these as one clear line and exits non-zero, no traceback."""

from __future__ import annotations


class RaftDistError(Exception):
    """A mistake in the user's input (config, data, options) rather than a bug in raft-dist."""

    exit_code = 2


class ConfigError(RaftDistError):
    """A recipe key is unknown, mistyped or out of range; the message names the key."""


class NonFiniteError(RaftDistError):
    """The loss or the gradient norm became NaN/inf: the run stops before saving such weights."""


class SaveError(RaftDistError):
    """Writing a checkpoint, the final model or generated data failed (disk full, permissions);
    the partial output is removed and what was saved before stays intact."""


class HungRankError(RaftDistError):
    """A collective timed out because a rank stopped answering; the message names it."""


class DataError(RaftDistError):
    """A data file is unreadable or a record is malformed; the message names file and line."""

    def __init__(self, path: object, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")

    @classmethod
    def relayed(cls, message: str) -> DataError:
        """Re-raise on every rank a message that one rank produced (it already names file:line)."""
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        error.path, error.line, error.reason = "", None, message
        return error
