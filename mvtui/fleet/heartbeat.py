"""Each replica's heartbeat: who it is, its requests in flight per server, every BEAT_EVERY_S.

One script per beat writes this replica's record (with a short TTL: a replica that dies or
loses Redis drops out within BEAT_TTL_MS) and reads every live one. From them each server
gets the other replicas' requests in flight (`Server.remote_in_flight`, added to this
replica's own where the router scores and decides a server is full), this replica's share
of its free slots until the next beat (`Server.fleet_cap`: replicas that see the same free
slots at once split them instead of each taking all), and the view of the fleet for the
dashboard and the status endpoints (`Cluster.fleet`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from mvtui.cluster.fleet_status import FleetStatus, ReplicaStatus
from mvtui.cluster.state import Cluster, Server
from mvtui.fleet import keys
from mvtui.fleet.keys import Heartbeat
from mvtui.fleet.link import REDIS_ERRORS, Link, honour_cancel
from mvtui.fleet.sync import Follower

log = logging.getLogger(__name__)

BEAT_EVERY_S = 0.1
BEAT_TTL_MS = 2000
RATE_SAMPLES = 11  # one second of beats


@dataclass
class Identity:
    """This replica among the others; `name` and `address` are final once its router listens."""

    name: str
    address: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


class Beacon:
    def __init__(self, link: Link, cluster: Cluster, follower: Follower, identity: Identity) -> None:
        self.link = link
        self.cluster = cluster
        self.follower = follower
        self.identity = identity
        self._requests: deque[tuple[float, int]] = deque(maxlen=RATE_SAMPLES)
        self._name_taken_said = False

    async def run(self) -> None:
        while True:
            await self.link.up.wait()
            try:
                mine, records = await self.beat()
            except REDIS_ERRORS as error:
                self.link.lost(error)
                continue
            finally:
                honour_cancel()
            self.absorb(mine, records)
            await asyncio.sleep(BEAT_EVERY_S)

    async def beat(self) -> tuple[Heartbeat, list[Heartbeat]]:
        mine = self.record()
        args: list[str | int] = [keys.REPLICA_PREFIX, mine.name, mine.dumps(), BEAT_TTL_MS]
        raw = await self.link.script(keys.BEAT)(keys=[keys.REPLICAS], args=args)
        return mine, [beat for beat in (Heartbeat.parse(text) for text in raw) if beat is not None]

    def record(self) -> Heartbeat:
        servers = shared_servers(self.cluster)
        summary = self.cluster.summary()
        return Heartbeat(
            name=self.identity.name,
            id=self.identity.id,
            address=self.identity.address,
            pid=os.getpid(),
            at=time.time(),
            in_flight={shown: server.in_flight for shown, server in servers.items() if server.in_flight > 0},
            queued=summary.queued,
            requests_per_s=self._rate(sum(server.stats.requests for server in servers.values())),
            acks=dict(self.follower.acks),
        )

    def _rate(self, total: int) -> float:
        now = time.monotonic()
        self._requests.append((now, total))
        (first_at, first), (last_at, last) = self._requests[0], self._requests[-1]
        return (last - first) / (last_at - first_at) if last_at > first_at else 0.0

    def absorb(self, mine: Heartbeat, records: list[Heartbeat]) -> None:
        others = [record for record in records if record.name != mine.name]
        self._check_name(mine, records)
        for shown, server in shared_servers(self.cluster).items():
            server.remote_in_flight = sum(record.in_flight.get(shown, 0) for record in others)
            server.fleet_cap = fleet_cap(server, shown, mine, others)
        self.cluster.fleet = self.status(mine, others)

    def status(self, mine: Heartbeat, others: Sequence[Heartbeat]) -> FleetStatus:
        now = time.time()
        replicas = sorted([_replica(mine, now, me=True), *(_replica(record, now) for record in others)], key=lambda replica: replica.name)
        return FleetStatus(self.identity.name, self.link.shown, True, since=self.link.since, replicas=tuple(replicas))

    def fail_static(self, problem: str) -> None:
        """Redis is away: this replica's own counts only, and it says so."""
        for server in shared_servers(self.cluster).values():
            server.remote_in_flight = server.remote_at_scrape = 0
            server.fleet_cap = None
        mine = _replica(self.record(), time.time(), me=True)
        self.cluster.fleet = FleetStatus(self.identity.name, self.link.shown, False, problem, self.link.since, (mine,))

    def _check_name(self, mine: Heartbeat, records: list[Heartbeat]) -> None:
        if not self._name_taken_said and any(record.name == mine.name and record.id != mine.id for record in records):
            self._name_taken_said = True
            log.warning("fleet: another replica also calls itself %r; give each one its own [cluster] name", mine.name)


def shared_servers(cluster: Cluster) -> dict[str, Server]:
    """The servers every replica routes to (not local instances), by URL without credentials."""
    return {server.display_url: server for server in cluster if server.lifecycle is None}


def fleet_cap(server: Server, shown: str, mine: Heartbeat, others: Sequence[Heartbeat]) -> int | None:
    """The most requests this replica may have at the server until the next beat: what it
    had, plus its share of the slots the fleet's records show free. None: no limit to share
    (alone, or a server without a slot limit)."""
    limit = server.slot_limit
    if limit is None or not others:
        return None
    everyone = sorted([mine, *others], key=lambda record: record.name)
    outside = max(0.0, server.external - server.remote_at_scrape)  # other clients', by /metrics
    free = int(limit - outside) - sum(record.in_flight.get(shown, 0) for record in everyone)
    return mine.in_flight.get(shown, 0) + share(free, everyone, mine.name, shown)


def share(free: int, everyone: Sequence[Heartbeat], me: str, shown: str) -> int:
    """An equal part of `free` for each replica, what is left over for those that send
    there now (else for all), in name order: the parts add up to `free` exactly."""
    if free <= 0:
        return 0
    base, rest = divmod(free, len(everyone))
    takers = [record.name for record in everyone if record.demands(shown)] or [record.name for record in everyone]
    if me not in takers:
        return base
    index = takers.index(me)
    return base + rest // len(takers) + (1 if index < rest % len(takers) else 0)


def _replica(record: Heartbeat, now: float, *, me: bool = False) -> ReplicaStatus:
    return ReplicaStatus(
        name=record.name,
        address=record.address,
        requests_per_s=record.requests_per_s,
        in_flight=record.total,
        queued=record.queued,
        heartbeat_age_s=max(0.0, now - record.at),
        me=me,
        pid=record.pid,
        servers=dict(record.in_flight),
    )
