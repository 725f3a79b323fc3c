"""One daemon of a kind per spool: an advisory ``flock`` under ``<spool>/run/``.

The kernel drops the lock when the process dies (even by kill -9), so a crashed
daemon never blocks its restart. The lock file records the holder's pid;
:func:`pid_alive` is how the rest of DicomFlow asks whether such a pid still runs.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.errors import AlreadyRunning


class DaemonLock:
    """Hold ``<run>/<name>.lock`` for the life of the process."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.path = Path(run_dir) / f"{name}.lock"
        self.name = name
        self._fd: int | None = None

    def acquire(self) -> DaemonLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another '{self.name}' is already running on this spool (pid {holder}); "
                f"lock file {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DaemonLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` exist (ours or another user's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
