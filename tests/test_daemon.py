"""The daemon skeleton: run(once) semantics and signals handled outside the handler."""

from __future__ import annotations

import os
import signal
import threading

from pipeline.daemon import Signals, Step, run


class Counting:
    """A daemon that is busy for ``busy`` steps, then idle."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.steps = 0
        self.waits: list[float] = []
        self.stopping = False
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def step(self) -> Step:
        self.steps += 1
        if self.steps > 50:
            self.stopping = True
        return Step(None, False) if self.steps <= self.busy else Step(0.0, True)

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def close(self) -> None:
        self.closed = True


def test_once_returns_at_the_first_idle_step_and_closes():
    daemon = Counting(busy=3)
    assert run(daemon, once=True) == 0
    assert (daemon.started, daemon.closed, daemon.steps, daemon.waits) == (True, True, 4, [])


def test_without_once_an_idle_daemon_waits_until_stopped():
    daemon = Counting(busy=1)
    run(daemon)
    assert daemon.steps == 51 and daemon.closed and len(daemon.waits) == 49


def test_close_runs_when_a_step_raises():
    daemon = Counting(busy=0)

    def boom() -> Step:
        raise RuntimeError("step failed")

    daemon.step = boom  # type: ignore[method-assign]
    try:
        run(daemon)
    except RuntimeError:
        pass
    assert daemon.closed


def test_a_signal_calls_stop_from_another_thread_and_restores_the_handlers():
    called: list[tuple[str, str]] = []
    done = threading.Event()

    def on(kind: str):
        def call() -> None:
            called.append((kind, threading.current_thread().name))
            done.set()
        return call

    before = signal.getsignal(signal.SIGTERM)
    with Signals(on("stop"), on("reload")) as signals:
        os.kill(os.getpid(), signal.SIGHUP)
        assert done.wait(30)
        done.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        assert done.wait(30)
    assert [kind for kind, _ in called] == ["reload", "stop"]
    assert all(name == "dicomflow-signals" for _, name in called)
    assert signals.received == [signal.SIGHUP, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def worker() -> None:
        with Signals(lambda: None):
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert seen == [before]
