"""Where the operator's live changes are kept: in this mvtui only, or shared by every replica.

Alone (the default), a live change goes straight into the `LiveConfig`'s overlay. With
`[cluster] redis_url`, mvtui/fleet/ stores the overlay in Redis, so that a drain, a capacity
or a removal made on any replica is in force on all of them; while Redis cannot be reached,
such a change is refused (`FleetUnavailable`) and nothing changes anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mvtui.control.live_config import LiveConfig
from mvtui.control.overlay import Overlay

Mutation = Callable[[Overlay], None]


class SharedOverlay(Protocol):
    @property
    def shared(self) -> bool:
        """True when other replicas read this overlay too: a change saved to this replica's
        file then stays in the overlay, so that the others keep it."""
        ...

    def require(self) -> None:
        """FleetUnavailable when a change could not reach every replica now."""
        ...

    async def change(self, mutate: Mutation) -> None:
        """A live change, in force here at once and on every replica (FleetUnavailable: none)."""
        ...


class LocalOverlay:
    """mvtui alone: the overlay is this process's."""

    shared = False

    def __init__(self, live: LiveConfig) -> None:
        self.live = live

    def require(self) -> None:
        return None

    async def change(self, mutate: Mutation) -> None:
        self.live.change(mutate)
