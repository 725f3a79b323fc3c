"""One daemon of a kind per spool: an advisory ``flock`` under ``<spool>/run/``.

The kernel drops the lock when the process dies (even by kill -9), so a crashed
daemon never blocks its restart. The lock file records the holder's pid;
:func:`pid_alive` is how the rest of DicomFlow asks whether such a pid still runs.
A program that runs as several processes (``[router] receive_processes``) holds one
lock per process index (:func:`process_name`): ``receive-1.lock``, ``receive-2.lock``…
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


def process_name(program: str, index: int | None) -> str:
    """The name of one process of ``program``: its lock, its supervisord process name,
    its log file and its ``status`` row. ``None``: the program's only process, named
    like the program (``receive``), as before there could be several."""
    return program if index is None else f"{program}-{index}"


def process_names(program: str, count: int) -> list[str]:
    """Every process name of a program run as ``count`` processes (indices 1..count)."""
    return [process_name(program, None)] if count == 1 else \
        [process_name(program, index) for index in range(1, count + 1)]


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` exist (ours or another user's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
