"""`mvtui --demo`: three simulated vLLM servers of unequal size behind the router, with a
steady synthetic load, so a new user sees a live cluster in seconds, GPU or not."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
from collections.abc import AsyncIterator

import aiohttp

from mvtui.config.schema import Config, ServerConfig
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from mvtui.sim.config import SimConfig
from mvtui.sim.server import SimServer

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEMO_SERVERS = (
    ("small", SimConfig(model=DEMO_MODEL, max_num_seqs=4, tokens_per_s=20, ttft_ms=150)),
    ("medium", SimConfig(model=DEMO_MODEL, max_num_seqs=8, tokens_per_s=35, ttft_ms=80)),
    ("big", SimConfig(model=DEMO_MODEL, max_num_seqs=16, tokens_per_s=60, ttft_ms=40, enable_sleep_mode=True)),
)
PROMPTS = (
    "Summarise the last incident report in three bullet points.",
    "Write a haiku about GPUs running hot.",
    "Explain KV-cache paging to a new operator.",
    "Translate 'the cluster is healthy' into French and German.",
)


@contextlib.asynccontextmanager
async def demo_services(config: Config, paths: AppPaths) -> AsyncIterator[Services]:
    """Simulators first, then the core pointed at them, then the load."""
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name, sim_config in DEMO_SERVERS:
            sim = await stack.enter_async_context(SimServer(sim_config, dev_mode=True))
            servers.append(ServerConfig(url=sim.url, name=name, max_concurrent_requests=sim_config.max_num_seqs))
        demo_config = dataclasses.replace(config, servers=tuple(servers))
        services = await stack.enter_async_context(Services(demo_config, paths=paths))
        load = SyntheticLoad(services.router_url, capacity=sum(server.max_concurrent_requests for server in servers))
        load_task = asyncio.create_task(load.run(), name="demo load")
        stack.push_async_callback(_cancel, load_task)  # exits first: the load stops before the core
        yield services


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class SyntheticLoad:
    """Keeps a slowly swinging number of streamed chat requests in flight."""

    def __init__(self, router_url: str, capacity: int, rng: random.Random | None = None, period_s: float = 90.0) -> None:
        self.router_url = router_url
        self.capacity = capacity
        self.rng = rng or random.Random(7)
        self.period_s = period_s

    def target(self, elapsed: float) -> int:
        swing = 0.6 + 0.35 * math.sin(2 * math.pi * elapsed / self.period_s)
        return max(1, round(self.capacity * swing))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        running: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession() as session:
            try:
                while True:
                    while len(running) < self.target(loop.time() - started):
                        task = asyncio.create_task(self.one_request(session))
                        running.add(task)
                        task.add_done_callback(running.discard)
                    await asyncio.sleep(0.2 + self.rng.random() * 0.3)
            finally:
                for task in list(running):
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

    async def one_request(self, session: aiohttp.ClientSession) -> None:
        body = {
            "model": DEMO_MODEL,
            "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
            "max_tokens": self.rng.randint(16, 160),
            "stream": True,
        }
        try:
            async with session.post(self.router_url + "/v1/chat/completions", json=body) as response:
                async for _ in response.content.iter_any():
                    pass
        except (TimeoutError, aiohttp.ClientError) as error:
            log.debug("demo request failed: %s", error)
            await asyncio.sleep(1.0)
