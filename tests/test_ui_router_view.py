"""What the router knows about a server shows in its pane: an open or probing breaker, and
a server without /metrics; the top line counts requests waiting in the router's queue."""

from __future__ import annotations

import re
import time

from mvtui.cluster.fleet_status import FleetStatus, ReplicaStatus
from mvtui.cluster.state import ClusterSummary, Server
from mvtui.config.schema import ServerConfig, TimingConfig
from mvtui.routing.breaker import BreakerSettings
from mvtui.ui import panels


def pane_text(server: Server, *, detailed: bool) -> str:
    return panels.server_body(server, 100, panels.Palette(), detailed=detailed).plain


def test_an_open_then_probing_breaker_shows_in_both_pane_sizes() -> None:
    server = Server(ServerConfig("http://a:1"), TimingConfig())
    assert "breaker" not in pane_text(server, detailed=False)
    settings = BreakerSettings(enabled=True, failures=1, cooldown=30.0, max_cooldown=60.0)
    server.breaker.failed(time.monotonic(), settings)
    for detailed in (False, True):
        assert re.search(r"breaker open, retry in (29|30) s", pane_text(server, detailed=detailed))
    server.breaker.dispatched()
    assert "breaker half-open (probing)" in pane_text(server, detailed=True)


def test_a_server_without_metrics_says_so_instead_of_showing_readings() -> None:
    server = Server(ServerConfig("http://a:1"), TimingConfig())
    assert "no metrics" not in pane_text(server, detailed=False)  # not scraped yet: nothing claimed
    server.metrics_available = False
    assert "no metrics from this server" in pane_text(server, detailed=False)
    assert "no metrics from this server" in pane_text(server, detailed=True)


def test_the_top_line_counts_queued_requests_only_when_there_are_some() -> None:
    summary = ClusterSummary(up=1, total=1, request_rate=0.0, token_rate=0.0, errors=0, retries=0, in_flight=4)
    assert "queued" not in panels.cluster_line(summary, None, panels.Palette(), 160).plain
    waiting = ClusterSummary(up=1, total=1, request_rate=0.0, token_rate=0.0, errors=0, retries=0, in_flight=4, queued=12)
    assert "12 queued" in panels.cluster_line(waiting, None, panels.Palette(), 160).plain


def test_the_fleet_shows_on_top_and_redis_away_in_the_banner() -> None:
    summary = ClusterSummary(up=1, total=1, request_rate=0.0, token_rate=0.0, errors=0, retries=0, in_flight=0)
    replicas = tuple(ReplicaStatus(f"r{n}", f"127.0.0.1:{8000 + n}", 0.0, 0, 0, 0.1, me=n == 2) for n in (1, 2, 3))
    fleet = FleetStatus("r2", "redis://127.0.0.1:6379/0", connected=True, replicas=replicas)
    assert "fleet r2 · 3 replicas" in panels.cluster_line(summary, None, panels.Palette(), 200, fleet=fleet).plain
    assert panels.problems_banner(None, None, panels.Palette(), fleet=fleet) is None
    away = FleetStatus("r2", "redis://127.0.0.1:6379/0", connected=False, problem="Connection refused", replicas=replicas)
    assert "Redis away" in panels.cluster_line(summary, None, panels.Palette(), 200, fleet=away).plain
    text = panels.fleet_away_text(away, panels.Palette()).plain
    assert "redis://127.0.0.1:6379/0 unreachable" in text and "(Connection refused)" in text and "refused until it is back" in text
    assert panels.problems_banner(None, None, panels.Palette(), fleet=away) is not None
