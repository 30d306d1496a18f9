"""The router as a real process in front of simulated vLLM servers, driven by the openai client."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests import http
from tests.helpers import Proc, free_port, start_mvtui, start_sim, wait_until

FAST_POLL = """
[config]
health_check_interval = 0.5
request_timeout = 20
max_retries = 3
metrics_interval = 0.1
fail_threshold = 2
recover_threshold = 2
"""


def write_config(path: Path, servers: list[tuple[str, int]], extra: str = "") -> Path:
    entries = ",\n".join(f'  {{ url = "{url}", max_concurrent_requests = {capacity} }}' for url, capacity in servers)
    path.write_text(f"[servers]\nservers = [\n{entries}\n]\n{FAST_POLL}\n{extra}")
    return path


def start_router(config: Path) -> Proc:
    port = free_port()
    return start_mvtui(["--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"], port=port)


def load_stats(router: Proc) -> dict:
    return http.get(router.url + "/load-stats").json()


def by_name(router: Proc) -> dict[str, dict]:
    return {server["url"]: server for server in load_stats(router)["servers"]}


def healthy_count(router: Proc) -> int:
    return load_stats(router)["healthy_servers"]


def sim_state(sim: Proc) -> dict:
    return http.get(sim.url + "/sim/state").json()


def client_for(router: Proc, **options) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=router.url + "/v1", api_key=options.pop("api_key", "none"), max_retries=0, **options)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, list[Proc]]]:
    """Three simulators of unequal capacity behind one router, shared by the read-only tests."""
    sims = [start_sim("llama", extra=["--max-num-seqs", str(seqs), "--tokens-per-s", "200", "--ttft-ms", "20"]) for seqs in (2, 4, 8)]
    router = None
    try:
        config = write_config(
            tmp_path_factory.mktemp("trio") / "servers.toml", [(sim.url, seqs) for sim, seqs in zip(sims, (2, 4, 8), strict=True)]
        )
        router = start_router(config)
        wait_until(lambda: healthy_count(router) == 3)
        yield router, sims
    finally:
        for proc in [router, *sims]:
            if proc is not None:
                proc.stop()


def test_chat_completion_through_the_router(trio: tuple[Proc, list[Proc]]) -> None:
    router, _ = trio
    reply = client_for(router).chat.completions.create(model="llama", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_chunks_arrive_while_generation_goes_on(trio: tuple[Proc, list[Proc]]) -> None:
    router, sims = trio
    stream = client_for(router).chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals = []
    usage = None
    for chunk in stream:
        arrivals.append(time.monotonic())
        usage = chunk.usage or usage
    # 30 tokens at 200 tokens/s take ~150 ms: a buffering proxy would deliver them in one burst.
    assert len(arrivals) >= 30
    assert arrivals[-1] - arrivals[0] > 0.08
    assert usage is not None and usage.completion_tokens == 30


def test_completions_embeddings_and_utility_routes_pass_through(trio: tuple[Proc, list[Proc]]) -> None:
    router, _ = trio
    client = client_for(router)
    assert client.completions.create(model="llama", prompt="once upon", max_tokens=5).choices[0].text
    assert len(client.embeddings.create(model="llama", input=["a", "b"]).data) == 2
    for path, body in [
        ("/tokenize", {"model": "llama", "prompt": "hello world"}),
        ("/v1/rerank", {"model": "llama", "query": "q", "documents": ["a", "b"]}),
        ("/v2/rerank", {"model": "llama", "query": "q", "documents": ["a", "b"]}),
        ("/score", {"model": "llama", "text_1": "a", "text_2": "b"}),
    ]:
        response = http.post(router.url + path, json=body)
        assert response.status_code == 200, (path, response.text)


def test_models_is_the_union_of_healthy_servers(trio: tuple[Proc, list[Proc]]) -> None:
    router, _ = trio
    models = client_for(router).models.list()
    assert [model.id for model in models.data] == ["llama"]


def test_a_missing_model_with_one_model_in_the_cluster_uses_it(trio: tuple[Proc, list[Proc]]) -> None:
    router, _ = trio
    response = http.post(router.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["model"] == "llama"


def test_client_errors_are_openai_shaped(trio: tuple[Proc, list[Proc]]) -> None:
    router, _ = trio
    unknown = http.post(router.url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert unknown.status_code == 404
    assert "llama" in unknown.json()["error"]["message"]
    malformed = http.post(router.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    assert set(malformed.json()["error"]) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client_for(router).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_a_4xx_is_passed_through_and_not_retried(trio: tuple[Proc, list[Proc]]) -> None:
    router, sims = trio
    before = sum(sim_state(sim)["received"] for sim in sims)
    retries_before = retries_total(router)
    response = http.post(router.url + "/v1/chat/completions", json={"model": "llama"})  # no messages
    assert response.status_code == 400
    assert "messages" in response.json()["error"]["message"]
    assert sum(sim_state(sim)["received"] for sim in sims) == before + 1
    assert retries_total(router) == retries_before
    assert healthy_count(router) == 3


def retries_total(router: Proc) -> float:
    text = http.get(router.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("mvtui_retries_total"))


def test_share_of_requests_follows_capacity(trio: tuple[Proc, list[Proc]]) -> None:
    router, sims = trio
    before = [sim_state(sim)["received"] for sim in sims]
    asyncio.run(concurrent_chats(router.url, total=140, concurrency=14, max_tokens=20))
    shares = [sim_state(sim)["received"] - start for sim, start in zip(sims, before, strict=True)]
    assert sum(shares) == 140
    small, medium, big = shares
    assert small < medium < big, shares
    assert big >= 140 * 0.4, shares


async def concurrent_chats(base: str, *, total: int, concurrency: int, max_tokens: int, model: str = "llama") -> list[int]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    queue = iter(range(total))
    statuses: list[int] = []

    async def worker() -> None:
        for _ in queue:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens)
            statuses.append(200)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return statuses


def test_health_is_503_when_no_server_is_up(tmp_path: Path) -> None:
    dead = free_port()
    router = start_router(write_config(tmp_path / "servers.toml", [(f"http://127.0.0.1:{dead}", 4)]))
    try:
        wait_until(lambda: by_name(router)[f"http://127.0.0.1:{dead}"]["state"] == "down")
        health = http.get(router.url + "/health")
        assert health.status_code == 503
        assert health.json()["servers"][0]["last_error"]
    finally:
        router.stop()


def test_503_with_retry_after_for_a_known_model_without_healthy_servers(tmp_path: Path) -> None:
    dead = free_port()
    config = tmp_path / "servers.toml"
    config.write_text(
        f'[servers]\nservers = [{{ url = "http://127.0.0.1:{dead}", max_concurrent_requests = 4, models = ["llama"] }}]\n{FAST_POLL}'
    )
    router = start_router(config)
    try:
        wait_until(lambda: by_name(router)[f"http://127.0.0.1:{dead}"]["state"] == "down")
        response = http.post(router.url + "/v1/chat/completions", json={"model": "llama", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.json()["error"]["message"]
    finally:
        router.stop()


def test_client_api_keys_are_checked(tmp_path: Path) -> None:
    sim = start_sim("llama")
    router = None
    try:
        router = start_router(
            write_config(
                tmp_path / "servers.toml", [(sim.url, 4)], '[router]\napi_keys = ["s3cret"]\nopen_endpoints = ["/health", "/load-stats"]\n'
            )
        )
        wait_until(lambda: healthy_count(router) == 1)
        with pytest.raises(openai.AuthenticationError):
            client_for(router, api_key="wrong").chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
        reply = client_for(router, api_key="s3cret").chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert reply.choices
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


def test_server_api_key_is_sent_upstream(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--api-key", "upstream-key"])
    router = None
    try:
        config = tmp_path / "servers.toml"
        config.write_text(
            f'[servers]\nservers = [{{ url = "{sim.url}", max_concurrent_requests = 4, api_key = "upstream-key" }}]\n{FAST_POLL}'
        )
        router = start_router(config)
        wait_until(lambda: healthy_count(router) == 1)
        reply = client_for(router).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert reply.choices
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


def test_a_killed_server_is_ejected_retried_around_and_readmitted(tmp_path: Path) -> None:
    sims = [start_sim("llama", extra=["--max-num-seqs", "8", "--tokens-per-s", "400", "--ttft-ms", "5"]) for _ in range(2)]
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [(sim.url, 8) for sim in sims]))
        wait_until(lambda: healthy_count(router) == 2)
        victim = sims[0]
        failures: list[BaseException] = []
        done = threading.Event()

        def steady_load() -> None:
            client = client_for(router)
            while not done.is_set():
                try:
                    client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=4)
                except Exception as error:  # every failure is a test failure, reported below
                    failures.append(error)

        workers = [threading.Thread(target=steady_load) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(0.5)
            victim.kill()
            wait_until(lambda: by_name(router)[victim.url]["state"] == "down")
            time.sleep(0.5)
            sims[0] = start_sim("llama", port=victim.port, extra=["--max-num-seqs", "8", "--tokens-per-s", "400", "--ttft-ms", "5"])
            wait_until(lambda: by_name(router)[victim.url]["state"] == "up")
            readmitted = sim_state(sims[0])["received"]
            wait_until(lambda: sim_state(sims[0])["received"] > readmitted + 5)
        finally:
            done.set()
            for worker in workers:
                worker.join(timeout=10)
        assert failures == []
        assert retries_total(router) >= 0
    finally:
        for proc in (router, *sims):
            if proc is not None:
                proc.stop()


def test_5xx_before_the_first_byte_is_retried_elsewhere(tmp_path: Path) -> None:
    broken = start_sim("llama", extra=["--fail-rate", "1.0"])
    healthy = start_sim("llama")
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [(broken.url, 8), (healthy.url, 8)]))
        wait_until(lambda: healthy_count(router) == 2)
        client = client_for(router)
        for _ in range(10):
            assert client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=2).choices
        assert sim_state(broken)["received"] >= 1  # it was tried...
        assert retries_total(router) == sim_state(broken)["received"]  # ...and each failure was retried
        assert by_name(router)[broken.url]["errors"] == sim_state(broken)["received"]  # counted once each
        assert by_name(router)[healthy.url]["errors"] == 0
    finally:
        for proc in (router, broken, healthy):
            if proc is not None:
                proc.stop()


def test_a_stream_cut_mid_way_ends_with_an_error_event(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--cut-after-tokens", "3", "--tokens-per-s", "100"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [(sim.url, 4)]))
        wait_until(lambda: healthy_count(router) == 1)
        with http.stream(
            router.url + "/v1/chat/completions",
            json={"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True},
        ) as (status, lines):
            assert status == 200
            events = [line for line in lines if line.startswith("data: ")]
        assert 1 <= len(events) <= 5
        last = json.loads(events[-1][len("data: ") :])
        assert "error" in last and last["error"]["code"] == 502
        with pytest.raises(openai.APIError):
            stream = client_for(router).chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=20, stream=True
            )
            for _ in stream:
                pass
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_disconnect_aborts_the_upstream_request(tmp_path: Path, stream: bool) -> None:
    sim = start_sim("llama", extra=["--tokens-per-s", "20"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [(sim.url, 4)]))
        wait_until(lambda: healthy_count(router) == 1)
        body = {"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "stream": stream}
        if stream:
            with http.stream(router.url + "/v1/chat/completions", json=body) as (_, lines):
                for line in lines:
                    if line.startswith("data: "):
                        break  # leave after the first token: closing the stream disconnects
        else:
            with pytest.raises(TimeoutError):
                http.post(router.url + "/v1/chat/completions", json=body, timeout=0.5)
        state = wait_until(lambda: (s := sim_state(sim))["aborted"] == 1 and s, timeout=5)
        assert state["running"] == 0
        metrics = http.get(sim.url + "/metrics").text
        assert 'finished_reason="abort"' in metrics
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


def test_both_metric_generations_show_kv_cache_use(tmp_path: Path) -> None:
    new = start_sim("llama", extra=["--tokens-per-s", "10", "--max-num-seqs", "2"])
    old = start_sim("llama", extra=["--tokens-per-s", "10", "--max-num-seqs", "2", "--legacy-metrics"])
    router = None
    try:
        # without the router's queue, so that the servers queue the third request themselves
        router = start_router(write_config(tmp_path / "servers.toml", [(new.url, 2), (old.url, 2)], "[router]\nqueue = false\n"))
        wait_until(lambda: healthy_count(router) == 2)

        body = {"model": "llama", "messages": [{"role": "user", "content": "x " * 200}], "max_tokens": 30}
        with ThreadPoolExecutor(6) as pool:
            replies = [pool.submit(http.post, router.url + "/v1/chat/completions", json=body) for _ in range(6)]
            wait_until(
                lambda: all((s["kv_cache_usage"] or 0) > 0 and s["running"] == 2 and s["waiting"] >= 1 for s in by_name(router).values())
            )
            assert [reply.result().status_code for reply in replies] == [200] * 6
    finally:
        for proc in (router, new, old):
            if proc is not None:
                proc.stop()


def test_mvllms_example_config_loads_unchanged(tmp_path: Path) -> None:
    sims = [start_sim("llama") for _ in range(3)]
    router = None
    try:
        config = tmp_path / "servers.toml"
        # mvllm's README example, with its hosts pointed at local simulators.
        config.write_text(
            "[servers]\nservers = [\n"
            f'    {{ url = "{sims[0].url}", max_concurrent_requests = 3 }},\n'
            f'    {{ url = "{sims[1].url}", max_concurrent_requests = 5 }},\n'
            f'    {{ url = "{sims[2].url}", max_concurrent_requests = 4 }},\n'
            "]\n\n[config]\nhealth_check_interval = 10\nrequest_timeout = 120\nmax_retries = 3\n"
        )
        router = start_router(config)
        wait_until(lambda: healthy_count(router) == 3)
        stats = load_stats(router)
        assert sorted(server["capacity"] for server in stats["servers"]) == [3, 4, 5]
        assert client_for(router).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=2).choices
    finally:
        for proc in (router, *sims):
            if proc is not None:
                proc.stop()


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--tokens-per-s", "20"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [(sim.url, 4)]))
        wait_until(lambda: healthy_count(router) == 1)
        result: dict = {}

        def slow_request() -> None:
            response = http.post(
                router.url + "/v1/chat/completions",
                json={"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20},
                timeout=10,
            )
            result["status"] = response.status_code
            result["tokens"] = response.json()["usage"]["completion_tokens"]

        thread = threading.Thread(target=slow_request)
        thread.start()
        wait_until(lambda: sim_state(sim)["running"] == 1)
        router.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=10)
        assert result == {"status": 200, "tokens": 20}
        assert router.proc.wait(timeout=10) == 0
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


def test_metrics_endpoint_exports_the_routers_counters(trio: tuple[Proc, list[Proc]]) -> None:
    router, _ = trio
    client_for(router).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    text = http.get(router.url + "/metrics").text
    for name in ("mvtui_requests_total", "mvtui_request_latency_seconds_bucket", "mvtui_in_flight_requests", "mvtui_server_up"):
        assert name in text, name
    statuses = Counter(line.split('status="')[1].split('"')[0] for line in text.splitlines() if line.startswith("mvtui_requests_total"))
    assert "200" in statuses


def hung_config(path: Path, sim: Proc) -> Path:
    """One server, a 1 s request_timeout and generation_timeout and no retries: a timeout is
    answered at once."""
    write_config(path, [(sim.url, 4)])
    timeouts = "request_timeout = 1\ngeneration_timeout = 1"
    path.write_text(path.read_text().replace("request_timeout = 20", timeouts).replace("max_retries = 3", "max_retries = 0"))
    return path


@pytest.mark.parametrize("stream", [True, False])
def test_an_upstream_that_never_answers_is_timed_out_by_request_timeout(tmp_path: Path, stream: bool) -> None:
    sim = start_sim("llama", extra=["--hang"])
    router = None
    try:
        router = start_router(hung_config(tmp_path / "servers.toml", sim))
        wait_until(lambda: healthy_count(router) == 1)
        body = {"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stream": stream}
        started = time.monotonic()
        reply = http.post(router.url + "/v1/chat/completions", json=body, timeout=15)
        assert time.monotonic() - started >= 0.9  # it waited for request_timeout, not less
        # a non-streamed answer is waited for up to generation_timeout: a gateway timeout
        assert reply.status_code == (502 if stream else 504)
        assert "timed out" in reply.json()["error"]["message"]
        assert sim_state(sim)["hung"] == 1
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


def test_a_stream_that_stalls_mid_way_is_timed_out_with_an_error_event(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--tokens-per-s", "0.2", "--ttft-ms", "5"])  # a token, then 5 s of silence
    router = None
    try:
        router = start_router(hung_config(tmp_path / "servers.toml", sim))
        wait_until(lambda: healthy_count(router) == 1)
        body = {"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True}
        with http.stream(router.url + "/v1/chat/completions", json=body, timeout=15) as (status, lines):
            assert status == 200
            events = [line for line in lines if line.startswith("data: ")]
        assert len(events) >= 2  # at least one token went through before the stall
        last = json.loads(events[-1][len("data: ") :])
        assert last["error"]["code"] == 502
        assert "timed out" in last["error"]["message"]
        assert wait_until(lambda: sim_state(sim)["aborted"] == 1, timeout=5)  # the upstream request was closed
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()
