"""The operator's live changes, kept in Redis for every replica (`control.shared.SharedOverlay`).

A change is written first (one MULTI/EXEC: the changed servers' entries and a message on
the channel), then brought into force here; every other replica reads it on the message
(`sync.py`). While Redis cannot be reached the change is refused: nothing changes anywhere.
"""

from __future__ import annotations

from mvtui.config.schema import redact_url
from mvtui.control.live_config import LiveConfig
from mvtui.control.shared import Mutation
from mvtui.errors import FleetUnavailable
from mvtui.fleet import keys
from mvtui.fleet.leases import Wrote
from mvtui.fleet.link import REDIS_ERRORS, Link


class RedisOverlay:
    shared = True

    def __init__(self, link: Link, live: LiveConfig, wrote: Wrote) -> None:
        self.link = link
        self.live = live
        self.wrote = wrote

    def require(self) -> None:
        self.link.require()

    async def change(self, mutate: Mutation) -> None:
        self.link.require()
        before = self.live.overlay
        after = before.copy()
        mutate(after)
        writes = {redact_url(url): after.entry(url) for url in before.urls() | after.urls() if before.entry(url) != after.entry(url)}
        if writes:
            await self._write(writes)
        self.live.change(mutate)

    async def _write(self, writes: dict[str, dict[str, object]]) -> None:
        try:
            async with self.link.client.pipeline(transaction=True) as pipe:
                for server, entry in writes.items():
                    if entry:
                        pipe.hset(keys.OVERLAY, server, keys.dumps(entry))
                    else:
                        pipe.hdel(keys.OVERLAY, server)
                pipe.incr(keys.VERSION)
                pipe.publish(keys.CHANNEL, "overlay")
                answers = await pipe.execute()
        except REDIS_ERRORS as error:
            self.link.lost(error)
            raise FleetUnavailable(
                f"the fleet's Redis ({self.link.shown}) failed during the change ({self.link.problem}); it is not in force here"
            ) from None
        self.wrote(int(answers[-2]))
