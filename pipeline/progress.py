"""Progress of long operator work (``reconcile`` over a large range, ``retry --all``).

On a terminal, one line rewritten in place (``\\r``), at most :data:`TTY_INTERVAL` apart
so that printing never costs more than the work; elsewhere (a log, a pipe, cron mail)
plain lines, one every ``every`` items or :data:`PLAIN_INTERVAL` seconds, whichever
comes first — a file full of carriage returns is unreadable. Always on stderr, so that
``--json`` output and pipes stay clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

TTY_INTERVAL = 0.1      # seconds between refreshes of the line on a terminal
PLAIN_INTERVAL = 5.0    # seconds between plain lines at most


class Progress:
    """Counts items done of ``total`` (None: not known) and shows it now and then."""

    def __init__(self, label: str, total: int | None = None, *, every: int = 10_000,
                 stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.every = max(1, every)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.clock = clock
        self.done = 0
        self._shown_at = clock()
        self._shown_done = 0
        self._width = 0

    def advance(self, count: int = 1) -> None:
        """``count`` more items done; shows the count when it is time to."""
        self.done += count
        now = self.clock()
        if self.tty:
            if now - self._shown_at >= TTY_INTERVAL:
                self._show(now)
        elif self.done - self._shown_done >= self.every or now - self._shown_at >= PLAIN_INTERVAL:
            self._show(now)

    def finish(self) -> None:
        """Clear the terminal line (the command's own summary follows); nothing when plain."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def text(self) -> str:
        if self.total:
            percent = min(100, self.done * 100 // self.total)
            return f"{self.label}: {self.done:,} of {self.total:,} ({percent}%)"
        return f"{self.label}: {self.done:,}"

    def _show(self, now: float) -> None:
        text = self.text()
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = max(self._width, len(text))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown_at, self._shown_done = now, self.done


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return False
