"""Backends that misbehave (NaN metrics, garbage /v1/models, HTML /is_sleeping, no /metrics,
impossible URLs, credentials in the URL) must never break routing, kill a poll task silently or
leak a secret. The poller runs in the test's loop against tests.hostile; the end-to-end checks
run the router as a process in front of it."""

from __future__ import annotations

import base64
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

import mvtui.cluster.poller as poller_module
from mvtui.cluster.poller import Poller, backoff
from mvtui.cluster.state import Cluster, ClusterEvent, Health, Server
from mvtui.cluster.vllm import MAX_ANSWER_BYTES, parse_metrics
from mvtui.config.schema import ServerConfig, TimingConfig
from mvtui.router.endpoints import server_status
from mvtui.routing.policies import Route, balanced, least_loaded, power_of_two
from tests import http
from tests.helpers import Proc, eventually, start_sim, wait_until
from tests.hostile import Answer, HostileBackend, html_answer, json_answer, metrics_page
from tests.router_setup import start_router, write_config

FAST = TimingConfig(health_check_interval=0.1, metrics_interval=0.05, fail_threshold=2, recover_threshold=1, request_timeout=5)


@dataclass
class Polling:
    cluster: Cluster
    poller: Poller
    events: list[ClusterEvent]
    errors: list[tuple[str, str]]

    def server(self, url: str) -> Server:
        return self.cluster.servers[url]

    def kinds(self, server: Server) -> list[str]:
        return [event.kind for event in self.events if event.server == server.name]


@asynccontextmanager
async def polling(*configs: ServerConfig, timing: TimingConfig = FAST) -> AsyncIterator[Polling]:
    cluster = Cluster(timing)
    events: list[ClusterEvent] = []
    cluster.subscribe(events.append)
    errors: list[tuple[str, str]] = []
    for config in configs:
        cluster.add(config)
    async with aiohttp.ClientSession() as session:
        poller = Poller(cluster, session, lambda: timing, lambda server, kind: errors.append((server.name, kind)))
        poller.reconcile()
        try:
            yield Polling(cluster, poller, events, errors)
        finally:
            await poller.stop()


# --- NaN and infinite metrics ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf", "1e400", "-3"])
def test_non_finite_or_negative_samples_count_as_absent(value: str) -> None:
    page = metrics_page("demo", running=value, waiting=value, kv=value).body.decode()
    metrics = parse_metrics(page + 'vllm:num_requests_running{engine="1",model_name="demo"} 2\n')
    assert metrics.running == 2.0 and metrics.waiting == 0.0
    assert metrics.kv_cache_usage is None


def test_samples_that_overflow_when_summed_count_as_absent() -> None:
    line = 'vllm:num_requests_running{{engine="{}",model_name="demo"}} 1.5e308\n'
    metrics = parse_metrics(line.format(0) + line.format(1))
    assert metrics.running == 0.0


def test_a_metric_name_without_a_value_is_not_read_as_one() -> None:
    assert parse_metrics("vllm:num_requests_running5\nvllm:num_requests_waiting\n").running == 0.0


@dataclass
class Fake:
    running: float
    waiting: float = 0.0
    capacity: int = 1
    sent_since_scrape: int = 0
    in_flight: int = 0
    total_in_flight: int = 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_policies_choose_a_finite_candidate_whatever_the_order(bad: float) -> None:
    rng = random.Random(1)
    for candidates in ([Fake(bad), Fake(1.0)], [Fake(1.0), Fake(bad)]):
        assert balanced(candidates, Route(rng)).running == 1.0
        assert power_of_two(candidates, Route(rng)).running == 1.0
    broken = [Fake(bad, in_flight=0, capacity=1), Fake(bad)]
    assert balanced(broken, Route(rng)) in broken
    assert least_loaded(broken, Route(rng)) in broken


