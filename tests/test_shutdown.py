"""Stopping the core: requests in flight finish, and keep-alive clients get no new work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from mvtui.config.schema import AdminConfig, Config, RouterConfig, ServerConfig, TimingConfig
from mvtui.gpu import GpuProbe
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from mvtui.sim.config import SimConfig
from mvtui.sim.server import SimServer
from tests.helpers import eventually

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_stopping_finishes_requests_in_flight_and_turns_keep_alive_requests_away(tmp_path: Path) -> None:
    async with SimServer(SimConfig(model="m", tokens_per_s=20)) as sim:
        config = Config(
            router=RouterConfig(host="127.0.0.1", port=0),
            timing=TimingConfig(metrics_interval=0.1, health_check_interval=0.5, shutdown_timeout=10),
            admin=AdminConfig(enabled=False),
            servers=(ServerConfig(url=sim.url, max_concurrent_requests=4),),
        )
        services = Services(config, paths=AppPaths(tmp_path / "c", tmp_path / "l", tmp_path / "s"), gpu=GpuProbe(nvml=None))
        await services.start()
        url = services.router_url + "/v1/chat/completions"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as keep_alive, aiohttp.ClientSession() as other:
            await eventually(lambda: services.cluster.servers[sim.url].is_up)
            async with keep_alive.post(url, json={**CHAT, "max_tokens": 1}) as warm:
                assert warm.status == 200  # the connection stays open for the next request
            slow = asyncio.create_task(other.post(url, json={**CHAT, "max_tokens": 20}))
            await eventually(lambda: services.cluster.summary().in_flight == 1)
            stopping = asyncio.create_task(services.stop())
            await eventually(lambda: services.proxy.closing)  # type: ignore[union-attr]
            async with keep_alive.post(url, json={**CHAT, "max_tokens": 1}) as late:
                assert late.status == 503
                assert late.headers["Retry-After"]
            reply = await slow
            assert reply.status == 200
            assert (await reply.json())["usage"]["completion_tokens"] == 20
            await stopping
