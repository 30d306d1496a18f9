"""What the router learns of a server's speed, and what it expects a request to cost there.

Pure arithmetic: no I/O, no clock of its own. A `Speed` holds exponentially weighted moving
averages of one server's time to first token and time per output token for one model, fed
by the router's own streams (one sample per answer) and by vLLM's latency histograms (one
sample per scrape, weighted by how many requests it covers). `AnswerLength` is the same for
how long a model's answers are, for requests that do not say (`max_tokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# How much one answer moves an average: about ten answers replace what it knew.
SAMPLE_WEIGHT = 0.2
# What one scrape's histogram delta may move it at most, however many requests it covers.
MAX_STEP = 0.8
# Samples beyond this are a server's hiccup or a hostile answer, not a speed.
MAX_SECONDS = 3600.0


def _blend(old: float | None, sample: float, weight: float) -> float:
    return sample if old is None else old + weight * (sample - old)


def _weight(count: float) -> float:
    """How far `count` samples of one mean move an average: as far as `count` single samples."""
    return min(MAX_STEP, 1.0 - float((1.0 - SAMPLE_WEIGHT) ** max(1.0, count)))


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and 0.0 <= value <= MAX_SECONDS


@dataclass
class Speed:
    """A server's learned speed for one model."""

    ttft: float | None = None  # seconds to the first token
    tpot: float | None = None  # seconds per output token after the first, per sequence
    samples: int = 0

    def observe(self, ttft: float | None, tpot: float | None, count: float = 1) -> None:
        """`count` requests (a histogram's delta) whose mean TTFT and TPOT were these."""
        weight = _weight(count)
        if _usable(ttft):
            assert ttft is not None
            self.ttft = _blend(self.ttft, ttft, weight)
        if _usable(tpot):
            assert tpot is not None
            self.tpot = _blend(self.tpot, tpot, weight)
        self.samples += 1

    def observe_answer(self, seconds: float, tokens: int | None, ttft: float | None) -> None:
        """One answer of the router's own: streamed (`ttft` known: the rest was decoding) or
        whole (only its duration: the decoding is what the known TTFT does not explain)."""
        if not _usable(seconds) or not tokens or tokens < 1:
            return
        if ttft is not None:
            self.observe(ttft, (seconds - ttft) / (tokens - 1) if tokens > 1 else None)
        else:  # with no TTFT known yet, the prefill counts as decoding: slower, never faster
            self.observe(None, max(0.0, seconds - (self.ttft or 0.0)) / tokens)

    @property
    def known(self) -> bool:
        """Enough to expect a time: its pace (a TTFT not yet seen counts as none)."""
        return self.tpot is not None

    def seconds(self, tokens: float) -> float:
        """The expected time of an answer of `tokens` tokens, once started."""
        return (self.ttft or 0.0) + max(0.0, tokens - 1) * (self.tpot or 0.0)

    @property
    def tokens_per_s(self) -> float | None:
        """One sequence's decoding speed."""
        return 1.0 / self.tpot if self.tpot else None


@dataclass
class AnswerLength:
    """How many tokens a model's answers have, on average."""

    mean: float | None = None

    def observe(self, tokens: int | None) -> None:
        if tokens is not None and 0 < tokens < 10_000_000:
            self.mean = _blend(self.mean, float(tokens), SAMPLE_WEIGHT / 2)


@dataclass(frozen=True)
class Latency:
    """One scrape's cumulative latency histograms for a model (sums in seconds, counts)."""

    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    tpot_sum: float = 0.0
    tpot_count: float = 0.0

    def since(self, before: Latency) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        """The mean TTFT and TPOT over what happened between two scrapes, with their counts;
        None where nothing happened or a counter went back (a restart)."""
        return (
            _mean(self.ttft_sum - before.ttft_sum, self.ttft_count - before.ttft_count),
            _mean(self.tpot_sum - before.tpot_sum, self.tpot_count - before.tpot_count),
        )


def _mean(total: float, count: float) -> tuple[float, float] | None:
    if count < 1 or total < 0 or not math.isfinite(total) or not math.isfinite(count):
        return None
    return total / count, count
