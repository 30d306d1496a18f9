"""Sleep and wake across replicas: one lease per server in Redis, with a fencing token.

A replica that operates on a server takes `mvtui:lease:URL` with `SET NX PX`, its value the
replica's name and a token from `INCR mvtui:fence:URL` (larger than every earlier one). It
renews the lease while it works; every later step (the drain announced to the others, the
check before `/sleep`, the end) is checked against the lease in Redis, in the same script as
the write, so a replica whose lease expired never acts over its successor. A replica that
dies holding a lease loses it when it expires; `recovery.py` then finishes or undoes its
operation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mvtui.cluster.coordination import Lease, LocalLease, Operation, Phase
from mvtui.cluster.state import Server
from mvtui.errors import CommandError, FleetUnavailable
from mvtui.fleet import keys
from mvtui.fleet.keys import Heartbeat, PowerEntry
from mvtui.fleet.link import REDIS_ERRORS, Link, honour_cancel

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.05
Wrote = Callable[[int], None]  # told the version of each write this replica made


class RedisLease:
    """A lease held in Redis by this replica (see the module's docstring)."""

    def __init__(self, link: Link, server: str, holder: str, token: int, ttl_ms: int, *, required: bool, wrote: Wrote) -> None:
        self.link = link
        self.wrote = wrote
        self.server = server
        self.holder = holder
        self.token = token
        self.value = f"{holder}|{token}"
        self.key = keys.lease_key(server)
        self.ttl_ms = ttl_ms
        self.required = required  # False (wake on demand): Redis going away does not stop it
        self.lost = False
        self._renewing = asyncio.ensure_future(self._renew())
        self._renewing.set_name(f"lease {server}")

    async def announce(self, phase: Phase, level: int) -> None:
        entry = "" if phase == "awake" else PowerEntry(phase, level, self.token, self.holder).dumps()
        script = self.link.script(keys.FENCED_WRITE)
        version = await self._call(
            lambda: script(keys=[self.key, keys.POWER, keys.VERSION], args=[self.value, self.server, entry, keys.CHANNEL])
        )
        if version == 0:
            self._lose(f"telling the other replicas '{phase}'")
        if version:
            self.wrote(int(version))

    async def check(self) -> None:
        if self.lost:
            self._lose("the next step")
        value = await self._call(lambda: self.link.client.get(self.key))
        if self.link.connected and value != self.value:  # expired, or another replica's now
            self._lose("the next step")

    async def others_idle(self) -> bool:
        records = await self._call(lambda: live_replicas(self.link))
        if records is None:  # Redis away and not required: nobody else to wait for
            return True
        others = [record for record in records if record.name != self.holder]
        return all(record.acks.get(self.server) == self.token and not record.in_flight.get(self.server) for record in others)

    async def release(self) -> None:
        self._renewing.cancel()
        await asyncio.gather(self._renewing, return_exceptions=True)
        try:
            await self.link.script(keys.RELEASE)(keys=[self.key], args=[self.value])
        except REDIS_ERRORS as error:
            self.link.lost(error)  # it expires by itself

    async def _renew(self) -> None:
        script = self.link.script(keys.RENEW)
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                renewed = await script(keys=[self.key], args=[self.value, self.ttl_ms])
            except REDIS_ERRORS as error:
                self.link.lost(error)
                continue
            finally:
                honour_cancel()
            if renewed == 0:
                self.lost = True
                log.warning("fleet: the lease on %s (token %d) was lost", self.server, self.token)
                return

    async def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """A call to Redis; when Redis is away: FleetUnavailable, or None when not required."""
        try:
            return await make()
        except REDIS_ERRORS as error:
            self.link.lost(error)
            if self.required:
                raise FleetUnavailable(f"the fleet's Redis became unreachable during the operation: {self.link.problem}") from None
            return None

    def _lose(self, step: str) -> None:
        self.lost = True
        raise CommandError(f"this replica's lease on {self.server} expired or was taken over; stopped before {step}")


class RedisCoordinator:
    """`cluster.coordination.Coordinator` over Redis."""

    def __init__(self, link: Link, holder: Callable[[], str], ttl_s: float, wrote: Wrote) -> None:
        self.link = link
        self.wrote = wrote
        self.holder = holder
        self.ttl_ms = max(1, int(ttl_s * 1000))

    async def acquire(self, server: Server, operation: Operation, level: int, *, required: bool) -> Lease | None:
        if server.lifecycle is not None:  # a local instance: this replica's alone
            return LocalLease()
        if not self.link.connected:
            if required:
                self.link.require()
            return LocalLease()
        try:
            return await self._take(server.display_url, required)
        except REDIS_ERRORS as error:
            self.link.lost(error)
            if required:
                self.link.require()
            return LocalLease()

    async def _take(self, server: str, required: bool) -> RedisLease | None:
        token = int(await self.link.client.incr(keys.fence_key(server)))
        holder = self.holder()
        if not await self.link.client.set(keys.lease_key(server), f"{holder}|{token}", nx=True, px=self.ttl_ms):
            return None
        return RedisLease(self.link, server, holder, token, self.ttl_ms, required=required, wrote=self.wrote)

    async def take_over(self, server: str) -> RedisLease | None:
        """A lease to finish or undo an operation whose holder is gone; None if taken."""
        try:
            return await self._take(server, True)
        except REDIS_ERRORS as error:
            self.link.lost(error)
            return None

    async def wait_settled(self, server: Server, timeout: float) -> int:
        """Until no replica holds the server's lease; then its recorded sleep level."""
        deadline = time.monotonic() + timeout
        url = server.display_url
        while True:
            try:
                held, raw = await self._lease_and_entry(url)
            except REDIS_ERRORS as error:
                self.link.lost(error)
                return server.sleep_level or 1  # alone from now on: this replica wakes it itself
            if not held:
                entry = PowerEntry.parse(raw) if raw else None
                return 0 if entry is None or entry.phase == "awake" else max(entry.level, 1)
            if time.monotonic() >= deadline:
                raise CommandError(f"another mvtui replica is still putting {server.name} to sleep or waking it after {timeout:g} s")
            await asyncio.sleep(WAIT_POLL_S)

    async def _lease_and_entry(self, url: str) -> tuple[bool, str | None]:
        async with self.link.client.pipeline(transaction=False) as pipe:
            pipe.exists(keys.lease_key(url))
            pipe.hget(keys.POWER, url)
            held, raw = await pipe.execute()
        return bool(held), raw


async def live_replicas(link: Link) -> list[Heartbeat]:
    """Every live replica's last heartbeat (expired ones are forgotten on the way)."""
    raw = await link.script(keys.BEAT)(keys=[keys.REPLICAS], args=[keys.REPLICA_PREFIX])
    return [beat for beat in (Heartbeat.parse(text) for text in raw) if beat is not None]
