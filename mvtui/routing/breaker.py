"""A circuit breaker for one server: pure state, no I/O, no clock of its own.

Closed: requests flow; `failures` consecutive failed tries (a connection error, a timeout, a
5xx; never a 4xx) open it. Open: no requests until the cool-down ends, then exactly one probe
may go (the breaker is half-open while it is out). The probe's success closes the breaker;
its failure opens it again for twice the last cool-down, at most `max_cooldown`. A probe whose
client left says nothing about the server: the next request may probe instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class BreakerSettings:
    enabled: bool = True
    failures: int = 5
    cooldown: float = 5.0
    max_cooldown: float = 60.0


class Breaker:
    """One server's breaker. Every method takes `now` (monotonic seconds) from the caller and
    returns the new state when it changed, else None (so that the caller can log changes)."""

    __slots__ = ("state", "failures", "cooldown", "until", "opened")

    def __init__(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive failed tries
        self.cooldown = 0.0  # the last cool-down, doubled after a failed probe
        self.until = 0.0  # an open breaker lets a probe through from this time on
        self.opened = 0  # times it opened, for /metrics

    def allows(self, now: float) -> bool:
        """May a request be sent now (a closed breaker, or an open one whose cool-down ended)?"""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.OPEN and now >= self.until)

    def retry_in(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when it does now, or is closed)."""
        return max(0.0, self.until - now) if self.state is BreakerState.OPEN else 0.0

    def dispatched(self) -> BreakerState | None:
        """A request was sent: through an open breaker, that request is its one probe."""
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
            return self.state
        return None

    def succeeded(self) -> BreakerState | None:
        self.failures = 0
        if self.state is BreakerState.CLOSED:
            return None
        self.state, self.cooldown = BreakerState.CLOSED, 0.0
        return self.state

    def failed(self, now: float, settings: BreakerSettings) -> BreakerState | None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN:
            return self._open(now, min(settings.max_cooldown, max(self.cooldown, settings.cooldown) * 2))
        if self.state is BreakerState.CLOSED and settings.enabled and self.failures >= settings.failures:
            return self._open(now, min(settings.max_cooldown, settings.cooldown))
        return None

    def released(self, now: float) -> BreakerState | None:
        """The probe ended without a verdict (its client left): another request may probe."""
        if self.state is not BreakerState.HALF_OPEN:
            return None
        self.state, self.until = BreakerState.OPEN, now
        return self.state

    def reset(self) -> BreakerState | None:
        """Closed again, whatever it was (the breaker was turned off)."""
        self.failures = 0
        if self.state is BreakerState.CLOSED:
            return None
        self.state, self.cooldown = BreakerState.CLOSED, 0.0
        return self.state

    def _open(self, now: float, cooldown: float) -> BreakerState:
        self.state, self.cooldown, self.until = BreakerState.OPEN, cooldown, now + cooldown
        self.opened += 1
        return self.state
