"""Wires mvtui's parts on one event loop: cluster state, poller, proxy and status endpoints.

`Services` is an async context manager. `mvtui --no-ui` runs it under asyncio; the Textual
app starts the same object on its own loop and only reads its state and calls commands.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from mvtui.admin.server import AdminServer
from mvtui.cluster.poller import Poller
from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Clock, Cluster
from mvtui.config.schema import Config
from mvtui.control.reloader import ConfigReloader
from mvtui.errors import ConfigError
from mvtui.gpu import GpuProbe
from mvtui.instances.manager import InstanceManager
from mvtui.paths import AppPaths
from mvtui.router.endpoints import StatusEndpoints
from mvtui.router.metrics import RouterMetrics
from mvtui.router.proxy import Proxy
from mvtui.routing.policies import Chooser

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024
# aiohttp's default (128) drops SYNs when hundreds of clients connect at once; each then waits
# a 1 s retransmit (benchmarks/router_bench.py, c=256). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


class Services:
    """Everything that runs behind the dashboard, started and stopped as one."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        paths: AppPaths | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        registry: CollectorRegistry | None = None,
        overrides: Callable[[Config], Config] | None = None,
        gpu: GpuProbe | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.paths = paths or AppPaths.default()
        self.cluster = Cluster(config.timing, clock)
        self.registry = registry or CollectorRegistry()
        self.metrics = RouterMetrics(self.registry, self.cluster)
        self.chooser = Chooser(config.router.policy, rng)
        self.session: aiohttp.ClientSession | None = None
        self.poller: Poller | None = None
        self.proxy: Proxy | None = None
        self.router_port: int | None = None
        self.gpu = gpu if gpu is not None else GpuProbe()  # tests pass a fake pynvml module
        self.control: Controller | None = None
        self.instances: InstanceManager | None = None
        self.admin: AdminServer | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stoppers: list[Callable[[], Awaitable[None]]] = []
        # what the command line sets over the file (e.g. --port); applied to every reload
        self.overrides: Callable[[Config], Config] = overrides or (lambda config: config)
        self.reloader: ConfigReloader | None = None
        # the config file's problems while it is broken (the last good config stays in force)
        self.config_error: ConfigError | None = None

    @property
    def router_url(self) -> str:
        host = self.config.router.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{shown}:{self.router_port}"

    async def __aenter__(self) -> "Services":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),  # one upstream's cookies must not reach other clients
        )
        self.cluster.apply(self.config.servers, self.config.timing)
        self.poller = Poller(self.cluster, self.session, lambda: self.config.timing, self.metrics)
        self.poller.reconcile()
        self.spawn(self.poller.run(), "poller")
        control = self._start_control()
        self.proxy = Proxy(self.cluster, self.session, lambda: self.config, self.chooser, self.metrics, make_available=control.make_available)
        await self._serve()
        self.admin = AdminServer(self)
        await self.admin.start()
        self.on_stop(self.admin.stop)
        if self.config_path is not None:
            self.reloader = ConfigReloader(self, self.config_path)
            await self.reloader.start()
            self.on_stop(self.reloader.stop)

    def _start_control(self) -> Controller:
        """Sleep/wake control and local instances; their process groups stop with us."""
        timing = lambda: self.config.timing  # noqa: E731
        self.control = Controller(self.cluster, self.session, timing, self.cluster.clock)  # type: ignore[arg-type]
        self.instances = InstanceManager(
            self.cluster, self.control, self.session, self.paths, timing, self.gpu, self.cluster.clock  # type: ignore[arg-type]
        )
        self.instances.apply(self.config.instances)
        self.spawn(self.instances.run(), "instances")
        self.on_stop(self.instances.stop_all)
        self.on_stop(self.control.close)
        return self.control

    async def _serve(self) -> None:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.add_routes(self.proxy.routes())  # type: ignore[union-attr]
        app.add_routes(StatusEndpoints(self.cluster, self.registry).routes())
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=self.config.timing.shutdown_timeout
        )
        await self._runner.setup()
        router = self.config.router
        self._site = web.TCPSite(self._runner, router.host, router.port, reuse_address=True, backlog=LISTEN_BACKLOG)
        await self._site.start()
        self.router_port = self._runner.addresses[0][1]
        log.info("router listening on %s", self.router_url)

    def spawn(self, coroutine: Awaitable[None], name: str) -> asyncio.Task[None]:
        """A background part of the core; its crash is logged, not swallowed silently."""
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        task.add_done_callback(self._report_crash)
        self._tasks.append(task)
        return task

    def on_stop(self, stopper: Callable[[], Awaitable[None]]) -> None:
        """Run at shutdown, last registered first, before the HTTP session closes."""
        self._stoppers.append(stopper)

    @staticmethod
    def _report_crash(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())

    def apply_config(self, config: Config) -> list[str]:
        """Bring a new config into force without a restart; returns notes for the operator."""
        notes: list[str] = []
        old = self.config
        self.config = config
        added = self.cluster.apply(config.servers, config.timing)
        if self.instances is not None:
            notes.extend(self.instances.apply(config.instances))
        if self.poller is not None:
            self.poller.reconcile()
        if config.router.policy != self.chooser.policy_name:
            self.chooser.set_policy(config.router.policy)
            notes.append(f"routing policy is now {config.router.policy}")
        if (config.router.host, config.router.port) != (old.router.host, old.router.port):
            notes.append(
                f"router address changed to {config.router.host}:{config.router.port}; "
                f"it takes effect after a restart (still serving on {self.router_url})"
            )
        notes.extend(f"added {server.url}" for server in added)
        return notes

    async def reload_config(self) -> list[str]:
        """Read the config file now (the `r` key); a broken file is reported, not raised."""
        if self.reloader is None:
            return ["running without a config file: nothing to reload"]
        return await self.reloader.reload(forced=True)

    async def wait_idle(self, timeout: float) -> bool:
        """Until nothing is in flight, at most `timeout` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.cluster.summary().in_flight:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), then stop every part."""
        if self.proxy is not None:
            self.proxy.closing = True
        if self._site is not None:
            await self._site.stop()
            if not await self.wait_idle(self.config.timing.shutdown_timeout):
                log.warning("stopping with %d requests still in flight", self.cluster.summary().in_flight)
        if self._runner is not None:
            await self._runner.cleanup()
        for stopper in reversed(self._stoppers):
            try:
                await stopper()
            except Exception:  # one part failing to stop must not keep the others running
                log.exception("error while stopping")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        self._site = self._runner = None
