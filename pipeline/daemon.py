"""The loop every DicomFlow daemon runs, and the one way they take signals.

In the manner of rq's worker: a daemon is ``start()``, then ``step()`` until it is asked
to stop, then ``close()``; ``run(once=True)`` returns as soon as a step finds the daemon
*idle* — nothing it can do now without something outside it (a new file, an endpoint
coming back, a peer connecting). Tests drive a daemon with ``once`` or ``step()`` and an
injected clock instead of sleeping.

Signals: a handler runs on the main thread between two bytecodes, possibly while that
thread holds a lock (``threading.Event.set()`` from a handler can deadlock on the very
event the main thread is waiting on). So the handler only records the signal and writes
one byte to a pipe; a small thread reads the pipe and makes the calls (stop, reload)
outside the signal context.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, NamedTuple, Protocol

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP


class Step(NamedTuple):
    """What one turn of a daemon's loop found: how long to wait before the next turn
    (``None``: go on at once) and whether the daemon is idle (``run(once=True)`` ends)."""

    wait: float | None
    idle: bool


class Daemon(Protocol):
    """What :func:`run` drives. ``wait`` returns early when :meth:`wake` is called."""

    stopping: bool

    def start(self) -> None: ...

    def step(self) -> Step: ...

    def wait(self, seconds: float) -> None: ...

    def close(self) -> None: ...


def run(daemon: Daemon, once: bool = False) -> int:
    """Start ``daemon``, step it until it is stopped (or, with ``once``, idle), close it.

    ``close`` runs whatever happens inside, so the lock, the watcher and the listener
    are always released. Returns the exit status (0: stopped as asked).
    """
    daemon.start()
    try:
        while not daemon.stopping:
            wait, idle = daemon.step()
            if once and idle:
                break
            if wait is not None and not daemon.stopping:
                daemon.wait(wait)
    finally:
        daemon.close()
    return 0


class Signals:
    """SIGTERM/SIGINT call ``on_stop``, SIGHUP calls ``on_reload`` — from a thread of
    ours, never inside the handler. Use as a context manager around ``run``; outside the
    main thread (a test driving a daemon from a worker thread) it installs nothing."""

    def __init__(self, on_stop: Callable[[], None], on_reload: Callable[[], None] | None = None,
                 name: str = "dicomflow-signals") -> None:
        self.on_stop = on_stop
        self.on_reload = on_reload
        self.name = name
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Signals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._pipe = os.pipe()
        self._thread = threading.Thread(target=self._dispatch, name=self.name, daemon=True)
        self._thread.start()
        wanted = STOP_SIGNALS + ((RELOAD_SIGNAL,) if self.on_reload is not None else ())
        for sig in wanted:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pipe is not None:
            read_end, write_end = self._pipe
            self._pipe = None
            os.close(write_end)  # the dispatcher reads end-of-file and ends
            if self._thread is not None:
                self._thread.join(timeout=5.0)
            os.close(read_end)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Signal context: append and write only (both safe against the interrupted thread).
        self.received.append(signum)
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self._pipe[1], bytes((signum,)))

    def _dispatch(self) -> None:
        assert self._pipe is not None
        read_end = self._pipe[0]
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == RELOAD_SIGNAL and self.on_reload is not None:
                    self.on_reload()
                else:
                    self.on_stop()
