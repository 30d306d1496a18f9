"""Where the fleet keeps things in Redis, and how each value is written.

Everything sits under one prefix (`mvtui:`) in the database of `[cluster] redis_url`:

| key | type | what |
| --- | --- | --- |
| `mvtui:epoch` | string | a random id made by the first replica: a different one means Redis lost its data |
| `mvtui:overlay` | hash | server URL (no credentials) -> its live changes, JSON (`drain`, `max_concurrent_requests`, `removed`) |
| `mvtui:power` | hash | server URL -> a sleep or wake under way or done, JSON (`phase`, `level`, `token`, `holder`) |
| `mvtui:version` | counter | bumped with every write to the two hashes (a read older than one's own write is dropped) |
| `mvtui:changes` | channel | a message after every write to the two hashes |
| `mvtui:lease:URL` | string, PX | `holder|token`: who operates on the server now |
| `mvtui:fence:URL` | counter | the fencing tokens of the server's leases |
| `mvtui:replicas` | set | names of the replicas (pruned when their heartbeat key expires) |
| `mvtui:replica:NAME` | string, PX | a replica's heartbeat, JSON |

The server URL stands for the server among the replicas, without the credentials a URL may
carry (they never reach Redis).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from mvtui.cluster.coordination import PHASES, Phase

PREFIX = "mvtui:"
EPOCH = PREFIX + "epoch"
OVERLAY = PREFIX + "overlay"
POWER = PREFIX + "power"
CHANNEL = PREFIX + "changes"
VERSION = PREFIX + "version"
REPLICAS = PREFIX + "replicas"
REPLICA_PREFIX = PREFIX + "replica:"
OVERLAY_FIELDS = {"drain": bool, "max_concurrent_requests": int, "removed": bool}


def lease_key(server: str) -> str:
    return f"{PREFIX}lease:{server}"


def fence_key(server: str) -> str:
    return f"{PREFIX}fence:{server}"


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads_object(text: str) -> dict[str, Any] | None:
    """A JSON object, or None for anything else (a value someone else wrote by hand)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def overlay_entry(text: str) -> dict[str, Any] | None:
    """One server's shared live changes; None when the value is not one."""
    raw = loads_object(text)
    if raw is None:
        return None
    entry = {name: value for name, value in raw.items() if _valid(name, value)}
    return entry if len(entry) == len(raw) else None


def _valid(name: str, value: Any) -> bool:
    kind = OVERLAY_FIELDS.get(name)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return kind is bool and isinstance(value, bool)


@dataclass(frozen=True)
class PowerEntry:
    """A sleep or wake of one server, as the replica doing it announced it."""

    phase: Phase
    level: int
    token: int
    holder: str

    @property
    def transitional(self) -> bool:
        return self.phase in ("draining", "waking")

    def dumps(self) -> str:
        return dumps({"phase": self.phase, "level": self.level, "token": self.token, "holder": self.holder})

    @classmethod
    def parse(cls, text: str) -> PowerEntry | None:
        raw = loads_object(text)
        if raw is None or raw.get("phase") not in PHASES:
            return None
        level, token, holder = raw.get("level"), raw.get("token"), raw.get("holder")
        if not (_count(level) and _count(token) and isinstance(holder, str)):
            return None
        return cls(raw["phase"], level, token, holder)


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Heartbeat:
    """What a replica says of itself every heartbeat."""

    name: str
    id: str  # one per process: two replicas given the same name are told apart
    address: str
    pid: int
    at: float  # its wall-clock time
    in_flight: dict[str, int] = field(default_factory=dict)  # server URL -> requests in flight (none: 0)
    queued: int = 0
    requests_per_s: float = 0.0
    acks: dict[str, int] = field(default_factory=dict)  # server URL -> the token of the drain it follows

    @property
    def total(self) -> int:
        return sum(self.in_flight.values())

    def demands(self, server: str) -> bool:
        """It sends to the server now, or has requests waiting for a slot."""
        return self.in_flight.get(server, 0) > 0 or self.queued > 0

    def dumps(self) -> str:
        return dumps(self.__dict__)

    @classmethod
    def parse(cls, text: str) -> Heartbeat | None:
        raw = loads_object(text)
        try:
            beat = cls(**raw) if raw is not None else None
        except TypeError:
            return None
        return beat if beat is not None and _sane(beat) else None


def _sane(beat: Heartbeat) -> bool:
    if not (isinstance(beat.in_flight, dict) and isinstance(beat.acks, dict)):
        return False
    counts = [*beat.in_flight.values(), *beat.acks.values(), beat.queued, beat.pid]
    numbers_ok = all(_count(value) for value in counts) and isinstance(beat.at, (int, float)) and math.isfinite(beat.at)
    return numbers_ok and all(isinstance(text, str) for text in (beat.name, beat.id, beat.address))


# --- scripts: each runs atomically in Redis ------------------------------------------------

# KEYS: lease, power hash, version. ARGV: lease value, server, entry JSON ("" deletes), channel.
# Writes a power entry only while the lease is the caller's: the fencing check and the write
# are one step, so a replica whose lease expired can never overwrite its successor's state.
# Returns the new version, 0 when the lease is not the caller's.
FENCED_WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[2], ARGV[2]) else redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
local version = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[4], 'power')
return version
"""

# KEYS: lease. ARGV: value, milliseconds. Renews the lease while it is the caller's.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: lease. ARGV: value. Releases the lease while it is the caller's.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

# KEYS: replica set. ARGV: replica key prefix, then optionally name, record, milliseconds.
# Writes the caller's heartbeat (when given), then returns every live replica's record and
# forgets the names whose heartbeat expired.
BEAT = """
if ARGV[2] then
  redis.call('SET', ARGV[1] .. ARGV[2], ARGV[3], 'PX', ARGV[4])
  redis.call('SADD', KEYS[1], ARGV[2])
end
local records = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('GET', ARGV[1] .. name)
  if record then table.insert(records, record) else redis.call('SREM', KEYS[1], name) end
end
return records
"""
