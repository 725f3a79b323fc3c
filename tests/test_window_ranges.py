"""``HH:MM - HH:MM`` windows compiled to cron agree with plain minute arithmetic."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from pipeline.schedule import parse_window


def naive_open(start: int, end: int, minute_of_day: int) -> bool:
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end


CASES = [(19 * 60, 7 * 60), (22 * 60 + 30, 6 * 60), (18 * 60 + 30, 22 * 60 + 15), (22 * 60 + 5, 22 * 60 + 6),
         (23 * 60, 0), (0, 1), (23 * 60 + 59, 0), (12 * 60 + 59, 13 * 60 + 1)]
rng = random.Random(7)
CASES += [tuple(rng.sample(range(24 * 60), 2)) for _ in range(12)]


@pytest.mark.parametrize("start,end", CASES)
def test_range_matches_every_minute_of_a_day(start: int, end: int) -> None:
    text = f"{start // 60:02d}:{start % 60:02d} - {end // 60:02d}:{end % 60:02d}"
    window = parse_window(text)
    day = datetime(2026, 3, 3)
    edges = {m % (24 * 60) for m in (start - 1, start, start + 1, end - 1, end, end + 1)}
    for minute in sorted(set(range(0, 24 * 60, 7)) | edges):
        moment = day + timedelta(minutes=minute, seconds=30)
        assert window.is_open(moment) == naive_open(start, end, minute), (text, moment, window.crons)


@pytest.mark.parametrize("start,end", CASES[:8])
def test_next_open_is_the_range_start(start: int, end: int) -> None:
    text = f"{start // 60:02d}:{start % 60:02d} - {end // 60:02d}:{end % 60:02d}"
    window = parse_window(text)
    now = datetime(2026, 3, 3) + timedelta(minutes=end)  # the first closed minute
    opening = window.next_open(now)
    assert opening.hour * 60 + opening.minute == start
    assert opening > now