def test_a_backend_reporting_nan_does_not_break_routing_for_its_model(tmp_path: Path) -> None:
    backend = HostileBackend("demo")
    backend.answer("/metrics", metrics_page("demo", running="NaN", waiting="NaN", kv="NaN"))
    sim = start_sim("demo")
    router: Proc | None = None
    try:
        with backend.threaded() as url:
            # the NaN server first: it used to empty the tie list
            router = start_router(write_config(tmp_path / "servers.toml", [url, sim.url]))
            wait_until(lambda: http.get(router.url + "/load-stats").json()["healthy_servers"] == 2)
            wait_until(lambda: backend.hits["/metrics"] >= 2)
            statuses = [
                http.post(
                    router.url + "/v1/chat/completions",
                    json={"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                ).status_code
                for _ in range(10)
            ]
            assert statuses == [200] * 10
            stats = http.get(router.url + "/load-stats").json()
            assert all(math.isfinite(server["load"]) for server in stats["servers"])
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


# --- /v1/models, /is_sleeping and URLs that used to kill the poll task -----------------------------

GARBAGE_MODELS = {
    "data is a string": json_answer({"object": "list", "data": "abc"}),
    "data is an object": json_answer({"data": {"id": "demo"}}),
    "a list, not an object": json_answer([1, 2]),
    "cards are not objects": json_answer({"data": [1, "demo"]}),
    "a number as id": json_answer({"data": [{"id": 123}]}),
    "no id": json_answer({"data": [{"name": "demo"}]}),
    "html": html_answer(),
    "NaN inside": Answer(200, b'{"data": [{"id": "demo", "created": NaN}]}'),
    "nested too deep": Answer(200, b"[" * 100_000 + b"]" * 100_000),
    "not UTF-8": Answer(200, b'{"data": [{"id": "\xff\xfe"}]}'),
}


@pytest.mark.parametrize("answer", GARBAGE_MODELS.values(), ids=GARBAGE_MODELS.keys())
async def test_a_garbage_model_list_is_an_error_on_the_server_and_polling_goes_on(answer: Answer) -> None:
    async with HostileBackend() as backend:
        backend.answer("/v1/models", answer)
        async with polling(ServerConfig(url=backend.url)) as run:
            server = run.server(backend.url)
            await eventually(lambda: server.health.state is Health.DOWN, what="down")
            assert "/v1/models" in server.last_error
            assert server.discovered_models == ()
            backend.answer("/v1/models", json_answer({"data": [{"id": "demo"}]}))
            await eventually(lambda: server.is_up, what="up again: the poll task lives")
            assert server.models == ("demo",)
            assert (server.name, "models") in run.errors


async def test_an_oversized_answer_is_refused_unread() -> None:
    async with HostileBackend() as backend:
        backend.answer("/v1/models", Answer(200, b" " * (MAX_ANSWER_BYTES + 1)))
        async with polling(ServerConfig(url=backend.url)) as run:
            server = run.server(backend.url)
            await eventually(lambda: server.health.state is Health.DOWN, what="down")
            assert "more than" in server.last_error


async def test_an_html_is_sleeping_answer_does_not_stop_polling() -> None:
    async with HostileBackend() as backend:
        backend.answer("/is_sleeping", html_answer())
        async with polling(ServerConfig(url=backend.url)) as run:
            server = run.server(backend.url)
            await eventually(lambda: server.is_up, what="up")
            assert server.sleep_capable is False
            backend.answer("/metrics", metrics_page("demo", running="3"))
            await eventually(lambda: server.running == 3.0, what="scraped after the HTML answer")


async def test_a_port_out_of_range_is_down_at_once_and_polling_goes_on() -> None:
    config = ServerConfig(url="http://127.0.0.1:99999")  # the config file refuses it; the poller must survive it
    async with polling(config) as run:
        server = run.server(config.url)
        await eventually(lambda: server.health.state is Health.DOWN, what="down")
        assert server.last_error
        task = run.poller._tasks[config.url]
        failures = server.health.failures
        await eventually(lambda: server.health.failures > failures, what="probed again")
        assert not task.done()


def test_a_non_string_model_id_leaves_load_stats_answering(tmp_path: Path) -> None:
    backend = HostileBackend("demo")
    backend.answer("/v1/models", json_answer({"object": "list", "data": [{"id": 123}]}))
    sim = start_sim("demo")
    router: Proc | None = None
    try:
        with backend.threaded() as url:
            router = start_router(write_config(tmp_path / "servers.toml", [url, sim.url]))
            wait_until(lambda: backend.hits["/v1/models"] >= 3)
            answer = http.get(router.url + "/load-stats")
            assert answer.status_code == 200
            entry = next(server for server in answer.json()["servers"] if server["url"] == url)
            assert "/v1/models" in entry["last_error"] and entry["models"] == []
            assert http.get(router.url + "/v1/models").status_code == 200
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


# --- supervision ---------------------------------------------------------------------------


async def test_a_crashed_poll_is_logged_restarted_with_backoff_and_shown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    real = poller_module.parse_metrics

    def explode_twice(text: str, now: float = 0.0):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("parser bug")
        return real(text, now)

    monkeypatch.setattr(poller_module, "parse_metrics", explode_twice)
    caplog.set_level(logging.ERROR, logger="mvtui.cluster.poller")
    async with HostileBackend() as backend:
        backend.answer("/metrics", metrics_page("demo", running="4"))
        async with polling(ServerConfig(url=backend.url, name="fragile")) as run:
            server = run.server(backend.url)
            await eventually(lambda: "poll fragile" in run.cluster.faults, what="shown as a fault for /health")
            assert "RuntimeError: parser bug" in run.cluster.faults["poll fragile"]
            await eventually(lambda: server.running == 4.0, what="scraped once the crashes are over")
            assert server.poll_crashes == 2 and run.cluster.faults == {}
            assert "RuntimeError: parser bug" in server.last_error
            kinds = [event.kind for event in run.events if event.server == "poll fragile"]
            assert kinds == ["crash", "crash", "restarted"]
            assert ("fragile", "crash") in run.errors
            assert "fragile" in caplog.text and "parser bug" in caplog.text
            shown = server_status(server)
            assert shown["poll_crashes"] == 2 and "parser bug" in shown["last_error"]


def test_crash_and_down_pauses_double_up_to_a_cap() -> None:
    assert [backoff(0.5, streak, 4.0) for streak in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff(0.5, 10_000, 30.0) == 30.0  # no overflow however long the streak


async def test_an_unreachable_server_is_probed_less_and_less_often() -> None:
    timing = TimingConfig(health_check_interval=1.0, metrics_interval=0.1, fail_threshold=1)
    cluster = Cluster(timing)
    server = cluster.add(ServerConfig(url="http://127.0.0.1:9"))
    async with aiohttp.ClientSession() as session:
        poller = Poller(cluster, session, lambda: timing, rng=random.Random(0))
        pauses = []
        for _ in range(8):
            server.health.failure("refused")
            pauses.append(poller._pause(server, timing))
    assert all(later >= earlier * 0.8 for earlier, later in itertools.pairwise(pauses))
    assert pauses[0] < 0.3 and 2.7 <= pauses[-1] <= 3.3  # capped at 3 health-check intervals, +-10 %
    server.health.success()
    assert poller._pause(server, timing) == timing.metrics_interval


# --- /metrics failing while /health answers ---------------------------------------------------------


async def test_a_server_without_metrics_does_not_flap() -> None:
    timing = TimingConfig(health_check_interval=0.1, metrics_interval=0.05, fail_threshold=1, recover_threshold=1)
    async with HostileBackend() as backend:
        backend.answer("/metrics", Answer(404, b'{"detail":"Not Found"}'))
        async with polling(ServerConfig(url=backend.url), timing=timing) as run:
            server = run.server(backend.url)
            await eventually(lambda: backend.hits["/metrics"] >= 4, what="scraped a few times")
            assert server.is_up and run.kinds(server).count("up") == 1 and "down" not in run.kinds(server)
            assert server.metrics_available is False and "404" in server.last_error
            backend.answer("/metrics", metrics_page("demo", running="2"))
            await eventually(lambda: server.metrics_available and server.running == 2.0, what="metrics back")


def test_a_server_without_metrics_is_loaded_by_its_requests_in_flight() -> None:
    server = Server(ServerConfig(url="http://a:1", max_concurrent_requests=2), TimingConfig())
    server.metrics_failed()
    for _ in range(5):
        server.request_started()
    for _ in range(4):
        server.request_finished()
    assert server.sent_since_scrape == 1 and server.load == 0.5


# --- credentials in a server URL ----------------------------------------------------------------


@pytest.fixture
def credentialed(tmp_path: Path) -> Iterator[tuple[Proc, HostileBackend, str]]:
    backend = HostileBackend("demo")
    with backend.threaded() as url:
        secret_url = url.replace("http://", "http://alice:s3cr3t-pw@")
        router = start_router(write_config(tmp_path / "servers.toml", [secret_url]))
        try:
            wait_until(lambda: http.get(router.url + "/health").json()["healthy_servers"] == 1)
            yield router, backend, url
        finally:
            router.stop()


def test_credentials_in_a_server_url_are_never_shown(credentialed: tuple[Proc, HostileBackend, str]) -> None:
    router, backend, url = credentialed
    health = http.get(router.url + "/health").json()
    assert health["servers"][0]["url"] == url and health["servers"][0]["name"] == url.removeprefix("http://")
    for path in ("/health", "/load-stats", "/metrics"):
        text = http.get(router.url + path).text
        assert "s3cr3t" not in text and "alice" not in text, path
    assert "s3cr3t" not in router.log_tail(400)


def test_a_client_authorization_header_with_credentials_in_the_url(credentialed: tuple[Proc, HostileBackend, str]) -> None:
    router, backend, _ = credentialed
    response = http.post(
        router.url + "/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": "Bearer client-key"},
    )
    assert response.status_code == 200, response.text
    sent = backend.headers[-1]["Authorization"]
    assert sent == "Basic " + base64.b64encode(b"alice:s3cr3t-pw").decode()  # the URL's, not the client's
