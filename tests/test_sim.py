"""The vLLM simulator against real clients on 127.0.0.1 (in-process unless a process is the point)."""

from __future__ import annotations

import asyncio
import inspect
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mvtui.sim.config import SimConfig
from mvtui.sim.server import SimServer
from tests.helpers import Proc, free_port, start_sim, wait_until_answering

FAST = {"tokens_per_s": 200.0, "ttft_ms": 5.0}
MakeSim = Callable[..., Awaitable[SimServer]]
CHAT = [{"role": "user", "content": "Say something about GPUs."}]


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    servers: list[SimServer] = []

    async def make(dev_mode: bool | None = False, **options: Any) -> SimServer:
        sim = SimServer(SimConfig(**{**FAST, **options}), dev_mode=dev_mode)
        await sim.start()
        servers.append(sim)
        return sim

    yield make
    for sim in servers:
        await sim.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sim(make_sim: MakeSim) -> SimServer:
    return await make_sim(lora=("demo-lora",))


def client(sim: SimServer | Proc, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=options.pop("api_key", "none"), max_retries=0, **options)


async def metrics(http: aiohttp.ClientSession, sim: SimServer) -> dict[tuple[str, frozenset], float]:
    async with http.get(sim.url + "/metrics") as response:
        page = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    wanted = {"model_name": "demo", "engine": "0", **labels}
    return samples[(name, frozenset(wanted.items()))]


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- OpenAI surface ---------------------------------------------------------------------
async def test_chat_completion_has_text_and_usage(sim: SimServer) -> None:
    async with client(sim) as api:
        reply = await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=5)
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5 and reply.usage.prompt_tokens > 0
    assert reply.model == "demo"


