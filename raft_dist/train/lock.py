"""One run per folder: rank 0 holds an exclusive lock on `output.dir/run.lock` while it runs.

The lock is flock(2): the kernel (or the NFS server) releases it when the holding process ends
in any way, kill -9 included, so the next attempt of a killed run takes it over without
anything to clean up. The file says who holds it, for the error message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from raft_dist.errors import ConfigError

_held: list[int] = []  # descriptors kept open for the life of the process


def lock_run_folder(path: Path) -> bool:
    """Take the lock or raise ConfigError naming the holder. False: the filesystem has no locks
    (the caller warns); True: held until this process exits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown process"
        os.close(fd)
        raise ConfigError(
            f"output.dir {path.parent} is in use by another run ({holder}); wait for it to end "
            "or choose another output.dir"
        ) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
    _held.append(fd)
    return True
