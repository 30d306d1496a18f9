"""The connection to Redis, and whether the fleet can use it now.

Every part of the fleet talks to Redis through one `redis.asyncio` client on mvtui's loop,
with short timeouts and one immediate retry (for a pooled connection that Redis closed): a
failed call marks the link lost at once
(`lost`), the parts fall back to what they last knew (fail-static), and `run` reconnects
with a backoff that doubles up to a cap. Nothing on a request's path ever waits for Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mvtui.config.schema import redact_url
from mvtui.errors import FleetUnavailable

log = logging.getLogger(__name__)

# What a call to Redis can meet when Redis is away, slow or refuses (read-only, no auth...).
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
SOCKET_TIMEOUT_S = 1.0
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0

OnChange = Callable[[bool, str], None]  # (connected, problem)


def honour_cancel() -> None:
    """Raise the cancellation a Redis call may have swallowed. On Python 3.11, asyncio.wait_for
    (which redis-py uses for its socket timeouts) drops a cancel that lands as the call
    completes; a loop that goes on after such a call would never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return redact_url(text)


class Link:
    def __init__(self, url: str, on_change: OnChange) -> None:
        self.url = url
        self.shown = redact_url(url)  # a password in the URL is never shown
        self.client: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),  # once, at once: a pooled connection the server closed
        )
        self.connected = False
        self.problem = "not connected yet"
        self.since = time.time()
        self.up = asyncio.Event()  # set while connected
        self._wanted = asyncio.Event()  # set while a reconnect is wanted
        self._wanted.set()
        self._on_change = on_change
        self._scripts: dict[str, AsyncScript] = {}

    def script(self, source: str) -> AsyncScript:
        """A Lua script, sent by its digest (EVALSHA) once Redis knows it."""
        if source not in self._scripts:
            self._scripts[source] = self.client.register_script(source)
        return self._scripts[source]

    def require(self) -> None:
        """FleetUnavailable while Redis cannot be used: a change for every replica is refused."""
        if not self.connected:
            raise FleetUnavailable(
                f"the fleet's Redis ({self.shown}) cannot be reached ({self.problem}): this change is refused "
                "so that the replicas never disagree, and nothing was changed; try again once it is back"
            )

    def lost(self, error: BaseException) -> None:
        """A call failed: routing goes on with what each part last knew; reconnect."""
        self.problem = describe(error)
        self._wanted.set()
        if not self.connected:
            return
        self.connected = False
        self.since = time.time()
        self.up.clear()
        log.warning(
            "fleet: Redis at %s is unreachable (%s); routing on the last known overlay and this replica's own counts",
            self.shown,
            self.problem,
        )
        self._on_change(False, self.problem)

    async def connect(self, on_up: Callable[[], Awaitable[None]]) -> bool:
        """One try: PING, then `on_up` (resync); True once the link may be used."""
        try:
            await self.client.connection_pool.disconnect()  # none of the old connections, after a restart of Redis
            await self.client.ping()
            await on_up()
        except REDIS_ERRORS as error:
            self.problem = describe(error)
            return False
        self._wanted.clear()
        self.connected = True
        self.problem = ""
        self.since = time.time()
        self.up.set()
        self._on_change(True, "")
        return True

    async def run(self, on_up: Callable[[], Awaitable[None]]) -> None:
        """Reconnect whenever the link is lost, with a backoff that doubles up to a cap."""
        while True:
            await self._wanted.wait()
            backoff = FIRST_BACKOFF_S
            while not await self.connect(on_up):
                honour_cancel()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            log.info("fleet: connected to Redis at %s", self.shown)

    async def close(self) -> None:
        await self.client.aclose()
