"""Overload and faults, with a router process in front of simulators: the queue in the router
(late binding, 429 past queue_size, 408 past queue_timeout, disconnects, the openai SDK's own
retries), the circuit breaker, the retry budget, max_request_time, and OpenAI-compatible
servers that are not vLLM (no /metrics, no /health, a key they require)."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import http
from tests.helpers import Proc, start_sim, wait_until
from tests.hostile import Answer, HostileBackend, html_answer
from tests.router_setup import chat, load_stats, metric, server_stats, set_faults, sim_state, start_router, wait_healthy, write_config

LONG = 4000  # tokens (the simulators allow 4096): at 100 tokens/s, a stream that lasts until its client leaves
HELD_TIMEOUT_S = 30.0


class Held:
    """A request on a socket of its own, answered or not: whether its answer has begun, its
    status, and leaving (the client disconnects)."""

    def __init__(self, router: Proc, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        self.sock = socket.create_connection(("127.0.0.1", router.port), timeout=HELD_TIMEOUT_S)
        self.sock.sendall(head.encode() + payload)
        self.received = b""

    def began(self) -> bool:
        """The status line has come (reads what has arrived, without waiting)."""
        while select.select([self.sock], [], [], 0)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received += chunk
        return b"\r\n" in self.received

    @property
    def status(self) -> int:
        return int(self.received.split(b" ", 2)[1])

    def close(self) -> None:
        self.sock.close()


def held(router: Proc, *, stream: bool = True, max_tokens: int = LONG) -> Held:
    return Held(router, chat(max_tokens=max_tokens, stream=stream))


def queue_depth(router: Proc, model: str = "llama") -> int:
    return load_stats(router)["queues"].get(model, {}).get("depth", 0)


def unlabelled(router: Proc, name: str) -> float:
    """A metric without labels (`name value`)."""
    lines = http.get(router.url + "/metrics").text.splitlines()
    return sum(float(line.split()[1]) for line in lines if line.startswith(name + " "))


def stop_all(*procs: Proc | None) -> None:
    for proc in procs:
        if proc is not None:
            proc.stop()


@pytest.fixture
def one_slot(tmp_path: Path) -> Iterator[tuple[Proc, Proc]]:
    """A simulator that could run 4 at once behind a router told it has 1 slot, the queue
    holding 3 (queue_timeout long: nothing here times out)."""
    sim = start_sim("llama", extra=["--max-num-seqs", "4", "--tokens-per-s", "100"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], "[router]\nqueue_size = 3\n", capacity=1))
        wait_healthy(router, 1)
        yield router, sim
    finally:
        stop_all(router, sim)


# --- the queue ----------------------------------------------------------------------------------


def test_a_burst_waits_in_order_and_past_queue_size_gets_an_openai_429(one_slot: tuple[Proc, Proc]) -> None:
    router, sim = one_slot
    first = held(router)
    wait_until(first.began, what="the first stream's answer")
    waiting = []
    for index, stream in enumerate([True, True, False]):  # streams and plain requests queue alike
        waiting.append(held(router, stream=stream, max_tokens=LONG if stream else 2))
        wait_until(lambda count=index + 1: queue_depth(router) == count, what=f"{index + 1} queued")
    full = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
    assert full.status_code == 429
    assert int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["type"] == "RateLimitError" and "queue_size" in full.json()["error"]["message"]
    assert not any(request.began() for request in waiting)
    first.close()  # the one slot frees: the first in line gets it, the others wait on
    for index, request in enumerate(waiting):
        wait_until(request.began, what=f"request {index} served")
        assert request.status == 200
        assert not any(later.began() for later in waiting[index + 1 :]), "served out of order"
        request.close()
    assert sim_state(sim)["received"] == 4  # the 429 never reached it
    assert metric(router, "mvtui_requests_total", server="router", status="429") == 1
    assert metric(router, "mvtui_queue_wait_seconds_count", model="llama") == 3
    wait_until(lambda: queue_depth(router) == 0 and load_stats(router)["queued"] == 0, what="an empty queue")
    assert metric(router, "mvtui_queue_depth", model="llama") == 0


def test_a_client_that_disconnects_while_queued_leaves_the_queue_at_once(one_slot: tuple[Proc, Proc]) -> None:
    router, sim = one_slot
    first = held(router)
    wait_until(first.began, what="the first stream's answer")
    for stream in (True, False):
        leaving = held(router, stream=stream)
        wait_until(lambda: queue_depth(router) == 1, what="one queued")
        leaving.close()
        wait_until(lambda: queue_depth(router) == 0, what="the queue to empty while the slot is still taken")
    first.close()
    assert http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30).status_code == 200
    assert sim_state(sim)["received"] == 2  # the two that left never reached it
    assert metric(router, "mvtui_requests_total", server="router", status="499") == 0  # no answer was owed


def test_a_request_that_waits_past_queue_timeout_gets_an_openai_408(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--max-num-seqs", "4", "--tokens-per-s", "100"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], "[router]\nqueue_timeout = 0.3\n", capacity=1))
        wait_healthy(router, 1)
        first = held(router)
        wait_until(first.began, what="the first stream's answer")
        for stream in (False, True):
            late = http.post(router.url + "/v1/chat/completions", json=chat(stream=stream), timeout=30)
            assert late.status_code == 408
            assert late.headers["retry-after"] and "queue_timeout" in late.json()["error"]["message"]
        first.close()
        assert metric(router, "mvtui_requests_total", server="router", status="408") == 2
        assert load_stats(router)["queues"]["llama"]["timed_out"] == 2
        assert sim_state(sim)["received"] == 1
    finally:
        stop_all(router, sim)


def test_the_openai_sdk_retries_a_429_by_itself_and_succeeds(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--max-num-seqs", "4", "--tokens-per-s", "100"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], "[router]\nqueue_size = 0\n", capacity=1))
        wait_healthy(router, 1)
        first = held(router)
        wait_until(first.began, what="the first stream's answer")
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=5, timeout=30)
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                reply=client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=2)
            )
        )
        thread.start()
        wait_until(lambda: metric(router, "mvtui_requests_total", status="429") >= 1, what="a 429")
        first.close()
        thread.join(60)
        assert result["reply"].usage.completion_tokens == 2
        assert metric(router, "mvtui_requests_total", status="429") >= 1
    finally:
        stop_all(router, sim)


def test_without_the_queue_requests_go_straight_to_a_full_server(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--max-num-seqs", "4", "--tokens-per-s", "100"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], "[router]\nqueue = false\n", capacity=1))
        wait_healthy(router, 1)
        first = held(router)
        wait_until(first.began, what="the first stream's answer")
        assert http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30).status_code == 200
        assert sim_state(sim)["received"] == 2
        first.close()
    finally:
        stop_all(router, sim)


def test_max_request_time_bounds_the_time_upstream(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--max-num-seqs", "4", "--tokens-per-s", "5"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], "[limits]\nmax_request_time = 0.5\n"))
        wait_healthy(router, 1)
        slow = http.post(router.url + "/v1/chat/completions", json=chat(max_tokens=50), timeout=30)  # 10 s of tokens
        assert slow.status_code == 504 and "max_request_time" in slow.json()["error"]["message"]
        with http.stream(router.url + "/v1/chat/completions", json=chat(max_tokens=50, stream=True), timeout=30) as (status, lines):
            assert status == 200
            events = [line for line in lines if line.startswith("data: ")]
        assert "max_request_time" in events[-1]  # the stream under way ends with an error event
        assert metric(router, "mvtui_requests_total", status="504") == 2
    finally:
        stop_all(router, sim)


# --- the circuit breaker and the retry budget ---------------------------------------------------------


def breaker_of(router: Proc, sim: Proc) -> dict[str, Any]:
    return server_stats(router, sim.url)


def test_the_breaker_opens_lets_exactly_one_probe_through_under_load_and_closes(tmp_path: Path) -> None:
    bad, good = start_sim("llama"), start_sim("llama")
    router = None
    try:
        set_faults(bad, fail_rate=1.0)
        extra = "[router]\nbreaker_failures = 2\nbreaker_cooldown = 2\nbreaker_max_cooldown = 2\n"
        router = start_router(write_config(tmp_path / "servers.toml", [bad.url, good.url], extra))
        wait_healthy(router, 2)
        for _ in range(40):  # the failures are retried on the good server: no client sees one
            assert http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30).status_code == 200
            if breaker_of(router, bad)["breaker_state"] == "open":
                break
        assert breaker_of(router, bad)["breaker_state"] == "open"
        assert sim_state(bad)["received"] == 2
        assert metric(router, "mvtui_server_breaker_state", server=breaker_of(router, bad)["name"]) == 2
        set_faults(bad, fail_rate=0.0, hang=True)  # the probe will hang: nothing else may follow it
        wait_until(lambda: breaker_of(router, bad)["breaker_retry_in"] == 0, what="the cool-down to end")
        answers: list[int] = []
        burst = [threading.Thread(target=lambda: answers.append(_status_or_gone(router))) for _ in range(10)]
        for thread in burst:
            thread.start()
        wait_until(lambda: answers.count(200) == 9, what="nine answers from the good server")
        assert sim_state(bad)["received"] == 3  # exactly one probe
        assert breaker_of(router, bad)["breaker_state"] == "half-open"
        for thread in burst:
            thread.join(60)  # the probe's client gives up (timeout) and leaves: no verdict
        set_faults(bad, hang=False)
        for _ in range(200):
            assert http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30).status_code == 200
            if breaker_of(router, bad)["breaker_state"] == "closed":
                break
        assert breaker_of(router, bad)["breaker_state"] == "closed"
        assert "circuit breaker open" in router.log_tail(400) and "circuit breaker closed" in router.log_tail(400)
    finally:
        stop_all(router, bad, good)


def _status_or_gone(router: Proc) -> int:
    try:
        return http.post(router.url + "/v1/chat/completions", json=chat(), timeout=3).status_code
    except TimeoutError:
        return 0


def test_when_every_breaker_is_open_the_answer_is_503_at_once(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--fail-rate", "1.0"])
    router = None
    try:
        extra = "[router]\nbreaker_failures = 2\nbreaker_cooldown = 30\n"
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], extra))
        wait_healthy(router, 1)
        statuses = [http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30).status_code for _ in range(2)]
        assert statuses == [500, 500]  # the only server's own answer, passed on
        refused = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert refused.status_code == 503
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert "circuit breaker" in refused.json()["error"]["message"]
        assert sim_state(sim)["received"] == 2
        assert metric(router, "mvtui_breaker_opened_total") == 1
    finally:
        stop_all(router, sim)


def test_a_failing_cluster_gets_no_retry_storm(tmp_path: Path) -> None:
    """Both servers fail everything and the breaker is off: retries stay within the budget."""
    sims = [start_sim("llama", extra=["--fail-rate", "1.0"]) for _ in range(2)]
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url for sim in sims], "[router]\nbreaker = false\n"))
        wait_healthy(router, 2)
        total = 100
        for _ in range(total):
            assert http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30).status_code == 500
        attempts = sum(sim_state(sim)["received"] for sim in sims)
        # 20 % of the requests plus 10 per 10 s; without a budget every request tries both (200)
        assert total <= attempts <= total + 0.2 * total + 20, attempts
        assert unlabelled(router, "mvtui_retries_denied_total") >= 1
    finally:
        stop_all(router, *sims)


def test_a_retry_takes_no_round_robin_turn(tmp_path: Path) -> None:
    bad, good = start_sim("llama", extra=["--fail-rate", "1.0"]), start_sim("llama")
    router = None
    try:
        extra = '[router]\npolicy = "round_robin"\nbreaker = false\nretry_budget = 1.0\n'
        router = start_router(write_config(tmp_path / "servers.toml", [bad.url, good.url], extra))
        wait_healthy(router, 2)
        for _ in range(20):
            assert http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30).status_code == 200
        # every other request starts on the bad server (a retry that took a turn: every one)
        assert sim_state(bad)["received"] <= 11
    finally:
        stop_all(router, bad, good)


# --- OpenAI-compatible servers that are not vLLM ------------------------------------------------------


def landed(*backends: HostileBackend) -> int:
    return sum(backend.hits["/v1/chat/completions"] for backend in backends)


@pytest.mark.parametrize("metrics", ["404", "foreign"])
@pytest.mark.parametrize("policy", ["balanced", "power_of_two", "least_loaded"])
def test_a_backend_without_metrics_stays_up_and_is_loaded_by_requests_in_flight(tmp_path: Path, metrics: str, policy: str) -> None:
    slow, fast = HostileBackend("demo"), HostileBackend("demo")
    for backend in (slow, fast):
        backend.answer(
            "/metrics",
            Answer(404, b'{"detail":"Not Found"}')
            if metrics == "404"
            else Answer(200, b"python_gc_objects_collected_total 1.0\n", "text/plain"),
        )
    gate = slow.hold("/v1/chat/completions")
    with slow.threaded() as slow_url, fast.threaded() as fast_url:
        router = start_router(write_config(tmp_path / "servers.toml", [slow_url, fast_url], f'[router]\npolicy = "{policy}"\n'))
        try:
            wait_healthy(router, 2)
            wait_until(lambda: all(server["has_metrics"] is False for server in load_stats(router)["servers"]), what="no metrics seen")
            threads = []
            for index in range(10):  # one at a time: each lands before the next is sent
                threads.append(
                    threading.Thread(
                        target=http.post, args=(router.url + "/v1/chat/completions",), kwargs={"json": chat("demo"), "timeout": 30}
                    )
                )
                threads[-1].start()
                wait_until(lambda count=index + 1: landed(slow, fast) == count, what="the request to land")
                wait_until(lambda: fast.in_flight == 0, what="the fast server's answer")
            assert slow.hits["/v1/chat/completions"] <= 1  # held requests count: it is busy
            gate.set()
            for thread in threads:
                thread.join(30)
            states = {server["state"] for server in load_stats(router)["servers"]}
            assert states == {"up"} and ": down:" not in router.log_tail(400)
        finally:
            gate.set()
            router.stop()


@pytest.mark.parametrize("gated", ["/health", "/is_sleeping"])
def test_a_server_added_a_moment_ago_gets_the_newcomer_wait(tmp_path: Path, gated: str) -> None:
    """With `models` (its first health check still under way), or without (its models known,
    its sleep state not yet): the request waits for it instead of a 503 or 404."""
    sim = start_sim("llama")
    newcomer = HostileBackend("other")
    gate = newcomer.hold(gated)
    config = tmp_path / "servers.toml"
    with newcomer.threaded() as url:
        router = start_router(write_config(config, [sim.url]))
        try:
            wait_healthy(router, 1)
            models = ', models = ["other"]' if gated == "/health" else ""
            listed = f'{{ url = "{sim.url}", max_concurrent_requests = 8 }}'
            config.write_text(config.read_text().replace(listed, f'{listed}, {{ url = "{url}"{models} }}'))
            wait_until(lambda: len(load_stats(router)["servers"]) == 2, what="the new server")
            wait_until(lambda: newcomer.hits[gated] >= 1, what="its first check")
            result: dict[str, Any] = {}
            thread = threading.Thread(
                target=lambda: result.update(answer=http.post(router.url + "/v1/chat/completions", json=chat("other"), timeout=30))
            )
            thread.start()
            thread.join(0.5)  # the request arrives while the newcomer is not checked yet
            gate.set()
            thread.join(30)
            assert result["answer"].status_code == 200, result["answer"].text
        finally:
            gate.set()
            router.stop()
            sim.stop()


def test_models_lists_a_servers_configured_models(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--lora", "adapter"])
    router = None
    try:
        config = tmp_path / "servers.toml"
        config.write_text(f'[servers]\nservers = [{{ url = "{sim.url}", models = ["llama"] }}]\n')
        router = start_router(config)
        wait_healthy(router, 1)
        ids = [card["id"] for card in http.get(router.url + "/v1/models").json()["data"]]
        assert ids == ["llama"]  # not the adapter it serves but was not given
    finally:
        stop_all(router, sim)


def test_a_server_whose_key_is_missing_says_so(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--api-key", "server-key"])
    router = None
    try:
        config = tmp_path / "servers.toml"
        config.write_text(f'[servers]\nservers = [{{ url = "{sim.url}", models = ["llama"] }}]\n')
        router = start_router(config)
        why = "401 from the server: set `api_key` for it"
        wait_until(lambda: server_stats(router, sim.url)["last_error"] == why, what="the reason")
        answer = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert answer.status_code == 503 and why in answer.json()["error"]["message"]
    finally:
        stop_all(router, sim)


def test_a_server_without_health_is_checked_by_its_model_list_with_its_key(tmp_path: Path) -> None:
    backend = HostileBackend("demo")
    backend.answer("/health", html_answer(404))
    backend.key = "k"
    with backend.threaded() as url:
        config = tmp_path / "servers.toml"
        config.write_text(f'[servers]\nservers = [{{ url = "{url}", api_key = "k" }}]\n')
        router = start_router(config)
        try:
            wait_healthy(router, 1)
            assert http.post(router.url + "/v1/chat/completions", json=chat("demo"), timeout=30).status_code == 200
            assert backend.hits["/v1/models"] >= 1
        finally:
            router.stop()


def test_a_body_over_the_limit_gets_an_openai_413(tmp_path: Path) -> None:
    sim = start_sim("llama")
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url]))  # max_body_mb = 32
        body = b" " * (33 * 1024 * 1024)
        for path in ("/v1/chat/completions", "/v1/embeddings"):
            answer = http.post(router.url + path, content=body, timeout=60)
            assert answer.status_code == 413, path
            assert answer.headers["content-type"].startswith("application/json")
            assert answer.json()["error"]["message"]
    finally:
        stop_all(router, sim)
