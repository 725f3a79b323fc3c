"""Delivery windows: cron expressions, HH:MM ranges and ``mN < K``, all answered by croniter."""

from __future__ import annotations

from datetime import datetime

import pytest

from pipeline.errors import WindowSyntaxError
from pipeline.schedule import parse_window

NOON = datetime(2026, 11, 28, 12, 3, 30)  # a Saturday


@pytest.mark.parametrize("text,open_at_noon,next_open", [
    ("19:00 - 07:00", False, datetime(2026, 11, 28, 19, 0)),
    ("22:30-6:00", False, datetime(2026, 11, 28, 22, 30)),      # croniter read "23-23" as "*"
    ("19:00 - 00:00", False, datetime(2026, 11, 28, 19, 0)),    # used to compile to "0--1 0 * * *"
    ("23:00-23:01", False, datetime(2026, 11, 28, 23, 0)),
    ("12:00 - 12:04", True, NOON),
    ("12:04 - 12:05", False, datetime(2026, 11, 28, 12, 4)),
    ("18:00-22:00, 22:30-6:00", False, datetime(2026, 11, 28, 18, 0)),
    ("*/10 19-23 * * 1-5", False, datetime(2026, 11, 30, 19, 0)),
    ("0 23-23 * * *", False, datetime(2026, 11, 28, 23, 0)),     # a user's N-N range is N
    ("m10 < 5", True, NOON),
    ("m10 < 3", False, datetime(2026, 11, 28, 12, 10)),
])
def test_is_open_and_next_open(text: str, open_at_noon: bool, next_open: datetime) -> None:
    window = parse_window(text)
    assert window.is_open(NOON) is open_at_noon
    assert window.next_open(NOON) == next_open


def test_start_minute_included_end_minute_excluded() -> None:
    window = parse_window("12:01 - 12:03")
    assert not window.is_open(datetime(2026, 1, 1, 12, 0, 59))
    assert window.is_open(datetime(2026, 1, 1, 12, 1, 0))
    assert window.is_open(datetime(2026, 1, 1, 12, 2, 59))
    assert not window.is_open(datetime(2026, 1, 1, 12, 3, 0))


def test_several_lines_are_combined() -> None:
    window = parse_window("0 3 * * *\n12:00 - 12:05\n")
    assert window.is_open(NOON)
    assert window.next_open(datetime(2026, 1, 1, 13, 0)) == datetime(2026, 1, 2, 3, 0)


def test_empty_window_is_always_open() -> None:
    window = parse_window("")
    assert window.always_open and window.is_open(NOON) and window.next_close(NOON) is None


@pytest.mark.parametrize("text", ["25:00 - 26:00", "10:00 - 10:00", "every night", "* * *",
                                  "m0 < 1", "* * * * * 30", "12:60 - 13:00"])
def test_malformed_window_is_an_error_never_always_open(text: str) -> None:
    with pytest.raises(WindowSyntaxError):
        parse_window(text)
