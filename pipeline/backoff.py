"""Exponential backoff whose jitter only ever shortens the wait.

Jitter spreads retries of many senders apart; taking it only *downwards* keeps the
configured cap a true bound, so a returning destination is noticed within the cap
(README, How it works: at most 5 s between probes by default).
"""

from __future__ import annotations

import random


def delay(attempt: int, base: float, cap: float, rng: random.Random | None = None,
          jitter: float = 0.5) -> float:
    """The wait before retry number ``attempt`` (1-based): ``base·2^(attempt-1)``, capped,
    then reduced by up to ``jitter`` (a fraction) at random. Never above ``cap``."""
    exponent = min(max(attempt - 1, 0), 62)
    full = min(cap, base * (2.0**exponent))
    draw = rng.random() if rng is not None else random.random()
    return full * (1.0 - jitter * draw)


class Backoff:
    """Successive waits for one thing (an endpoint's probes): grows until ``reset``."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        self.attempt += 1
        return delay(self.attempt, self.base, self.cap, self.rng)

    def reset(self) -> None:
        self.attempt = 0
