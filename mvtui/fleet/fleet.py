"""One replica's part in a fleet of mvtui sharing a Redis: built by runtime/wiring.py when
`[cluster] redis_url` is set, and handed to the parts that need it as their own protocols
(the Operator's `SharedOverlay`, the Controller's `Coordinator`).

Start: connect and read the fleet's state before the router takes traffic (a Redis that
cannot be reached then is no reason not to start: the replica starts alone and connects in
the background). Then three background parts, each restarted if it crashes: the link's
reconnects, the follower (overlay and sleep/wake states), the heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from mvtui.cluster.fleet_status import FleetStatus
from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster
from mvtui.config.schema import ClusterConfig
from mvtui.control.live_config import LiveConfig
from mvtui.fleet import keys
from mvtui.fleet.heartbeat import Beacon, Identity
from mvtui.fleet.leases import RedisCoordinator
from mvtui.fleet.link import REDIS_ERRORS, Link
from mvtui.fleet.store import RedisOverlay
from mvtui.fleet.sync import FLEET, Follower, Spawn

log = logging.getLogger(__name__)

KeepRunning = Callable[[Callable[[], Awaitable[None]], str], "asyncio.Task[None]"]
GOODBYE_TIMEOUT_S = 0.5


class Fleet:
    def __init__(
        self,
        settings: ClusterConfig,
        identity: Identity,
        *,
        cluster: Cluster,
        live: LiveConfig,
        controller: Controller,
        spawn: Spawn,
        keep_running: KeepRunning,
    ) -> None:
        self.cluster = cluster
        self.identity = identity
        self.link = Link(settings.redis_url, self._connection_changed)
        self.follower = Follower(self.link, live, cluster, controller, spawn)
        self.coordinator = RedisCoordinator(self.link, lambda: identity.name, settings.lease_timeout, self.follower.wrote)
        self.follower.coordinator = self.coordinator
        self.overlay = RedisOverlay(self.link, live, self.follower.wrote)
        self.beacon = Beacon(self.link, cluster, self.follower, identity)
        self.epoch: str | None = None
        self._keep_running = keep_running
        self._tasks: list[asyncio.Task[None]] = []
        cluster.fleet = FleetStatus(identity.name, self.link.shown, False, self.link.problem, self.link.since)

    async def start(self) -> None:
        """Before the router takes traffic: the fleet's overlay and sleep states, read once."""
        if await self.link.connect(self._resync):
            log.info("fleet: connected to Redis at %s as %s", self.link.shown, self.identity.name)
            return
        log.warning(
            "fleet: Redis at %s cannot be reached (%s); starting with the config file alone and connecting in the background",
            self.link.shown,
            self.link.problem,
        )
        self.beacon.fail_static(self.link.problem)

    def begin(self, name: str, address: str) -> None:
        """Once the router listens (its port known): heartbeats, following, reconnecting."""
        self.identity.name, self.identity.address = name, address
        self._tasks = [
            self._keep_running(lambda: self.link.run(self._resync), "fleet link"),
            self._keep_running(self.follower.run, "fleet follower"),
            self._keep_running(self.beacon.run, "fleet heartbeat"),
        ]

    async def stop(self) -> None:
        """Leave at once (the others stop counting this replica), then close the connection."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link.connected:
            try:
                await asyncio.wait_for(self.link.client.delete(keys.REPLICA_PREFIX + self.identity.name), GOODBYE_TIMEOUT_S)
            except REDIS_ERRORS:
                pass  # its heartbeat expires by itself
        await self.link.close()

    async def _resync(self) -> None:
        """On every (re)connect: notice a Redis that lost its data, then read everything."""
        await self.link.client.set(keys.EPOCH, uuid.uuid4().hex, nx=True)
        epoch = str(await self.link.client.get(keys.EPOCH))
        if self.epoch is not None and epoch != self.epoch:
            log.warning(
                "fleet: Redis at %s lost its data (restarted without persistence?); giving it back this replica's last known state",
                self.link.shown,
            )
            self.follower.forget_versions()
            await self.follower.reseed()
        self.epoch = epoch
        await self.follower.read_all()

    def _connection_changed(self, connected: bool, problem: str) -> None:
        if connected:
            self.cluster.emit("fleet", FLEET, f"connected to Redis at {self.link.shown}: in step with the other replicas")
            return
        self.beacon.fail_static(problem)
        self.cluster.emit(
            "fleet",
            FLEET,
            f"Redis at {self.link.shown} is unreachable ({problem}): routing on the last known overlay and this replica's own "
            "counts; operator changes that every replica must share are refused until it is back",
        )
