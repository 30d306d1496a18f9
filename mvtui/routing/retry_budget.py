"""How many retries the router may make: a share of the requests over a sliding window.

A failing cluster must not be hit by a retry storm: every failed try that is retried is one
more request on servers that are already in trouble. Retries over the last `window_s`
seconds may be at most `ratio` of the requests that arrived in it, plus a small floor so
that a quiet router can still retry the odd failure. Counted in one-second buckets: the hot
path adds one to an integer.
"""

from __future__ import annotations

import math
import random

WINDOW_S = 10
MIN_RETRIES = 10  # per window, whatever the traffic (more than a breaker needs to open)
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


class RetryBudget:
    def __init__(self, ratio: float = 0.2, window_s: int = WINDOW_S) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self._requests = [0] * window_s
        self._retries = [0] * window_s
        self._second = -1  # the bucket's second, for the current one
        self.denied = 0  # retries refused, for /metrics

    def _bucket(self, now: float) -> int:
        second = int(now)
        if second != self._second:
            self._advance(second)
        return second % self.window_s

    def _advance(self, second: int) -> None:
        """Empty the buckets of the seconds that passed since the last one in use."""
        if self._second >= 0:
            for passed in range(self._second + 1, min(second, self._second + self.window_s) + 1):
                index = passed % self.window_s
                self._requests[index] = self._retries[index] = 0
        self._second = second

    def request(self, now: float) -> None:
        """A client request arrived (its first try)."""
        self._requests[self._bucket(now)] += 1

    def allows(self, now: float) -> bool:
        """May one more retry go out now?"""
        self._bucket(now)
        allowed = max(MIN_RETRIES, math.floor(self.ratio * sum(self._requests)))
        return sum(self._retries) < allowed

    def spend(self, now: float) -> None:
        self._retries[self._bucket(now)] += 1

    def deny(self) -> None:
        self.denied += 1


def backoff(number: int, rng: random.Random) -> float:
    """The pause before retry `number` (0 for the first): doubling from BACKOFF_FIRST_S up to
    BACKOFF_MAX_S, half of it at random, so that retries of one burst do not arrive in step."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0**number)
    return ceiling / 2 + rng.uniform(0, ceiling / 2)
