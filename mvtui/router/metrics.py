"""The router's own Prometheus metrics, on a registry that is passed in."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mvtui.cluster.state import Cluster, Server
from mvtui.routing.breaker import BreakerState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BREAKER_VALUE = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, cluster: Cluster) -> None:
        self.registry = registry
        self.requests = Counter(
            "mvtui_requests", "Requests answered, by server, model and status", ["server", "model", "status"], registry=registry
        )
        self.retries = Counter(
            "mvtui_retries", "Requests retried on another server, by the server that failed", ["server"], registry=registry
        )
        self.latency = Histogram(
            "mvtui_request_latency_seconds", "Time from request to last byte", ["model"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.ttft = Histogram(
            "mvtui_time_to_first_token_seconds", "Time to the first streamed chunk", ["model"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.upstream_errors = Counter(
            "mvtui_upstream_errors",
            "Failed tries on a server (5xx, redirect, timeout, cut, connect...), by server and kind",
            ["server", "kind"],
            registry=registry,
        )
        self.poll_errors = Counter("mvtui_poll_errors", "Failed health or metrics polls", ["server", "kind"], registry=registry)
        self.queue_wait = Histogram(
            "mvtui_queue_wait_seconds",
            "Time a request waited in the router's queue for a free server (requests that waited)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries_denied = Counter(
            "mvtui_retries_denied", "Retries not made because the retry budget ([router] retry_budget) was spent", registry=registry
        )
        registry.register(ClusterCollector(cluster))

    def count_poll_error(self, server: Server, kind: str) -> None:
        self.poll_errors.labels(server.name, kind).inc()


class ClusterCollector(Collector):
    """Gauges read from the cluster at scrape time, so the request path pays nothing."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        in_flight = GaugeMetricFamily("mvtui_in_flight_requests", "Requests the router has sent and not seen finish", labels=["server"])
        up = GaugeMetricFamily("mvtui_server_up", "1 when the server is healthy", labels=["server"])
        load = GaugeMetricFamily("mvtui_server_load", "Load score used for routing", labels=["server"])
        routable = GaugeMetricFamily("mvtui_server_routable", "1 when the server may get new requests", labels=["server"])
        breaker = GaugeMetricFamily(
            "mvtui_server_breaker_state", "Circuit breaker: 0 closed, 1 half-open (a probe out), 2 open", labels=["server"]
        )
        opened = CounterMetricFamily("mvtui_breaker_opened", "Times the server's circuit breaker opened", labels=["server"])
        for server in self.cluster:
            in_flight.add_metric([server.name], server.in_flight)
            up.add_metric([server.name], 1.0 if server.is_up else 0.0)
            load.add_metric([server.name], server.load)
            routable.add_metric([server.name], 1.0 if server.routable else 0.0)
            breaker.add_metric([server.name], BREAKER_VALUE[server.breaker.state])
            opened.add_metric([server.name], server.breaker.opened)
        yield from (in_flight, up, load, routable, breaker, opened, *self._speeds(), self._queues())

    def _speeds(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        """What the router learned of each server's speed per model, where it knows it."""
        ttft = GaugeMetricFamily(
            "mvtui_server_ttft_seconds",
            "The router's learned estimate (EWMA) of a server's time to first token for a model, from its streams and vLLM's histograms",
            labels=["server", "model"],
        )
        tpot = GaugeMetricFamily(
            "mvtui_server_time_per_output_token_seconds",
            "The router's learned estimate (EWMA) of a server's time per output token of one sequence for a model",
            labels=["server", "model"],
        )
        for server in self.cluster:
            for model, speed in sorted(server.speeds.items()):
                if speed.ttft is not None and math.isfinite(speed.ttft):
                    ttft.add_metric([server.name, model], speed.ttft)
                if speed.tpot is not None and math.isfinite(speed.tpot):
                    tpot.add_metric([server.name, model], speed.tpot)
        return ttft, tpot

    def _queues(self) -> GaugeMetricFamily:
        depth = GaugeMetricFamily("mvtui_queue_depth", "Requests waiting in the router's queue for a free server", labels=["model"])
        for model, stats in sorted(self.cluster.queues.items()):
            depth.add_metric([model], stats.depth)
        return depth
