"""Backoff: exponential, capped, and jitter only ever shortens a wait (the cap is a bound)."""

from __future__ import annotations

import random

from pipeline.backoff import Backoff, delay


def test_delay_grows_exponentially_until_the_cap() -> None:
    no_jitter = [delay(n, 0.5, 5.0, jitter=0.0) for n in range(1, 8)]
    assert no_jitter == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_jitter_only_shortens_and_the_cap_is_a_true_bound() -> None:
    rng = random.Random(1)
    for attempt in range(1, 60):
        full = min(5.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(50):
            value = delay(attempt, 0.5, 5.0, rng)
            assert full * 0.5 <= value <= full <= 5.0


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert delay(10_000, 10.0, 600.0, jitter=0.0) == 600.0


def test_backoff_resets_when_the_endpoint_answers_again() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(3))
    waits = [backoff.next_delay() for _ in range(6)]
    assert all(w <= 8.0 for w in waits)
    assert waits[0] <= 1.0 and waits[-1] >= 4.0
    backoff.reset()
    assert backoff.next_delay() <= 1.0
