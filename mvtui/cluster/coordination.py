"""Sleep and wake when several mvtui route to the same servers: what the `Controller` asks.

Alone, every operation is granted at once and nobody else routes (`LocalCoordinator`). With
`[cluster] redis_url`, mvtui/fleet/ gives leases in Redis: one replica at a time operates on
a server; it tells the others where it stands ("draining": route nothing there, "waking",
then "asleep" or "awake"), and checks its fencing token before every step, so that a replica
whose lease expired (it stalled, or lost Redis) never acts on a server another one took over.
"""

from __future__ import annotations

from typing import Literal, Protocol

from mvtui.cluster.state import Server

Operation = Literal["sleep", "wake"]
# Where an operation on a server stands, as every replica follows it: while "draining" or
# "waking" no replica routes there; "asleep" and "awake" are its ends.
Phase = Literal["draining", "waking", "asleep", "awake"]
PHASES: tuple[Phase, ...] = ("draining", "waking", "asleep", "awake")


class Lease(Protocol):
    """The right to operate on one server, until released (or lost)."""

    async def announce(self, phase: Phase, level: int) -> None:
        """Tell every replica where the operation stands. CommandError when the lease was
        lost (another replica took over); FleetUnavailable when Redis cannot be reached."""
        ...

    async def check(self) -> None:
        """The fencing check before a step: CommandError when the lease is no longer ours."""
        ...

    async def others_idle(self) -> bool:
        """Every other live replica has seen the drain and has nothing in flight there."""
        ...

    async def release(self) -> None:
        """Done (never raises: a lease that cannot be released expires)."""
        ...


class Coordinator(Protocol):
    async def acquire(self, server: Server, operation: Operation, level: int, *, required: bool) -> Lease | None:
        """A lease for the operation, or None while another replica holds one (then
        `wait_settled`). `required`: refuse with FleetUnavailable while Redis cannot be
        reached; otherwise go on alone (fail-static, for wake-on-demand)."""
        ...

    async def wait_settled(self, server: Server, timeout: float) -> int:
        """Until no replica operates on the server; then the sleep level the fleet records
        (0: awake). CommandError after `timeout` seconds."""
        ...


class LocalLease:
    """Alone: nobody else to tell, nothing to lose."""

    async def announce(self, phase: Phase, level: int) -> None:
        return None

    async def check(self) -> None:
        return None

    async def others_idle(self) -> bool:
        return True

    async def release(self) -> None:
        return None


class LocalCoordinator:
    """mvtui alone: every operation is granted at once (the Controller's lock orders them)."""

    async def acquire(self, server: Server, operation: Operation, level: int, *, required: bool) -> Lease | None:
        return LocalLease()

    async def wait_settled(self, server: Server, timeout: float) -> int:
        return server.sleep_level