async def test_stream_chunks_arrive_over_time(make_sim: MakeSim) -> None:
    sim = await make_sim(tokens_per_s=50.0)
    arrivals, chunks = [], []
    async with client(sim) as api:
        stream = await api.chat.completions.create(
            model="demo", messages=CHAT, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            arrivals.append(time.monotonic())
            chunks.append(chunk)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip()
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert arrivals[-1] - arrivals[0] >= 0.1  # 10 tokens at 50/s: ~0.2 s, not one burst


async def test_completions_plain_and_streamed(sim: SimServer) -> None:
    async with client(sim) as api:
        reply = await api.completions.create(model="demo", prompt="Once upon a time", max_tokens=4)
        stream = await api.completions.create(model="demo-lora", prompt="Once", max_tokens=3, stream=True)
        pieces = [chunk.choices[0].text async for chunk in stream]
    assert reply.usage.completion_tokens == 4 and reply.choices[0].text.strip()
    assert len([p for p in pieces if p]) == 3


async def test_responses_plain_and_streamed(sim: SimServer) -> None:
    async with client(sim) as api:
        reply = await api.responses.create(model="demo", input="Hello there", max_output_tokens=4)
        stream = await api.responses.create(model="demo", input="Hello", max_output_tokens=3, stream=True)
        events = [event async for event in stream]
    assert reply.output_text.strip() and reply.usage.output_tokens == 4
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 3


async def test_seed_makes_output_repeatable_and_stop_ends_early(sim: SimServer) -> None:
    async with client(sim) as api:
        ask = lambda **kw: api.completions.create(model="demo", prompt="x", max_tokens=12, seed=7, **kw)  # noqa: E731
        first, again = await ask(), await ask()
        stop_word = first.choices[0].text.split()[3]
        stopped = await ask(stop=[stop_word])
    assert first.choices[0].text == again.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_word not in stopped.choices[0].text
    assert first.choices[0].text.startswith(stopped.choices[0].text)


async def test_embeddings_are_deterministic(sim: SimServer) -> None:
    async with client(sim) as api:
        both = await api.embeddings.create(model="demo", input=["alpha", "beta"])
        alone = await api.embeddings.create(model="demo", input="alpha", encoding_format="float")
    assert [d.index for d in both.data] == [0, 1]
    assert both.data[0].embedding == pytest.approx(alone.data[0].embedding, abs=1e-6)
    assert both.data[0].embedding != both.data[1].embedding
    assert both.usage.prompt_tokens > 0


async def test_pooling_scoring_and_tokenizer_shapes(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async def post(path: str, body: dict) -> dict:
        async with http.post(sim.url + path, json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    docs = ["the GPU is fast", "bananas are yellow", "a fast GPU server"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        ranked = await post(path, {"model": "demo", "query": "fast GPU", "documents": docs, "top_n": 2})
        assert len(ranked["results"]) == 2 and ranked["results"][0]["index"] != 1
        scores = [r["relevance_score"] for r in ranked["results"]]
        assert scores == sorted(scores, reverse=True)
    for path in ("/score", "/v1/score"):
        scored = await post(path, {"model": "demo", "text_1": "fast GPU", "text_2": docs})
        assert [d["index"] for d in scored["data"]] == [0, 1, 2] and scored["data"][0]["object"] == "score"
    pooled = await post("/pooling", {"model": "demo", "input": ["a", "b"]})
    assert len(pooled["data"]) == 2 and pooled["data"][0]["object"] == "pooling"
    classified = await post("/classify", {"model": "demo", "input": "great"})
    assert classified["data"][0]["num_classes"] == 2 and sum(classified["data"][0]["probs"]) == pytest.approx(1)
    tokens = await post("/tokenize", {"model": "demo", "prompt": "héllo world"})
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 4096
    assert (await post("/detokenize", {"model": "demo", "tokens": tokens["tokens"]}))["prompt"] == "héllo world"


async def test_models_version_and_health(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/v1/models") as response:
        cards = {card["id"]: card for card in (await response.json())["data"]}
    assert cards["demo"]["owned_by"] == "vllm" and cards["demo"]["parent"] is None
    assert cards["demo-lora"]["parent"] == "demo" and cards["demo-lora"]["max_model_len"] == 4096
    async with http.get(sim.url + "/version") as response:
        assert "version" in await response.json()
    async with http.get(sim.url + "/health") as response:
        assert response.status == 200 and await response.read() == b""


# -- errors -----------------------------------------------------------------------------
async def test_error_statuses_have_openai_shape(sim: SimServer, http: aiohttp.ClientSession) -> None:
    cases = [
        ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404),
        ("/v1/chat/completions", {"model": "demo"}, 400),
        ("/v1/completions", {"model": "demo"}, 400),
        ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 5000}, 400),
        ("/v1/embeddings", {"model": "demo"}, 400),
    ]
    for path, body, status in cases:
        async with http.post(sim.url + path, json=body) as response:
            error = (await response.json())["error"]
            assert response.status == status, (path, body)
            assert set(error) == {"message", "type", "param", "code"}
    async with http.post(sim.url + "/v1/chat/completions", data=b"{not json") as response:
        assert response.status == 400 and "error" in await response.json()
    async with client(sim) as api:
        with pytest.raises(openai.NotFoundError):
            await api.chat.completions.create(model="other", messages=CHAT)


async def test_api_key_guards_v1_routes(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(api_key="sekrit")
    async with client(sim, api_key="wrong") as api:
        with pytest.raises(openai.AuthenticationError):
            await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=1)
    async with http.get(sim.url + "/v1/models") as response:
        assert response.status == 401
    async with client(sim, api_key="sekrit") as api:
        assert (await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=1)).choices
    async with http.get(sim.url + "/health") as response:
        assert response.status == 200


# -- engine and metrics -----------------------------------------------------------------
async def test_metrics_follow_load(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(max_num_seqs=2, tokens_per_s=100.0)
    async with client(sim) as api:
        calls = [api.completions.create(model="demo", prompt="p" * 200, max_tokens=30) for _ in range(5)]
        load = asyncio.gather(*calls)

        async def saturated() -> bool:
            m = await metrics(http, sim)
            return value(m, "vllm:num_requests_running") == 2 and value(m, "vllm:num_requests_waiting") == 3

        await eventually(saturated)
        busy = await metrics(http, sim)
        assert 0 < value(busy, "vllm:kv_cache_usage_perc") <= 1
        assert value(busy, "vllm:num_requests_waiting_by_reason", reason="capacity") == 3
        assert sim.stats.running == 2 and sim.stats.waiting == 3 and sim.stats.received == 5
        await load
    idle = await metrics(http, sim)
    assert value(idle, "vllm:num_requests_running") == 0 and value(idle, "vllm:num_requests_waiting") == 0
    assert value(idle, "vllm:kv_cache_usage_perc") == 0
    assert value(idle, "vllm:request_success_total", finished_reason="length") == 5
    assert value(idle, "vllm:generation_tokens_total") == 150
    assert value(idle, "vllm:time_to_first_token_seconds_count") == 5
    assert value(idle, "vllm:request_queue_time_seconds_count") == 5


async def test_metrics_page_is_realistic(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/metrics") as response:
        page = await response.text()
    assert len(page) > 10_000
    for name in (
        "vllm:kv_cache_usage_perc{",
        "vllm:prompt_tokens_total{",
        "vllm:prompt_tokens_created{",
        "vllm:e2e_request_latency_seconds_bucket{",
        "vllm:inter_token_latency_seconds_bucket{",
        "vllm:prefix_cache_queries_total{",
        "vllm:num_preemptions_total{",
    ):
        assert name in page
    assert "vllm:gpu_cache_usage_perc" not in page and "engine_sleep_state" not in page


async def test_legacy_metric_names(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(legacy_metrics=True)
    async with http.get(sim.url + "/metrics") as response:
        page = await response.text()
    assert "vllm:gpu_cache_usage_perc{" in page and "vllm:kv_cache_usage_perc" not in page
    assert "vllm:gpu_prefix_cache_queries_total{" in page and "vllm:gpu_prefix_cache_hits_total{" in page
    assert "vllm:prefix_cache_queries" not in page


async def test_prefix_cache_hits_on_a_repeated_prompt(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with client(sim) as api:
        for _ in range(2):
            await api.completions.create(model="demo", prompt="shared system prompt " * 20, max_tokens=1)
    assert value(await metrics(http, sim), "vllm:prefix_cache_hits_total") > 0


async def test_a_cached_prefix_shows_in_the_time_to_first_token(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    """Prefill costs per uncached prompt token, as on a GPU: the second turn of a long
    conversation starts almost at once; the first paid for its whole prompt."""
    sim = await make_sim(prompt_ms_per_token=2.0, ttft_ms=10.0, kv_blocks=4096)
    history = "the river flows to the sea and " * 120  # some 900 tokens: 1.8 s of prefill

    async def first_token(prompt: str) -> float:
        started = time.perf_counter()
        async with client(sim) as api:
            stream = await api.completions.create(model="demo", prompt=prompt, max_tokens=2, stream=True)
            async for _ in stream:
                return time.perf_counter() - started
        raise AssertionError("no token")

    cold = await first_token(history)
    warm = await first_token(history + "then what?")
    assert cold >= 1.5  # the simulated prefill is a floor: no machine makes it shorter
    assert warm < cold / 3, (cold, warm)
    samples = await metrics(http, sim)
    hits, queries = value(samples, "vllm:prefix_cache_hits_total"), value(samples, "vllm:prefix_cache_queries_total")
    assert hits / queries > 0.4


async def test_the_next_turn_of_a_chat_finds_its_history_and_the_answer_cached(sim: SimServer, http: aiohttp.ClientSession) -> None:
    """As vLLM caches the blocks it generated: a conversation's next turn re-sends the answer,
    and finds it cached with the prompt before it."""
    messages = [{"role": "system", "content": "You are a careful assistant. " * 10}, {"role": "user", "content": "Tell me a story."}]
    async with client(sim) as api:
        first = await api.chat.completions.create(model="demo", messages=messages, max_tokens=200)  # type: ignore[arg-type]
        answer = first.choices[0].message.content or ""
        before = value(await metrics(http, sim), "vllm:prefix_cache_hits_total")
        following = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        second = await api.chat.completions.create(model="demo", messages=following, max_tokens=1)  # type: ignore[arg-type]
    hits = value(await metrics(http, sim), "vllm:prefix_cache_hits_total") - before
    assert first.usage is not None and second.usage is not None
    # all of the first prompt and its answer, but the last partial block
    assert hits >= first.usage.prompt_tokens + first.usage.completion_tokens - 16, (hits, first.usage, second.usage)


async def test_kv_pressure_preempts_and_still_completes(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(kv_blocks=6, block_size=16, max_model_len=96, max_num_seqs=4, tokens_per_s=400.0)
    async with client(sim) as api:
        replies = await asyncio.gather(*[api.completions.create(model="demo", prompt=f"prompt {i}", max_tokens=40) for i in range(3)])
    assert all(reply.usage.completion_tokens == 40 for reply in replies)
    assert value(await metrics(http, sim), "vllm:num_preemptions_total") > 0
    assert sim.stats.preemptions > 0 and sim.stats.running == 0


# -- abort on disconnect ----------------------------------------------------------------
async def test_stream_disconnect_aborts(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_s=50.0)
    body = {"model": "demo", "prompt": "x", "max_tokens": 500, "stream": True}
    async with http.post(sim.url + "/v1/completions", json=body) as response:
        await response.content.readline()
        assert sim.stats.running == 1
    await eventually(lambda: sim.stats.aborted == 1 and sim.stats.running == 0)
    assert value(await metrics(http, sim), "vllm:request_success_total", finished_reason="abort") == 1
    assert value(await metrics(http, sim), "vllm:kv_cache_usage_perc") == 0


async def test_non_stream_disconnect_aborts(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(tokens_per_s=50.0)
    body = {"model": "demo", "prompt": "x", "max_tokens": 500}
    with pytest.raises(asyncio.TimeoutError):
        await http.post(sim.url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.3))
    await eventually(lambda: sim.stats.aborted == 1 and sim.stats.running == 0)
    assert value(await metrics(http, sim), "vllm:request_success_total", finished_reason="abort") == 1


# -- sleep mode -------------------------------------------------------------------------
async def test_sleep_routes_need_flag_and_dev_mode(make_sim: MakeSim, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    no_dev = await make_sim(enable_sleep_mode=True, dev_mode=False)
    no_flag = await make_sim(dev_mode=True)
    for sim in (no_dev, no_flag):
        for path in ("/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache"):
            async with http.post(sim.url + path) as response:
                assert response.status == 404
        async with http.get(sim.url + "/is_sleeping") as response:
            assert response.status == 404
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    from_env = await make_sim(enable_sleep_mode=True, dev_mode=None)
    async with http.get(from_env.url + "/is_sleeping") as response:
        assert await response.json() == {"is_sleeping": False}


async def test_sleep_level_1_and_wake_timing(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(enable_sleep_mode=True, dev_mode=True, wake_ms_l1=200)
    async with http.post(sim.url + "/sleep", params={"level": "1"}) as response:
        assert response.status == 200 and await response.read() == b""
    async with http.get(sim.url + "/is_sleeping") as response:
        assert await response.json() == {"is_sleeping": True}
    async with http.get(sim.url + "/health") as response:
        assert response.status == 200
    asleep = await metrics(http, sim)
    assert value(asleep, "vllm:engine_sleep_state", sleep_state="weights_offloaded") == 1
    assert value(asleep, "vllm:engine_sleep_state", sleep_state="awake") == 0
    started = time.monotonic()
    async with http.post(sim.url + "/wake_up") as response:
        assert response.status == 200
    assert time.monotonic() - started >= 0.19
    assert value(await metrics(http, sim), "vllm:engine_sleep_state", sleep_state="awake") == 1
    assert (sim.stats.sleep_count, sim.stats.wake_count, sim.stats.sleeping) == (1, 1, False)


async def test_sleep_level_is_a_query_parameter(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(enable_sleep_mode=True, dev_mode=True, wake_ms_l1=10)
    async with http.post(sim.url + "/sleep", json={"level": 2}) as response:
        assert response.status == 200
    assert sim.stats.sleep_level == 1


async def test_request_while_asleep_hangs_until_woken(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(enable_sleep_mode=True, dev_mode=True, wake_ms_l1=50)
    await http.post(sim.url + "/sleep?level=1")
    async with client(sim, timeout=0.3) as api:
        with pytest.raises(openai.APITimeoutError):
            await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
        held = asyncio.ensure_future(api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2, timeout=5))
        await eventually(lambda: sim.stats.requests_while_sleeping == 2 and sim.stats.waiting == 1)
        deferred = value(await metrics(http, sim), "vllm:num_requests_waiting_by_reason", reason="deferred")
        await http.post(sim.url + "/wake_up")
        assert (await held).usage.completion_tokens == 2
    assert deferred == 1
    assert sim.stats.requests_while_sleeping == 2


async def test_sleep_requests_fail_mode(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(enable_sleep_mode=True, dev_mode=True, sleep_requests="fail")
    await http.post(sim.url + "/sleep")
    async with client(sim) as api:
        with pytest.raises(openai.InternalServerError):
            await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
    assert sim.stats.requests_while_sleeping == 1


async def test_level_2_wake_needs_weight_reload(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(enable_sleep_mode=True, dev_mode=True, wake_ms_l1=10, wake_ms_l2=250)
    await http.post(sim.url + "/sleep?level=2")
    assert value(await metrics(http, sim), "vllm:engine_sleep_state", sleep_state="discard_all") == 1
    started = time.monotonic()
    await http.post(sim.url + "/wake_up")
    assert time.monotonic() - started >= 0.24
    async with client(sim) as api:
        with pytest.raises(openai.InternalServerError, match="reload_weights"):
            await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
        async with http.post(sim.url + "/collective_rpc", json={"method": "reload_weights"}) as response:
            assert response.status == 200
        assert sim.stats.prefix_cache_reset_needed
        async with http.post(sim.url + "/reset_prefix_cache") as response:
            assert response.status == 200
        assert (await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)).choices
    assert sim.stats.requests_without_weights == 1 and not sim.stats.prefix_cache_reset_needed


# -- faults -----------------------------------------------------------------------------
async def set_faults(http: aiohttp.ClientSession, sim: SimServer | Proc, **faults: Any) -> dict:
    async with http.post(sim.url + "/sim/faults", json=faults) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_fail_rate_and_dead(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(fail_rate=1.0)
    async with client(sim) as api:
        with pytest.raises(openai.InternalServerError):
            await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
        await set_faults(http, sim, fail_rate=0.0, dead=True)
        async with http.get(sim.url + "/health") as response:
            assert response.status == 503
        with pytest.raises(openai.InternalServerError):
            await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
        await set_faults(http, sim, dead=False)
        assert (await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)).choices
    assert sim.stats.failed == 2 and sim.stats.received == 3 and sim.stats.requests == 1


async def test_hang_fault(make_sim: MakeSim) -> None:
    sim = await make_sim(hang=True)
    async with client(sim, timeout=0.3) as api:
        with pytest.raises(openai.APITimeoutError):
            await api.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
    assert sim.stats.hung == 1


async def test_slow_fault_stretches_generation(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with client(sim) as api:
        await set_faults(http, sim, slow=5.0)
        started = time.monotonic()
        await api.completions.create(model="demo", prompt="x", max_tokens=20)
    assert time.monotonic() - started >= 0.4  # 20 tokens at 200/s slowed 5x: ~0.5 s
    async with http.get(sim.url + "/sim/state") as response:
        assert (await response.json())["faults"]["slow"] == 5.0


async def test_cut_after_tokens(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(cut_after_tokens=3)
    body = {"model": "demo", "prompt": "x", "max_tokens": 10, "stream": True}
    lines: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(sim.url + "/v1/completions", json=body) as response:
            async for line in response.content:
                lines.append(line)
    assert len([line for line in lines if line.startswith(b"data: {")]) == 3
    async with client(sim) as api:
        with pytest.raises(openai.APIConnectionError):
            await api.completions.create(model="demo", prompt="x", max_tokens=10)
        short = await api.completions.create(model="demo", prompt="x", max_tokens=3)
    assert short.usage.completion_tokens == 3
    assert sim.stats.cut == 2 and sim.stats.aborted == 2


async def test_fault_updates_are_validated(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.post(sim.url + "/sim/faults", json={"fail_rate": 2}) as response:
        assert response.status == 400
    async with http.post(sim.url + "/sim/faults", json={"bogus": 1}) as response:
        assert response.status == 400
    assert await set_faults(http, sim, hang=True, cut_after_tokens=None) == {
        "fail_rate": 0.0,
        "hang": True,
        "slow": 1.0,
        "cut_after_tokens": None,
        "dead": False,
        "cut_body": False,
        "stall_body": False,
        "redirect_to": None,
        "pad_answer_bytes": 0,
    }


async def test_exit_fault_in_process(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    await set_faults(http, sim, exit=True)
    await eventually(lambda: sim.crashed)
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(sim.url + "/health")


async def test_startup_delay_refuses_connections_first(http: aiohttp.ClientSession) -> None:
    sim = SimServer(SimConfig(port=free_port(), startup_ms=400))
    starting = asyncio.ensure_future(sim.start())
    await asyncio.sleep(0.1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(f"http://127.0.0.1:{sim.config.port}/health")
    await starting
    try:
        async with http.get(sim.url + "/health") as response:
            assert response.status == 200
    finally:
        await sim.stop()


# -- the CLI as a real process ----------------------------------------------------------
async def test_cli_serves_and_exits_on_sigterm(procs: list[Proc], http: aiohttp.ClientSession) -> None:
    proc = start_sim(
        "cli-model", extra=["--max-num-seqs", "2", "--tokens-per-s", "500", "--lora", "a", "b", "--startup-ms", "300"], wait=False
    )
    procs.append(proc)
    await asyncio.sleep(0.1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(proc.url + "/health")
    await asyncio.to_thread(wait_until_answering, proc)
    async with client(proc) as api:
        reply = await api.chat.completions.create(model="cli-model", messages=CHAT, max_tokens=3)
        models = [card.id async for card in api.models.list()]
    assert reply.usage.completion_tokens == 3 and models == ["cli-model", "a", "b"]
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 5) == 0


async def test_cli_exit_fault_kills_the_process(procs: list[Proc], http: aiohttp.ClientSession) -> None:
    proc = start_sim(extra=["--enable-sleep-mode"], env={"VLLM_SERVER_DEV_MODE": "1"})
    procs.append(proc)
    async with http.get(proc.url + "/is_sleeping") as response:
        assert response.status == 200
    await set_faults(http, proc, exit=True)
    assert await asyncio.to_thread(proc.proc.wait, 5) != 0
    assert not proc.alive()
