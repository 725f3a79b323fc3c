"""Clocks for the daemons, injectable so tests drive time instead of waiting.

Backoff and timeouts use ``monotonic()``; delivery windows use local wall time
``now()`` (like cron); state files use ``time()`` (UTC epoch). Every sleep goes
through ``wait(waiter, seconds)`` so that a filesystem event or a signal ends it
early — and so a fake clock can jump instead of sleeping.

``Clock`` is the interface the daemons depend on (README, Design notes: Clocks);
``SystemClock`` and ``FakeClock`` both satisfy it structurally, so a test's clock
needs no base class.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Protocol


class Waiter(Protocol):
    def wait(self, timeout: float | None) -> bool: ...


class Clock(Protocol):
    """What a daemon asks of time: the four readings and the one interruptible sleep."""

    def monotonic(self) -> float:
        """Seconds on a clock that never steps back (backoff, timeouts)."""
        ...

    def time(self) -> float:
        """UTC epoch seconds (state files, names)."""
        ...

    def now(self) -> datetime:
        """Local wall-clock time, naive (delivery windows, like cron)."""
        ...

    def wait(self, waiter: Waiter, seconds: float) -> bool:
        """Sleep up to ``seconds`` unless ``waiter`` fires; True if woken early."""
        ...


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def now(self) -> datetime:
        """Local wall-clock time, naive (croniter's and cron's view of time)."""
        return datetime.now()

    def wait(self, waiter: Waiter, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if woken early by an event."""
        return waiter.wait(max(0.0, seconds))


class FakeClock:
    """A clock for tests: ``wait`` advances time at once instead of sleeping."""

    def __init__(self, start: datetime | None = None, wall: float = 1_800_000_000.0) -> None:
        self._now = start or datetime(2026, 11, 28, 12, 0, 0)
        self._mono = 1000.0
        self._wall = wall
        self.waits: list[float] = []

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self._now += timedelta(seconds=seconds)
        self._mono += seconds
        self._wall += seconds

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    def now(self) -> datetime:
        return self._now

    def wait(self, waiter: Waiter, seconds: float) -> bool:
        self.waits.append(seconds)
        if waiter.wait(0):
            return True
        self.advance(max(0.0, seconds))
        return False


if TYPE_CHECKING:  # mypy proves both clocks satisfy the protocol; nothing runs at import
    _system: Clock = SystemClock()
    _fake: Clock = FakeClock()
