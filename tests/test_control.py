"""Drain, sleep, wake and wake-on-demand against simulated vLLM servers running as processes.

The simulators run with `--sleep-requests hang` (like newer vLLM): a request that reaches a
sleeping engine would hang, and the simulator counts it in `requests_while_sleeping`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from mvtui.cluster.poller import Poller
from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster
from mvtui.config.schema import AdminConfig, Config, LimitsConfig, RouterConfig, ServerConfig, TimingConfig
from mvtui.errors import CommandError
from mvtui.gpu import GpuProbe
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from tests.helpers import REPO_ROOT, Proc, eventually, free_port, start_mvtui, start_sim

DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}
FAST = ["--tokens-per-s", "200", "--ttft-ms", "5", "--sleep-requests", "hang"]
SLEEPY = [*FAST, "--enable-sleep-mode", "--wake-ms-l1", "100", "--wake-ms-l2", "200"]
TIMING = TimingConfig(metrics_interval=0.1, health_check_interval=0.5, drain_timeout=10, wake_timeout=30, shutdown_timeout=3)
CHAT = [{"role": "user", "content": "Tell me about GPUs."}]


async def sim_process(procs: list[Proc], model: str = "m", extra: list[str] = SLEEPY, env: dict | None = DEV_MODE) -> Proc:
    sim = await asyncio.to_thread(start_sim, model, None, extra, env)
    procs.append(sim)
    return sim


@contextlib.asynccontextmanager
async def core(tmp_path: Path, *sims: Proc, timing: TimingConfig = TIMING) -> AsyncIterator[Services]:
    servers = tuple(ServerConfig(url=sim.url, name=f"s{index}", max_concurrent_requests=8) for index, sim in enumerate(sims))
    config = Config(router=RouterConfig(host="127.0.0.1", port=0), timing=timing, admin=AdminConfig(enabled=False), servers=servers)
    paths = AppPaths(tmp_path / "config", tmp_path / "log", tmp_path / "state")
    async with Services(config, paths=paths, gpu=GpuProbe(nvml=None)) as services:
        await eventually(lambda: all(server.is_up for server in services.cluster))
        yield services


async def sim_state(sim: Proc) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.url + "/sim/state") as response:
            return await response.json()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[[str], openai.AsyncOpenAI]]:
    """OpenAI clients closed at teardown, on the test's own loop."""
    made: list[openai.AsyncOpenAI] = []

    def make(url: str) -> openai.AsyncOpenAI:
        made.append(client(url))
        return made[-1]

    yield make
    for openai_client in made:
        await openai_client.close()


async def streamed_chat(openai_client: openai.AsyncOpenAI, model: str, max_tokens: int) -> int:
    """Tokens received in a full stream; raises if the stream fails."""
    stream = await openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, stream=True)
    pieces = 0
    finish = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "length"
    return pieces


async def test_sleep_drains_first_then_sleeps_and_shows_state(
    tmp_path: Path, procs: list[Proc], make_client: Callable[[str], openai.AsyncOpenAI]
) -> None:
    sim = await sim_process(procs)
    async with core(tmp_path, sim) as services:
        server = services.cluster.find("s0")
        openai_client = make_client(services.router_url)
        streams = [asyncio.create_task(streamed_chat(openai_client, "m", 60)) for _ in range(4)]
        await eventually(lambda: server.in_flight == 4, what="4 requests in flight")
        sleeping = asyncio.create_task(services.operator.sleep("s0", 1))
        await eventually(lambda: server.sleep_pending, what="sleep to start draining")
        async with aiohttp.ClientSession() as session:
            async with session.get(services.router_url + "/load-stats") as response:
                shown = (await response.json())["servers"][0]
        assert shown["state"] == "draining" and not shown["routable"]
        assert [await stream for stream in streams] == [60] * 4  # every request in flight finished whole
        await sleeping
        state = await sim_state(sim)
        assert state["sleeping"] and state["sleep_level"] == 1
        assert state["sleeps_with_inflight"] == 0  # /sleep came only after the drain
        assert server.state == "sleeping L1" and not server.routable
        # a sleeping server is still scraped: the dashboard shows its true, empty engine
        await eventually(lambda: server.metrics.sleep_state == "weights_offloaded", what="a scrape while asleep")
        assert server.running == 0 and server.waiting == 0


