"""Delivery windows: when an endpoint may be sent to.

Every form in the configuration is compiled to a list of cron expressions, so one
question ("does croniter match this minute?") answers "is it open?" and croniter's
``get_next`` answers "when does it open?" — the sender sleeps until then instead of
polling. Forms accepted (one per line, README: Design notes):

* a cron expression: ``*/10 19-23 * * 1-5`` (a minute is open if it matches);
* ``HH:MM - HH:MM`` ranges, several comma-separated, over midnight allowed; the start
  minute is included, the end minute excluded;
* the older DicomFlowRouter cyclic form ``m10 < 5``: open while minute % 10 < 5.

Times are the router host's local wall-clock time, like cron.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from croniter import croniter

from pipeline.errors import WindowSyntaxError

_RANGE = r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*"
_RANGE_RE = re.compile(_RANGE)
_RANGE_LIST_RE = re.compile(rf"{_RANGE}(,{_RANGE})*")
_CYCLIC_RE = re.compile(r"\s*m\s*(\d+)\s*<\s*(\d+)\s*")


@dataclass(frozen=True)
class Window:
    """A delivery window; empty means always open."""

    source: tuple[str, ...]
    crons: tuple[str, ...]

    @property
    def always_open(self) -> bool:
        return not self.crons

    def is_open(self, now: datetime) -> bool:
        """True if the minute containing ``now`` is inside the window."""
        if self.always_open:
            return True
        minute = now.replace(second=0, microsecond=0)
        return any(croniter.match(expr, minute) for expr in self.crons)

    def next_open(self, now: datetime) -> datetime:
        """``now`` if open, else the start of the next open minute."""
        if self.is_open(now):
            return now
        minute = now.replace(second=0, microsecond=0)
        return min(croniter(expr, minute).get_next(datetime) for expr in self.crons)

    def next_close(self, now: datetime, horizon_days: int = 8) -> datetime | None:
        """The first minute after ``now`` that is closed (None if always open)."""
        if self.always_open:
            return None
        minute = now.replace(second=0, microsecond=0)
        for _ in range(horizon_days * 24 * 60):
            minute += timedelta(minutes=1)
            if not self.is_open(minute):
                return minute
        return None

    def describe(self) -> str:
        return "always" if self.always_open else "; ".join(self.source)


ALWAYS = Window((), ())


def parse_window(text: str) -> Window:
    """Parse a window value (multi-line INI value); raise WindowSyntaxError if invalid."""
    sources: list[str] = []
    crons: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        sources.append(line)
        crons.extend(_compile_line(line))
    return Window(tuple(sources), tuple(crons))


def _compile_line(line: str) -> list[str]:
    if _RANGE_LIST_RE.fullmatch(line):
        result: list[str] = []
        for part in line.split(","):
            result.extend(_range_to_crons(part))
        return result
    cyclic = _CYCLIC_RE.fullmatch(line)
    if cyclic:
        return [_cyclic_to_cron(int(cyclic.group(1)), int(cyclic.group(2)), line)]
    if len(line.split()) == 5 and croniter.is_valid(line):
        return [_normalise_cron(line)]
    raise WindowSyntaxError(
        f"{line!r} is not a cron expression, an 'HH:MM - HH:MM' range or 'mN < K'"
    )


def _parse_hhmm(hour: str, minute: str, text: str) -> int:
    h, m = int(hour), int(minute)
    if h > 24 or m > 59 or (h == 24 and m != 0):
        raise WindowSyntaxError(f"{text.strip()!r}: {hour}:{minute} is not a time of day")
    return h * 60 + m


def _range_to_crons(text: str) -> list[str]:
    match = _RANGE_RE.fullmatch(text)
    assert match is not None
    start = _parse_hhmm(match.group(1), match.group(2), text)
    end = _parse_hhmm(match.group(3), match.group(4), text) % (24 * 60)
    start %= 24 * 60
    if start == end:
        raise WindowSyntaxError(f"{text.strip()!r} is empty (start equals end)")
    if start < end:
        return _minutes_to_crons(start, end)
    return _minutes_to_crons(start, 24 * 60) + _minutes_to_crons(0, end)


_DEGENERATE_RANGE = re.compile(r"(?<![\d/-])(\d+)-(\d+)(?![\d/-])")


def _normalise_cron(expr: str) -> str:
    """Rewrite ``N-N`` ranges of a user's cron expression as ``N`` (croniter 7 would
    take them as ``*``: "0 23-23 * * *" would be open at every hour)."""
    return _DEGENERATE_RANGE.sub(
        lambda m: m.group(1) if int(m.group(1)) == int(m.group(2)) else m.group(0), expr
    )


def _span(first: int, last: int) -> str:
    """A cron field for first..last; croniter mis-reads one-value ranges like "23-23"."""
    return f"{first}" if first == last else f"{first}-{last}"


def _minutes_to_crons(start: int, end: int) -> list[str]:
    """Cron expressions covering minutes-of-day [start, end)."""
    crons: list[str] = []
    if start >= end:
        return crons
    sh, sm = divmod(start, 60)
    eh, em = divmod(end, 60)
    if sh == eh:
        return [f"{_span(sm, em - 1)} {sh} * * *"]
    if sm:
        crons.append(f"{_span(sm, 59)} {sh} * * *")
        sh += 1
    if sh < eh:
        crons.append(f"* {_span(sh, eh - 1)} * * *")
    if em:
        crons.append(f"{_span(0, em - 1)} {eh} * * *")
    return crons


def _cyclic_to_cron(modulo: int, threshold: int, text: str) -> str:
    if not 1 <= modulo <= 60 or not 1 <= threshold <= modulo:
        raise WindowSyntaxError(f"{text!r}: need 1 <= K <= N <= 60 in 'mN < K'")
    minutes = [m for m in range(60) if m % modulo < threshold]
    return f"{','.join(map(str, minutes))} * * * *"
