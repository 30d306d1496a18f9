"""The router's own endpoints on its port: /health, /load-stats, /metrics."""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mvtui.cluster.state import Cluster, QueueStats, Server
from mvtui.routing.speed import Speed


def server_status(server: Server) -> dict[str, Any]:
    """One server as /health and /load-stats show it (a superset of mvllm's fields)."""
    return {
        "name": server.name,
        "url": server.display_url,  # never the credentials a URL may carry
        "state": server.state,
        "healthy": server.is_up,
        "routable": server.routable,
        "models": list(server.models),
        "running": server.running,
        "waiting": server.waiting,
        "capacity": server.capacity,
        "max_concurrent_requests": server.capacity,
        "load": round(server.load, 4),
        "in_flight": server.in_flight,
        "remote_in_flight": server.remote_in_flight,  # the other replicas' of a fleet ([cluster])
        "total_in_flight": server.total_in_flight,
        "sent_since_scrape": server.sent_since_scrape,
        "kv_cache_usage": server.metrics.kv_cache_usage,
        "draining": server.drain,
        "sleep_level": server.sleep_level,
        "requests": server.stats.requests,
        "errors": server.stats.errors,
        "retries": server.stats.retries,
        "ttft_p50": server.stats.ttft_p50,
        "last_error": server.last_error or None,
        "metrics_available": server.metrics_available,
        "has_metrics": server.has_metrics,
        "slot_limit": server.slot_limit,  # null: no limit known (requests are not held for it)
        "has_room": server.has_room,
        "breaker_state": server.breaker_state,
        "breaker_retry_in": round(server.breaker.retry_in(time.monotonic()), 3),
        "breaker_failures": server.breaker.failures,
        "poll_crashes": server.poll_crashes,
        **speed_fields(server),
    }


def speed_fields(server: Server) -> dict[str, Any]:
    """What the router learned of its speed (routing/speed.py): its first model's TTFT and one
    sequence's decoding speed, then every model's; null where nothing is known yet."""
    first = server.speed
    return {
        "ttft_s": _rounded(first.ttft if first else None, 4),
        "tokens_per_s_per_seq": _rounded(first.tokens_per_s if first else None, 2),
        "speeds": {model: speed_status(speed) for model, speed in sorted(server.speeds.items()) if _learned(speed)},
    }


def speed_status(speed: Speed) -> dict[str, Any]:
    return {
        "ttft_s": _rounded(speed.ttft, 4),
        "tpot_s": _rounded(speed.tpot, 6),
        "tokens_per_s": _rounded(speed.tokens_per_s, 2),
        "samples": speed.samples,
    }


def _learned(speed: Speed) -> bool:
    return speed.ttft is not None or speed.tpot is not None


def _rounded(value: float | None, digits: int) -> float | None:
    """A number JSON can carry: never NaN or infinite."""
    return round(value, digits) if value is not None and math.isfinite(value) else None


def queue_status(stats: QueueStats, now: float) -> dict[str, Any]:
    """One model's queue in the router, as /load-stats shows it."""
    return {
        "depth": stats.depth,
        "oldest_wait": round(stats.oldest_wait(now), 3),
        "admitted": stats.admitted,
        "mean_wait": round(stats.mean_wait, 4),
        "last_wait": round(stats.last_wait, 4),
        "rejected_full": stats.full,
        "timed_out": stats.timed_out,
    }


class StatusEndpoints:
    def __init__(self, cluster: Cluster, registry: CollectorRegistry) -> None:
        self.cluster = cluster
        self.registry = registry

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health),
            web.get("/load-stats", self.load_stats),
            web.get("/metrics", self.metrics),
        ]

    async def health(self, request: web.Request) -> web.Response:
        servers = [server_status(server) for server in self.cluster]
        healthy = sum(server["healthy"] for server in servers)
        degraded = self.cluster.fleet is not None and self.cluster.fleet.degraded  # Redis away: still serving
        body = {
            "status": ("degraded" if degraded else "healthy") if healthy else "unhealthy",
            "healthy_servers": healthy,
            "total_servers": len(servers),
            "servers": servers,
        }
        if self.cluster.faults:  # parts of mvtui that crashed and are restarting
            body["faults"] = dict(self.cluster.faults)
        if self.cluster.fleet is not None:
            body["fleet"] = self.cluster.fleet.as_json()
        return web.json_response(body, status=200 if healthy else 503)

    async def load_stats(self, request: web.Request) -> web.Response:
        summary = self.cluster.summary()
        body = {
            "servers": [server_status(server) for server in self.cluster],
            "healthy_servers": summary.up,
            "total_servers": summary.total,
            "in_flight": summary.in_flight,
            "queued": summary.queued,
            "queues": {model: queue_status(stats, time.monotonic()) for model, stats in sorted(self.cluster.queues.items())},
            "models": self.cluster.models(),
        }
        if self.cluster.fleet is not None:  # the replicas sharing the cluster ([cluster] redis_url)
            body["fleet"] = self.cluster.fleet.as_json()
        return web.json_response(body)

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response