async def test_level_two_wake_reloads_weights_and_resets_prefix_cache(tmp_path: Path, procs: list[Proc]) -> None:
    sim = await sim_process(procs)
    async with core(tmp_path, sim) as services:
        await services.operator.sleep("s0", 2)
        assert (await sim_state(sim))["weights_loaded"] is False
        await services.operator.wake("s0")
        state = await sim_state(sim)
        assert not state["sleeping"] and state["weights_loaded"] and not state["prefix_cache_reset_needed"]
        assert state["wake_count"] == 1
        async with client(services.router_url) as openai_client:
            assert await streamed_chat(openai_client, "m", 5) == 5
        state = await sim_state(sim)
        assert state["requests_without_weights"] == 0 and state["requests_while_sleeping"] == 0


async def test_server_without_sleep_mode_gets_a_clear_error_and_keeps_its_state(tmp_path: Path, procs: list[Proc]) -> None:
    sim = await sim_process(procs, extra=FAST)  # no --enable-sleep-mode: vLLM has no /sleep route then
    async with core(tmp_path, sim) as services:
        server = services.cluster.find("s0")
        with pytest.raises(CommandError, match="no sleep mode"):
            await services.operator.sleep("s0", 1)
        assert server.routable and server.state == "up" and not server.drain
        with pytest.raises(CommandError, match="level must be 1 or 2"):
            await services.operator.sleep("s0", 3)
        async with client(services.router_url) as openai_client:
            assert await streamed_chat(openai_client, "m", 3) == 3


async def test_no_request_reaches_a_sleeping_server_while_it_sleeps_and_wakes_under_load(
    tmp_path: Path, procs: list[Proc], make_client: Callable[[str], openai.AsyncOpenAI]
) -> None:
    sim = await sim_process(procs)
    async with core(tmp_path, sim) as services:
        openai_client = make_client(services.router_url)
        stop = asyncio.Event()
        done: list[int] = []

        async def worker() -> None:
            while not stop.is_set():
                done.append(await streamed_chat(openai_client, "m", 4))

        workers = [asyncio.create_task(worker()) for _ in range(6)]
        for level in (1, 2, 1):
            await eventually(lambda: len(done) > 10, what="traffic")  # noqa: B023
            await services.operator.sleep("s0", level)  # the next requests wake it again
            done.clear()
        await eventually(lambda: len(done) > 10, what="traffic after the last wake")
        stop.set()
        await asyncio.gather(*workers)
        state = await sim_state(sim)
        assert state["sleep_count"] == 3 and state["wake_count"] == 3
        assert state["requests_while_sleeping"] == 0
        assert state["requests_without_weights"] == 0
        assert state["sleeps_with_inflight"] == 0


async def test_every_waiter_and_the_operator_share_one_wake(
    tmp_path: Path, procs: list[Proc], make_client: Callable[[str], openai.AsyncOpenAI]
) -> None:
    sim = await sim_process(procs, extra=[*FAST, "--enable-sleep-mode", "--wake-ms-l1", "300"])
    async with core(tmp_path, sim) as services:
        control = services.control
        assert control is not None
        await control.sleep("s0", 1)
        wakes: list[str] = []
        wake = control._wake

        async def counted(server: Any) -> None:
            wakes.append(server.name)
            await wake(server)

        control._wake = counted  # type: ignore[method-assign]
        openai_client = make_client(services.router_url)
        requests = [asyncio.create_task(openai_client.chat.completions.create(model="m", messages=CHAT, max_tokens=2)) for _ in range(30)]
        await eventually(lambda: services.cluster.find("s0").waking, what="the wake to begin")
        await control.wake("s0")  # the operator's wake joins the one under way
        answers = await asyncio.gather(*requests)
        assert [answer.usage.completion_tokens for answer in answers] == [2] * 30
        assert wakes == ["s0"]
        assert (await sim_state(sim))["requests_while_sleeping"] == 0


