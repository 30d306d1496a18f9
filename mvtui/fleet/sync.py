"""Keeps this replica on the fleet's state: the shared overlay and every sleep or wake.

Subscribed to `mvtui:changes`, it reads both hashes whole on each message, and at least
every FULL_READ_S anyway, so a missed message never leaves a replica wrong for long. A read
older than this replica's own last write is dropped (its own write is already in force).
A sleep or wake whose holder is gone (its lease expired) is finished or undone here: the
server is asked how it is, and the replicas told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster, Server
from mvtui.control.live_config import LiveConfig
from mvtui.errors import CommandError
from mvtui.fleet import keys
from mvtui.fleet.keys import PowerEntry
from mvtui.fleet.leases import RedisCoordinator
from mvtui.fleet.link import REDIS_ERRORS, Link, honour_cancel

log = logging.getLogger(__name__)

FULL_READ_S = 1.0
FLEET = "fleet"  # the `server` field of the cluster events about the fleet itself
Spawn = Callable[[Awaitable[None], str], "asyncio.Task[None]"]


class Follower:
    def __init__(self, link: Link, live: LiveConfig, cluster: Cluster, controller: Controller, spawn: Spawn) -> None:
        self.link = link
        self.live = live
        self.cluster = cluster
        self.controller = controller
        self.spawn = spawn
        self.coordinator: RedisCoordinator | None = None  # set by the fleet: recoveries take leases
        self.version = 0  # of the newest state this replica read or wrote
        self.overlay: dict[str, dict[str, Any]] = {}  # server URL -> its shared live changes
        self.power: dict[str, PowerEntry] = {}  # server URL -> its sleep or wake
        self.acks: dict[str, int] = {}  # server URL -> token of the drain this replica follows
        self._recovering: set[str] = set()

    def wrote(self, version: int) -> None:
        """This replica wrote `version`: reads older than it are stale."""
        self.version = max(self.version, version)

    def forget_versions(self) -> None:
        """Redis lost its data (and so its version counter): every version starts over."""
        self.version = 0

    async def run(self) -> None:
        while True:
            await self.link.up.wait()
            try:
                await self._follow()
            except REDIS_ERRORS as error:
                self.link.lost(error)
            finally:
                honour_cancel()

    async def _follow(self) -> None:
        pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.CHANNEL)
            await self.read_all()
            while self.link.connected:
                await pubsub.get_message(timeout=FULL_READ_S)  # a change, or time for the periodic read
                honour_cancel()
                await self.read_all()
                honour_cancel()
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def read_all(self) -> None:
        async with self.link.client.pipeline(transaction=True) as pipe:
            pipe.get(keys.VERSION)
            pipe.hgetall(keys.OVERLAY)
            pipe.hgetall(keys.POWER)
            version, overlay, power = await pipe.execute()
        if int(version or 0) < self.version:
            return  # older than this replica's own last write; the next message brings the newer
        self.version = int(version or 0)
        self._adopt_overlay(overlay)
        self._adopt_power(power)
        await self._find_orphans()

    # --- the overlay ---------------------------------------------------------------------

    def _adopt_overlay(self, raw: dict[str, str]) -> None:
        entries = {server: entry for server, text in raw.items() if (entry := keys.overlay_entry(text)) is not None}
        self.overlay = entries
        by_shown = {server.display_url: server.url for server in self.live.listed_servers()}
        local = {by_shown[shown]: entry for shown, entry in entries.items() if shown in by_shown}
        notes = self.live.change(lambda overlay: overlay.adopt(local))
        if notes:
            self.cluster.emit("fleet", FLEET, "from another replica: " + "; ".join(notes))

    # --- sleep and wake --------------------------------------------------------------------

    def _adopt_power(self, raw: dict[str, str]) -> None:
        entries = {server: entry for server, text in raw.items() if (entry := PowerEntry.parse(text)) is not None}
        previous, self.power = self.power, entries
        servers = self._servers()
        for shown, entry in entries.items():
            if shown in servers:
                self.controller.follow(servers[shown], entry.phase, entry.level)
        for shown in previous.keys() - entries.keys():
            if shown in servers:
                self.controller.follow(servers[shown], "awake", 0)
        self.acks = {shown: entry.token for shown, entry in entries.items() if entry.phase == "draining"}

    def _servers(self) -> dict[str, Server]:
        """The servers every replica shares (not local instances), by URL without credentials."""
        return {server.display_url: server for server in self.cluster if server.lifecycle is None}

    async def _find_orphans(self) -> None:
        waiting = [shown for shown, entry in self.power.items() if entry.transitional and shown not in self._recovering]
        if not waiting or self.coordinator is None:
            return
        leases = await self.link.client.mget([keys.lease_key(shown) for shown in waiting])
        servers = self._servers()
        for shown, lease in zip(waiting, leases, strict=True):
            if lease is None and shown in servers:
                self._recovering.add(shown)
                self.spawn(self._recover(servers[shown], self.power[shown]), f"fleet recovery {shown}")

    async def _recover(self, server: Server, orphan: PowerEntry) -> None:
        """Finish or undo a sleep or wake whose replica is gone: the server says how it is."""
        assert self.coordinator is not None
        try:
            lease = await self.coordinator.take_over(server.display_url)
            if lease is None:
                return  # another replica took it over
            try:
                await self._settle(server, orphan, lease)
            finally:
                await lease.release()
        except CommandError as error:
            log.warning("fleet: could not settle %s left %s by %s: %s", server.name, orphan.phase, orphan.holder, error)
        except REDIS_ERRORS as error:
            self.link.lost(error)  # tried again once Redis is back
        finally:
            self._recovering.discard(server.display_url)

    async def _settle(self, server: Server, orphan: PowerEntry, lease: Any) -> None:
        current = await self.link.client.hget(keys.POWER, server.display_url)
        if (PowerEntry.parse(str(current)) if current else None) != orphan:
            return  # it moved on meanwhile
        level = await self.controller.observed_level(server)
        phase = "asleep" if level else "awake"
        await lease.announce(phase, level or orphan.level)
        undone = "the drain is undone" if orphan.phase == "draining" and not level else f"it is {phase}"
        message = f"replica {orphan.holder} stopped while {orphan.phase} it (its lease expired); {undone}"
        log.warning("fleet: %s: %s", server.name, message)
        self.cluster.emit("fleet", server, message)

    # --- after Redis lost its data -----------------------------------------------------

    async def reseed(self) -> None:
        """Give a Redis that restarted empty this replica's last known state (where no other
        replica gave one first): the drains and sleeps stay in force."""
        async with self.link.client.pipeline(transaction=True) as pipe:
            for shown, entry in self.overlay.items():
                pipe.hsetnx(keys.OVERLAY, shown, keys.dumps(entry))
            for shown, power in self.power.items():
                if power.phase == "asleep":
                    pipe.hsetnx(keys.POWER, shown, power.dumps())
            pipe.incr(keys.VERSION)
            pipe.publish(keys.CHANNEL, "reseed")
            await pipe.execute()
