"""Wires mvtui's parts on one event loop; nothing but the entry points imports this.

`Services` is an async context manager. `mvtui --no-ui` runs it under asyncio; the Textual
app starts the same object on its own loop and only reads state and calls the `Operator`.
Each part gets only the objects it uses, built here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from mvtui.admin.server import AdminServer
from mvtui.cluster.poller import Poller
from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Clock, Cluster, Server
from mvtui.config.schema import Config
from mvtui.control.live_config import LiveConfig
from mvtui.control.operator import Operator
from mvtui.control.reloader import ConfigReloader
from mvtui.errors import ConfigError
from mvtui.gpu import GpuProbe
from mvtui.instances.manager import InstanceManager
from mvtui.paths import AppPaths
from mvtui.router.adapters.base import FrontDoorClient, loopback_url
from mvtui.router.adapters.openai_paths import unversioned_routes
from mvtui.router.adapters.registry import adapter_routes
from mvtui.router.endpoints import StatusEndpoints
from mvtui.router.front_door import FrontDoor
from mvtui.router.metrics import RouterMetrics
from mvtui.router.proxy import Proxy
from mvtui.routing.policies import Chooser, installed_policies
from mvtui.runtime.bind import listening_line
from mvtui.runtime.startup_errors import router_listen_error
from mvtui.runtime.supervisor import Supervisor

if TYPE_CHECKING:
    from mvtui.fleet.fleet import Fleet

log = logging.getLogger(__name__)

CONFIG_SOURCE = "config"  # the `server` field of the cluster events about the config


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
        self.paths = paths or AppPaths.default()
        self.cluster = Cluster(config.timing, clock)
        self.live = LiveConfig(config, path=config_path, overrides=overrides or _unchanged, emit=self._config_event)
        self.live.on_change(self.apply_config)
        self.registry = registry or CollectorRegistry()
        self.metrics = RouterMetrics(self.registry, self.cluster)
        self.chooser = Chooser(self.config.router.policy, rng, installed_policies())
        self.gpu = gpu if gpu is not None else GpuProbe()  # tests pass a fake pynvml module
        self.session: aiohttp.ClientSession | None = None
        self.poller: Poller | None = None
        self.proxy: Proxy | None = None
        self.router_port: int | None = None
        self.control: Controller | None = None
        self.instances: InstanceManager | None = None
        self._operator: Operator | None = None
        self.fleet: Fleet | None = None  # with [cluster] redis_url: this replica's part in the fleet
        self.admin: AdminServer | None = None
        self.reloader: ConfigReloader | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self.supervisor = Supervisor(self.cluster.part_fault)
        self._stoppers: list[Callable[[], Awaitable[None]]] = []

    @property
    def operator(self) -> Operator | None:
        """Every operator verb; None until the services have started."""
        return self._operator

    @property
    def config(self) -> Config:
        return self.live.current

    @property
    def config_path(self) -> Path | None:
        return self.live.path

    @property
    def config_error(self) -> ConfigError | None:
        """The config file's problems while it is broken (the last good config stays in force)."""
        return self.live.error

    @property
    def router_url(self) -> str:
        host = self.config.router.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{shown}:{self.router_port}"

    async def __aenter__(self) -> Services:
        try:
            await self.start()
        except BaseException:  # what did start (session, tasks, instances) stops again
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.session = session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),  # one upstream's cookies must not reach other clients
        )
        self.cluster.apply(self.config.servers, self.config.timing)
        self.poller = Poller(self.cluster, session, lambda: self.config.timing, self.metrics.count_poll_error)
        self.poller.reconcile()
        self.keep_running(self.poller.run, "poller")
        control, instances = self._start_control(session)
        self.fleet = await self._start_fleet(control)  # the fleet's overlay, read before any traffic
        self._operator = Operator(self.cluster, self.live, control, instances, self.fleet.overlay if self.fleet else None)
        self.proxy = Proxy(self.cluster, session, lambda: self.config, self.chooser, self.metrics, make_available=control.make_available)
        self.on_stop(self.proxy.admission.close)  # its timer and the wakes queued requests wait for
        await self._serve()
        if self.fleet is not None:
            self.fleet.begin(*self._replica_identity())
        self.admin = AdminServer(
            self._operator, self.config.admin, self.paths, session, spawn=self.spawn, router_url=lambda: self.router_url
        )
        await self.admin.start()
        self.on_stop(self.admin.stop)
        if self.live.path is not None:
            self.reloader = ConfigReloader(self.live, self.keep_running)
            await self.reloader.start()
            self.on_stop(self.reloader.stop)

    def _start_control(self, session: aiohttp.ClientSession) -> tuple[Controller, InstanceManager]:
        """Sleep/wake control and local instances; their process groups stop with us."""
        timing = lambda: self.config.timing  # noqa: E731
        control = self.control = Controller(self.cluster, session, timing, self.cluster.clock)
        instances = self.instances = InstanceManager(
            self.cluster, control, session, self.paths.instance_logs, timing, self.gpu, self.cluster.clock
        )
        control.before_wake = instances.before_wake
        control.on_demand = instances.demand
        instances.apply(self.config.instances)
        self.keep_running(instances.run, "instances")
        self.on_stop(instances.stop_all)
        self.on_stop(control.close)
        return control, instances

    async def _start_fleet(self, control: Controller) -> Fleet | None:
        """With [cluster] redis_url: operator state shared with the other replicas through Redis."""
        settings = self.config.cluster
        if not settings.redis_url:
            return None
        from mvtui.fleet.fleet import Fleet  # the redis package only loads for a fleet
        from mvtui.fleet.heartbeat import Identity

        name, address = self._replica_identity(self.config.router.port)
        fleet = Fleet(
            settings,
            Identity(name, address),
            cluster=self.cluster,
            live=self.live,
            controller=control,
            spawn=self.spawn,
            keep_running=self.keep_running,
        )
        control.coordinator = fleet.coordinator
        self.on_stop(fleet.stop)
        await fleet.start()
        return fleet

    def _replica_identity(self, port: int | None = None) -> tuple[str, str]:
        """This replica's name ([cluster] name, else hostname:port) and its router's address."""
        port = port if port is not None else self.router_port
        host = self.config.router.host
        shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
        return self.config.cluster.name or f"{socket.gethostname()}:{port}", f"{shown}:{port}"

    async def _serve(self) -> None:
        assert self.proxy is not None
        routes = [*self.proxy.routes(), *StatusEndpoints(self.cluster, self.registry).routes()]
        routes += unversioned_routes(self.proxy.handle, self.proxy.list_models)
        host = self.config.router.host  # protocol adapters send their OpenAI requests to this router
        loopback = FrontDoorClient(self.proxy.session, lambda: loopback_url(host, self.router_port or 0), lambda: self.config)
        routes += adapter_routes(loopback, routes)
        door = FrontDoor(lambda: self.config, routes, self.config.timing.shutdown_timeout)
        try:
            await door.start()
        except OSError as error:
            raise router_listen_error(self.config.router.host, self.config.router.port, error, self.paths.admin_dir) from error
        self._runner, self._site = door.runner, door.site  # stop() stops them in two steps
        self.router_port = door.port
        log.info("%s", listening_line(self.config.router.host, door.port))  # what is bound, not a URL to this machine

    def spawn(self, work: Awaitable[None], name: str) -> asyncio.Task[None]:
        """A one-off background task; its crash is logged and shown, not swallowed."""
        return self.supervisor.run_once(work, name)

    def keep_running(self, start: Callable[[], Awaitable[None]], name: str) -> asyncio.Task[None]:
        """A part that runs as long as mvtui does: restarted with backoff after a crash."""
        return self.supervisor.keep_running(start, name)

    def on_stop(self, stopper: Callable[[], Awaitable[None]]) -> None:
        """Run at shutdown, last registered first, before the HTTP session closes."""
        self._stoppers.append(stopper)

    def _config_event(self, kind: str, message: str) -> None:
        self.cluster.emit(kind, CONFIG_SOURCE, message)

    def apply_config(self, old: Config, config: Config) -> list[str]:
        """Bring a new config into force without a restart; returns notes for the operator."""
        notes: list[str] = []
        added: list[Server] = self.cluster.apply(config.servers, config.timing)
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
                in_flight = self.cluster.summary().in_flight
                log.warning("stopping with %d request%s still in flight", in_flight, "" if in_flight == 1 else "s")
        if self._runner is not None:
            await self._runner.cleanup()
        for stopper in reversed(self._stoppers):
            try:
                await stopper()
            except Exception:  # one part failing to stop must not keep the others running
                log.exception("error while stopping")
        await self.supervisor.stop()
        if self.session is not None:
            await self.session.close()
        self._site = self._runner = None


def _unchanged(config: Config) -> Config:
    return config
