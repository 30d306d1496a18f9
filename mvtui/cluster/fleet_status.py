"""What views show of the fleet: the replicas of one mvtui sharing a Redis (mvtui/fleet/).

`Cluster.fleet` holds one `FleetStatus` while `[cluster] redis_url` is set (None alone). The
fleet package replaces it at every heartbeat; the dashboard, `/load-stats`, `/health`, the
admin API and `mvtui ps` only read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as its last heartbeat told it."""

    name: str
    address: str  # host:port of its router
    requests_per_s: float
    in_flight: int
    queued: int
    heartbeat_age_s: float  # since its last heartbeat (by this machine's clock)
    me: bool = False
    pid: int | None = None
    servers: dict[str, int] = field(default_factory=dict)  # server URL (no credentials) -> its requests in flight

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "requests_per_s": round(self.requests_per_s, 2),
            "in_flight": self.in_flight,
            "queued": self.queued,
            "heartbeat_age_s": round(self.heartbeat_age_s, 3),
            "me": self.me,
            "pid": self.pid,
            "servers": dict(self.servers),
        }


@dataclass(frozen=True)
class FleetStatus:
    """This replica's view of the fleet."""

    name: str  # this replica
    redis: str  # the Redis URL, without credentials
    connected: bool
    problem: str = ""  # why Redis cannot be used now; "" while connected
    since: float = 0.0  # wall-clock time of the last change of `connected`
    replicas: tuple[ReplicaStatus, ...] = ()  # every live one, this one included, by name

    @property
    def degraded(self) -> bool:
        """Redis is away: this replica routes on its last known overlay and its own counts."""
        return not self.connected

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "redis": self.redis,
            "connected": self.connected,
            "degraded": self.degraded,
            "problem": self.problem or None,
            "since": self.since,
            "replicas": [replica.as_json() for replica in self.replicas],
        }
