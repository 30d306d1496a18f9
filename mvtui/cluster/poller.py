"""Polls every server concurrently: /metrics often, /health and /v1/models less often.

One task per server, so a slow server never delays the others; every call has a timeout
shorter than its interval.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import aiohttp

from mvtui.cluster.state import Cluster, Server
from mvtui.cluster.vllm import SLEEP_LEVEL_BY_STATE, VllmClient, parse_metrics
from mvtui.config.schema import TimingConfig
from mvtui.errors import CONNECTION_ERRORS, VllmError, describe_error
from mvtui.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

class Poller:
    def __init__(
        self,
        cluster: Cluster,
        session: aiohttp.ClientSession,
        timing: Callable[[], TimingConfig],
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.cluster = cluster
        self.session = session
        self.timing = timing
        self.metrics = metrics
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watched: dict[str, Server] = {}

    async def run(self) -> None:
        """Keep one polling task per server; forget removed servers once they are idle."""
        try:
            while True:
                self.reconcile()
                await asyncio.sleep(self.timing().metrics_interval)
        finally:
            await self.stop()

    def reconcile(self) -> None:
        for server in self.cluster:
            if server.removed and server.in_flight == 0:
                self.cluster.forget(server)
        current = {server.url: server for server in self.cluster}
        for url in list(self._tasks):
            if current.get(url) is not self._watched[url]:
                self._tasks.pop(url).cancel()
                del self._watched[url]
        for url, server in current.items():
            if url not in self._tasks:
                self._watched[url] = server
                self._tasks[url] = asyncio.create_task(self._watch(server), name=f"poll {server.name}")

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._watched.clear()

    def client(self, server: Server, timeout: float) -> VllmClient:
        return VllmClient(self.session, server.url, server.config.api_key, timeout)

    async def _watch(self, server: Server) -> None:
        next_health = 0.0
        loop = asyncio.get_running_loop()
        while True:
            timing = self.timing()
            # A managed instance that is not running is watched by its manager instead.
            if server.lifecycle in (None, "running"):
                now = loop.time()
                if now >= next_health or not server.is_up:
                    await self.check_health(server)
                    next_health = now + timing.health_check_interval
                if server.is_up:  # a sleeping vLLM still answers /metrics: its numbers stay true
                    await self.scrape(server)
            await asyncio.sleep(timing.metrics_interval)

    async def check_health(self, server: Server) -> None:
        """/health, then the model list and sleep state when it answers."""
        timing = self.timing()
        client = self.client(server, min(5.0, max(0.2, timing.health_check_interval * 0.9)))
        try:
            status = await client.health()
        except CONNECTION_ERRORS as error:
            self._failed(server, "health", describe_error(error))
            return
        if status != 200:
            self._failed(server, "health", f"/health answered {status}")
            return
        was_up = server.is_up
        try:
            server.model_cards = await client.models()
            server.discovered_models = tuple(card["id"] for card in server.model_cards)
        except (VllmError, *CONNECTION_ERRORS, ValueError) as error:
            self._failed(server, "models", describe_error(error))
            return
        await self._read_sleep_state(server, client)
        if server.health.success() and not was_up:
            self.cluster.emit("up", server, f"up, serving {', '.join(server.models) or 'no models'}")

    async def _read_sleep_state(self, server: Server, client: VllmClient) -> None:
        if server.sleep_capable is False or server.waking or server.sleep_pending:
            return
        epoch = server.sleep_epoch
        try:
            sleeping = await client.is_sleeping()
        except VllmError:
            server.sleep_capable = False
            return
        except CONNECTION_ERRORS:
            return
        if epoch != server.sleep_epoch or server.waking or server.sleep_pending:
            return  # a sleep or wake happened while the answer travelled: it is stale
        server.sleep_capable = True
        if not sleeping:
            server.sleep_level = 0
        elif not server.sleep_level:
            server.sleep_level = 1  # slept by someone else; the level is not visible here

    async def scrape(self, server: Server) -> None:
        timing = self.timing()
        client = self.client(server, max(0.2, timing.metrics_interval * 0.9))
        sent_before = server.sent_total
        epoch = server.sleep_epoch
        try:
            text = await client.metrics_text()
        except asyncio.TimeoutError:
            self._count_error(server, "metrics")  # busy, not dead: the health probe decides
            return
        except (VllmError, *CONNECTION_ERRORS) as error:
            self._failed(server, "metrics", describe_error(error))
            return
        metrics = parse_metrics(text, asyncio.get_running_loop().time())
        server.scraped(metrics, sent_before)
        fresh = epoch == server.sleep_epoch and not (server.waking or server.sleep_pending)
        if metrics.sleep_state in SLEEP_LEVEL_BY_STATE and fresh:
            server.sleep_level = SLEEP_LEVEL_BY_STATE[metrics.sleep_state]

    def _failed(self, server: Server, kind: str, error: str) -> None:
        self._count_error(server, kind)
        server.last_error = error
        if server.health.failure(error):
            self.cluster.emit("down", server, f"down: {error}")

    def _count_error(self, server: Server, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.poll_errors.labels(server.name, kind).inc()