async def test_wake_on_demand_is_bounded_and_never_wakes_a_drained_server(tmp_path: Path, procs: list[Proc]) -> None:
    sim = await sim_process(procs, extra=[*FAST, "--enable-sleep-mode", "--wake-ms-l1", "1500"])
    timing = TimingConfig(**{**TIMING.__dict__, "wake_timeout": 0.3})
    async with core(tmp_path, sim, timing=timing) as services:
        await services.operator.sleep("s0", 1)
        await services.operator.drain("s0")
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "messages": CHAT, "max_tokens": 3}
            async with session.post(services.router_url + "/v1/chat/completions", json=body) as response:
                assert response.status == 503 and "Retry-After" in response.headers
                assert "drained" in (await response.json())["error"]["message"]
            assert (await sim_state(sim))["wake_count"] == 0
            await services.operator.undrain("s0")
            async with session.post(services.router_url + "/v1/chat/completions", json=body) as response:
                assert response.status == 503 and response.headers["Retry-After"].isdigit()  # the wake takes 1.5 s > 0.3 s
                assert "waking" in (await response.json())["error"]["message"]
            await eventually(lambda: services.cluster.find("s0").routable, what="the wake to finish")
            async with session.post(services.router_url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
        state = await sim_state(sim)
        assert state["wake_count"] == 1 and state["requests_while_sleeping"] == 0


async def test_requests_for_a_waking_model_wait_in_its_queue(tmp_path: Path, procs: list[Proc]) -> None:
    """The wake on demand waits in the model's queue: counted in its depth, bounded by
    queue_size (429 beyond) and by max_request_time (408), served once the server is awake."""
    sim = await sim_process(procs, extra=[*FAST, "--enable-sleep-mode", "--wake-ms-l1", "1500"])
    servers = (ServerConfig(url=sim.url, name="s0", max_concurrent_requests=8),)
    config = Config(
        router=RouterConfig(host="127.0.0.1", port=0, queue_size=3),
        timing=TIMING,
        admin=AdminConfig(enabled=False),
        servers=servers,
    )
    paths = AppPaths(tmp_path / "config", tmp_path / "log", tmp_path / "state")
    async with Services(config, paths=paths, gpu=GpuProbe(nvml=None)) as services:
        await eventually(lambda: services.cluster.find("s0").is_up)
        await services.operator.sleep("s0", 1)
        body = {"model": "m", "messages": CHAT, "max_tokens": 2}
        async with aiohttp.ClientSession() as session:

            async def status() -> int:
                async with session.post(services.router_url + "/v1/chat/completions", json=body) as response:
                    await response.read()
                    return response.status

            requests = [asyncio.create_task(status()) for _ in range(5)]
            await eventually(lambda: services.cluster.queue_depth("m") == 3, what="three queued for the wake")
            assert services.cluster.find("s0").waking
            assert sorted(await asyncio.gather(*requests)) == [200, 200, 200, 429, 429]
            assert services.cluster.queue_depth("m") == 0
            assert services.cluster.queues["m"].full == 2 and services.cluster.queues["m"].admitted == 3
            await services.operator.sleep("s0", 1)
            services.live.current = dataclasses.replace(services.config, limits=LimitsConfig(max_request_time=0.3))
            async with session.post(services.router_url + "/v1/chat/completions", json=body) as response:
                assert response.status == 408 and "max_request_time" in (await response.json())["error"]["message"]
        state = await sim_state(sim)
        assert state["wake_count"] >= 1 and state["requests_while_sleeping"] == 0


async def test_drain_under_load_loses_no_request(
    tmp_path: Path, procs: list[Proc], make_client: Callable[[str], openai.AsyncOpenAI]
) -> None:
    first, second = await sim_process(procs, "m", FAST, None), await sim_process(procs, "m", FAST, None)
    async with core(tmp_path, first, second) as services:
        openai_client = make_client(services.router_url)
        drained = services.cluster.find("s0")
        results: list[asyncio.Task[int]] = []
        for index in range(40):
            results.append(asyncio.create_task(streamed_chat(openai_client, "m", 20)))
            if index == 15:
                await eventually(lambda: drained.in_flight > 0, what="requests on s0")
                await services.operator.drain("s0")
                assert drained.state == "draining"
            await asyncio.sleep(0.02)
        await eventually(lambda: drained.in_flight == 0, what="s0 to drain")
        sent_to_drained = (await sim_state(first))["requests"]
        assert drained.state == "drained"
        assert [await result for result in results] == [20] * 40
        assert (await sim_state(first))["requests"] == sent_to_drained  # nothing new after the drain
        assert (await sim_state(second))["requests"] == 40 - sent_to_drained
        await services.operator.undrain("s0")
        await asyncio.gather(*(streamed_chat(openai_client, "m", 3) for _ in range(8)))
        assert (await sim_state(first))["requests"] > sent_to_drained


async def test_a_hundred_requests_for_a_sleeping_model_cause_one_wake(
    tmp_path: Path, procs: list[Proc], make_client: Callable[[str], openai.AsyncOpenAI]
) -> None:
    """mvtui as a process, put to sleep with the CLI, then 100 concurrent OpenAI requests."""
    sim = await sim_process(procs, extra=[*FAST, "--enable-sleep-mode", "--wake-ms-l1", "400", "--max-num-seqs", "32"])
    config = tmp_path / "servers.toml"
    config.write_text(
        f'[servers]\nservers = [{{ url = "{sim.url}", name = "gpu-a", max_concurrent_requests = 32 }}]\n'
        "[config]\nmetrics_interval = 0.1\nhealth_check_interval = 0.5\n[admin]\nport = 0\n"
    )
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    port = free_port()
    mvtui = await asyncio.to_thread(start_mvtui, ["--no-ui", "--config", str(config), "--port", str(port)], env=env)
    procs.append(mvtui)
    await until_up(mvtui.url, "gpu-a")
    slept = await asyncio.to_thread(run_cli, ["sleep", "gpu-a", "--level", "1"], env)
    assert slept.returncode == 0, slept.stderr
    assert slept.stdout.strip() == "gpu-a sleeping L1"
    openai_client = make_client(mvtui.url)
    answers = await asyncio.gather(*(openai_client.chat.completions.create(model="m", messages=CHAT, max_tokens=3) for _ in range(100)))
    assert all(answer.usage.completion_tokens == 3 for answer in answers)
    state = await sim_state(sim)
    assert state["wake_count"] == 1
    assert state["requests_while_sleeping"] == 0 and state["requests"] == 100


async def until_up(router_url: str, name: str) -> None:
    async with aiohttp.ClientSession() as session:

        async def up() -> bool:
            async with session.get(router_url + "/load-stats") as response:
                servers = (await response.json())["servers"]
            return any(server["name"] == name and server["routable"] for server in servers)

        for _ in range(200):
            if await up():
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never became routable")


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run([sys.executable, "-m", "mvtui", *args], env=full_env, capture_output=True, text=True, timeout=60)


class LateAnswers:
    """A vLLM-shaped server whose first armed /is_sleeping answer arrives late: the answer is
    taken when the request comes in, like a real server's, and delivered after a sleep."""

    def __init__(self) -> None:
        self.sleeping = False
        self.armed = False
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.empty)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.empty)
        app.router.add_get("/is_sleeping", self.is_sleeping)
        app.router.add_post("/sleep", self.sleep)
        return app

    async def empty(self, request: web.Request) -> web.Response:
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def is_sleeping(self, request: web.Request) -> web.Response:
        answer = self.sleeping
        if self.armed:
            self.armed = False
            self.arrived.set()
            await self.release.wait()
        return web.json_response({"is_sleeping": answer})

    async def sleep(self, request: web.Request) -> web.Response:
        self.sleeping = True
        return web.Response()


async def test_a_poll_answer_from_before_a_sleep_never_marks_the_server_awake() -> None:
    late = LateAnswers()
    runner = web.AppRunner(late.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        cluster = Cluster(TIMING)
        server = cluster.add(ServerConfig(url=url, name="late"))
        async with aiohttp.ClientSession() as session:
            poller = Poller(cluster, session, lambda: TIMING)
            await poller.check_health(server)
            assert server.routable
            late.armed = True
            poll = asyncio.create_task(poller.check_health(server))
            await late.arrived.wait()  # the poll has asked; its answer will say "awake"
            await Controller(cluster, session, lambda: TIMING).sleep("late", 1)
            late.release.set()
            await poll
        assert server.sleep_level == 1 and not server.routable
    finally:
        await runner.cleanup()
