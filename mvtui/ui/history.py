"""Each server's numbers over the last ten minutes, for the details screen's plots.

The dashboard's tick calls `sample` several times a second; a sample is taken every
`period` seconds at most, and each server keeps `window / period` of them, so the memory
is bounded whatever the uptime (about 300 small records a server). Nothing here touches
Textual or the network.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from mvtui.cluster.state import Server

WINDOW_S = 600.0
PERIOD_S = 2.0


@dataclass(frozen=True)
class Sample:
    at: float
    running: float
    waiting: float
    kv_percent: float
    ttft_ms: float
    tokens_per_s: float


METRICS = ("running", "waiting", "kv_percent", "ttft_ms", "tokens_per_s")


def sample_of(server: Server, at: float) -> Sample:
    """What a server shows now; a server that is down or asleep is not scraped, so it runs
    and waits for nothing (its last scrape is history)."""
    awake = server.is_up and not server.asleep
    usage = server.metrics.kv_cache_usage
    ttft = server.stats.ttft_p50
    return Sample(
        at=at,
        running=server.running if awake else 0.0,
        waiting=server.waiting if awake else 0.0,
        kv_percent=usage * 100 if awake and usage is not None else 0.0,
        ttft_ms=ttft * 1000 if ttft is not None else 0.0,
        tokens_per_s=server.current_rates()[1],
    )


class MetricsHistory:
    def __init__(self, window_s: float = WINDOW_S, period_s: float = PERIOD_S) -> None:
        self.period_s = period_s
        self.length = int(window_s / period_s) + 1
        self._series: dict[str, deque[Sample]] = {}
        self._last = -math.inf

    def due(self, now: float) -> bool:
        return now - self._last >= self.period_s

    def sample(self, servers: Iterable[Server], now: float, *, force: bool = False) -> None:
        """A sample of each server when `period_s` has passed since the last (or `force`);
        servers no longer there are forgotten."""
        if not (force or self.due(now)):
            return
        self._last = now
        seen = set()
        for server in servers:
            self.record(server.url, sample_of(server, now))
            seen.add(server.url)
        for url in list(self._series):
            if url not in seen:
                del self._series[url]

    def record(self, url: str, sample: Sample) -> None:
        self._series.setdefault(url, deque(maxlen=self.length)).append(sample)
        self._last = max(self._last, sample.at)

    def samples(self, url: str) -> list[Sample]:
        return list(self._series.get(url, ()))

    def values(self, url: str, metric: str) -> list[float]:
        return [getattr(sample, metric) for sample in self._series.get(url, ())]

    def span(self, url: str) -> float:
        """Seconds between the first and last sample kept for `url`."""
        series = self._series.get(url)
        return series[-1].at - series[0].at if series else 0.0

    def __len__(self) -> int:
        return sum(len(series) for series in self._series.values())
