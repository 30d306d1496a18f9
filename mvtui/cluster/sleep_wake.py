"""Sleep and wake for every server, remote or local, and wake-on-demand for the router.

Rules from vLLM's hazards (shared/VLLM.md): stop admitting and let requests in flight
finish before `/sleep`; never forward to a sleeping or waking server; one sleep or wake at
a time per server (a per-server lock); one wake shared by every request that waits for it.
With several replicas (`coordination.py`), the same holds across them: a lease per server,
a drain on every replica, and one wake for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from mvtui.cluster.coordination import Coordinator, Lease, LocalCoordinator, Phase
from mvtui.cluster.state import Cluster, Server
from mvtui.cluster.vllm import SLEEP_LEVEL_BY_STATE, VllmClient, parse_metrics
from mvtui.config.schema import TimingConfig
from mvtui.errors import CONNECTION_ERRORS, CommandError, Unavailable, VllmError, describe_error

log = logging.getLogger(__name__)

SLEEP_LEVELS = (1, 2)
DRAIN_POLL_S = 0.02
CONFIRM_ATTEMPTS = 10
CONFIRM_PAUSE_S = 0.1
CONTROL_CALL_TIMEOUT_S = 10.0
RETRY_AFTER_WAKE_S = 5
NO_SLEEP_MODE = "has no sleep mode (start vLLM with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1)"

# Asked before waking a server: may free GPU memory (instances.py) or refuse with CommandError.
BeforeWake = Callable[[Server], Awaitable[None]]
# Asked when no server for a model can be woken: a task that makes one available (a start
# of a local instance), or None when there is nothing to start.
OnDemand = Callable[[str], "asyncio.Task[None] | None"]


class Controller:
    """Sleep, wake and wake-on-demand; the only code that sends /sleep and /wake_up."""

    def __init__(
        self,
        cluster: Cluster,
        session: aiohttp.ClientSession,
        timing: Callable[[], TimingConfig],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.session = session
        self.timing = timing
        self.clock = clock
        self.before_wake: BeforeWake | None = None
        self.on_demand: OnDemand | None = None
        self.coordinator: Coordinator = LocalCoordinator()  # mvtui/fleet/ gives a shared one
        self._locks: dict[str, asyncio.Lock] = {}
        self._wakes: dict[str, asyncio.Task[None]] = {}

    # --- locks ------------------------------------------------------------------------

    def lock(self, server: Server) -> asyncio.Lock:
        return self._locks.setdefault(server.url, asyncio.Lock())

    def busy(self, server: Server) -> bool:
        """A sleep or wake of this server is under way."""
        return self.lock(server).locked()

    def client(self, server: Server, timeout: float = CONTROL_CALL_TIMEOUT_S) -> VllmClient:
        return VllmClient(self.session, server.url, server.config.api_key, timeout)

    # --- sleep --------------------------------------------------------------------------

    async def sleep(self, key: str, level: int) -> Server:
        """Drain (bounded by drain_timeout), `/sleep?level=N`, confirm. Waits its turn."""
        server = self.cluster.require(key)
        _check_sleepable(server, level)
        await _uncancellable(self._sleep_when_free(server, level))
        return server

    async def sleep_if_idle(self, server: Server, level: int) -> bool:
        """Sleep only when nobody operates on the server and nothing is in flight (LRU, idle)."""
        if self.busy(server) or server.in_flight or server.asleep or server.sleep_pending:
            return False
        _check_sleepable(server, level)
        return await _uncancellable(self._sleep_when_free(server, level, only_if_idle=True))

    async def _sleep_when_free(self, server: Server, level: int, *, only_if_idle: bool = False) -> bool:
        async with self.lock(server):
            if only_if_idle and (server.in_flight or server.asleep):
                return False
            await self._sleep_locked(server, level)
        return True

    async def _sleep_locked(self, server: Server, level: int) -> None:
        _check_sleepable(server, level)
        if server.sleep_level == level:
            return
        if server.sleep_level:
            raise CommandError(f"{server.name} is asleep at level {server.sleep_level}; wake it before sleeping at level {level}")
        lease = await self.coordinator.acquire(server, "sleep", level, required=True)
        if lease is None:
            raise CommandError(f"another mvtui replica is putting {server.name} to sleep or waking it; try again when it is done")
        try:
            await self._sleep_leased(server, level, lease)
        finally:
            await lease.release()

    async def _sleep_leased(self, server: Server, level: int, lease: Lease) -> None:
        timing = self.timing()
        self._set(server, sleep_pending=True)
        self.cluster.emit("sleep", server, f"draining before sleep (level {level}), {server.in_flight} in flight")
        asleep = False
        try:
            await lease.announce("draining", level)  # every replica stops routing there
            if not await self._drained(server, timing.drain_timeout, lease):
                raise CommandError(f"{server.name} still has {_left(server)} in flight after {timing.drain_timeout:g} s; not sleeping")
            await lease.check()
            asleep = await self._post_sleep(server, level)
        finally:
            # No await between these writes: the router never sees a half-set state.
            if asleep:
                server.sleep_level = level
            self._set(server, sleep_pending=False)
            await _told(lease, "asleep" if asleep else "awake", level)
        self.cluster.emit("sleep", server, f"asleep at level {level}")

    async def _drained(self, server: Server, timeout: float, lease: Lease) -> bool:
        """Nothing in flight from this replica, nor from any other (which have all seen the drain)."""
        deadline = self.clock() + timeout
        while server.in_flight or not await lease.others_idle():
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    async def _post_sleep(self, server: Server, level: int) -> bool:
        """True once the server sleeps (or may: an unconfirmed sleep counts as asleep)."""
        client = self.client(server)
        try:
            await client.sleep(level, timeout=max(CONTROL_CALL_TIMEOUT_S, self.timing().drain_timeout))
        except VllmError as error:
            if error.status in (404, 405):
                server.sleep_capable = False
                raise CommandError(f"{server.name} {NO_SLEEP_MODE}") from None
            raise CommandError(f"{server.name} refused to sleep: {error}") from None
        except TimeoutError:
            # It may have gone to sleep after we stopped waiting: only a clear "awake" is trusted.
            if await self._observed_level(server, client) == 0:
                raise CommandError(f"{server.name} did not answer /sleep in time and is still awake") from None
            log.warning("%s: /sleep timed out; treating it as asleep", server.name)
            return True
        except CONNECTION_ERRORS as error:
            raise CommandError(f"cannot reach {server.name}: {describe_error(error)}") from None
        server.sleep_capable = True
        confirmed = await self._observed_level(server, client)
        if confirmed == 0:
            log.warning("%s answered /sleep but still reports awake; treating it as asleep", server.name)
        return True

    # --- wake ---------------------------------------------------------------------------

    async def wake(self, key: str) -> Server:
        """Wake a server (shares a wake already under way); CommandError says why it cannot
        be woken: not running, down, or not asleep."""
        server = self.cluster.require(key)
        if server.lifecycle not in (None, "running"):
            raise CommandError(f"{server.name} is {server.lifecycle}; start it instead")
        if not (server.asleep or server.sleep_pending or self.busy(server)):
            await self._check_sleeping(server)
        await asyncio.shield(self.wake_task(server))
        return server

    async def _check_sleeping(self, server: Server) -> None:
        """A server mvtui does not know asleep may have been put to sleep behind its back: ask it."""
        if not server.is_up:
            raise CommandError(f"{server.name} is {server.health.state.value}{_because(server)}; only a sleeping server can be woken")
        if not await self._observed_level(server, self.client(server)):
            raise CommandError(f"{server.name} is not asleep (it is {server.state}): nothing to wake")

    def wake_task(self, server: Server) -> asyncio.Task[None]:
        """The one wake of this server: started now, or the one every caller already waits on."""
        task = self._wakes.get(server.url)
        if task is None or task.done():
            task = asyncio.ensure_future(self._wake(server))
            task.set_name(f"wake {server.name}")
            task.add_done_callback(_retrieve)
            self._wakes[server.url] = task
        return task

    async def _wake(self, server: Server) -> None:
        async with self.lock(server):
            if server.lifecycle not in (None, "running"):
                raise CommandError(f"{server.name} is {server.lifecycle}")
            client = self.client(server)
            deadline = self.clock() + self.timing().wake_timeout
            if server.sleep_pending or server.waking:  # another replica's operation (ours hold this lock)
                level = await self.coordinator.wait_settled(server, self.timing().wake_timeout)
            else:
                level = server.sleep_level or await self._observed_level(server, client) or 0
            while level:
                lease = await self.coordinator.acquire(server, "wake", level, required=False)
                if lease is not None:
                    try:
                        return await self._wake_leased(server, client, level, lease)
                    finally:
                        await lease.release()
                # Another replica sleeps or wakes it: share its outcome, or wake it after that.
                level = await self.coordinator.wait_settled(server, max(0.0, deadline - self.clock()))
            self._woken_elsewhere(server)

    def _woken_elsewhere(self, server: Server) -> None:
        if server.sleep_level or server.waking or server.sleep_pending:
            server.sleep_level = 0
            server.last_used = self.clock()
            self._set(server, waking=False, sleep_pending=False)

    async def _wake_leased(self, server: Server, client: VllmClient, level: int, lease: Lease) -> None:
        if self.before_wake is not None:
            await self.before_wake(server)
        started = self.clock()
        self._set(server, waking=True)
        self.cluster.emit("wake", server, f"waking from level {level}")
        awake = False
        try:
            await lease.announce("waking", level)
            await self._wake_calls(server, client, level)
            awake = True
        finally:
            if awake:
                server.sleep_level = 0
                server.last_used = self.clock()
            self._set(server, waking=False)
            await _told(lease, "awake" if awake else "asleep", level)
        self.cluster.emit("wake", server, f"awake after {self.clock() - started:.1f} s")

    async def observed_level(self, server: Server) -> int | None:
        """The sleep level the server reports now (None: it tells neither way)."""
        return await self._observed_level(server, self.client(server))

    def follow(self, server: Server, phase: Phase, level: int) -> bool:
        """Mirror another replica's sleep or wake of the server, so that this one routes as
        it does: nothing while it drains or wakes. Left alone while this replica operates on
        the server itself, and for local instances. True when something changed."""
        if self.busy(server) or server.lifecycle is not None or server.removed:
            return False
        wanted = _FOLLOWED[phase]
        sleep_level = {"keep": server.sleep_level, "level": level, "awake": 0}[wanted[2]]
        if (server.sleep_pending, server.waking, server.sleep_level) == (wanted[0], wanted[1], sleep_level):
            return False
        server.sleep_level = sleep_level
        self._set(server, sleep_pending=wanted[0], waking=wanted[1])
        return True

    async def _wake_calls(self, server: Server, client: VllmClient, level: int) -> None:
        timeout = self.timing().wake_timeout
        try:
            await client.wake_up(timeout=timeout)
            if level == 2:  # level 2 dropped the weights: reload them, then the stale prefix cache
                await client.reload_weights(timeout=timeout)
                await client.reset_prefix_cache()
        except VllmError as error:
            raise CommandError(f"{server.name} failed to wake: {error}") from None
        except CONNECTION_ERRORS as error:
            raise CommandError(f"cannot reach {server.name} to wake it: {describe_error(error)}") from None
        if await self._observed_level(server, client, expect_awake=True):
            raise CommandError(f"{server.name} answered /wake_up but still reports sleeping")

    async def _observed_level(self, server: Server, client: VllmClient, *, expect_awake: bool = False) -> int | None:
        """The sleep level the server reports: /metrics' engine_sleep_state, else
        /is_sleeping (level unknown: 1). None when it tells neither."""
        level: int | None = None
        for _ in range(CONFIRM_ATTEMPTS if expect_awake else 1):
            level = await self._read_level(client)
            if not (expect_awake and level):
                return level
            await asyncio.sleep(CONFIRM_PAUSE_S)
        return level

    async def _read_level(self, client: VllmClient) -> int | None:
        try:
            state = parse_metrics(await client.metrics_text()).sleep_state
        except (VllmError, *CONNECTION_ERRORS):
            state = None
        if state in SLEEP_LEVEL_BY_STATE:
            return SLEEP_LEVEL_BY_STATE[state]
        try:
            return 1 if await client.is_sleeping() else 0
        except (VllmError, *CONNECTION_ERRORS, ValueError):
            return None

    def _set(self, server: Server, **flags: bool) -> None:
        for name, value in flags.items():
            setattr(server, name, value)
        # Poll answers that left before this change describe the old state: the poller drops them.
        server.sleep_epoch += 1

    # --- wake on demand ---------------------------------------------------------------

    async def make_available(self, model: str) -> bool:
        """The proxy's hook: wake (or start) a server for `model`, shared by every waiter,
        bounded by wake_timeout. True when one is routable; Unavailable otherwise."""
        if self.cluster.routable(model):
            return True
        candidates = [server for server in self.cluster.serving(model) if not server.drain]
        sleeper = _wake_candidate(candidates, self._wakes)
        if sleeper is not None:
            await self._wait(self.wake_task(sleeper), f"`{model}` is waking up on {sleeper.name}", f"could not wake {sleeper.name}")
        elif (start := self._start_for(model)) is not None:
            await self._wait(start, f"`{model}` is still starting", f"`{model}` could not start")
        elif not candidates and self.cluster.serving(model):
            raise Unavailable(f"Every server for `{model}` is drained", RETRY_AFTER_WAKE_S)
        else:
            return False
        if self.cluster.routable(model):
            return True
        raise Unavailable(f"No server can take a request for `{model}` now", RETRY_AFTER_WAKE_S)

    def _start_for(self, model: str) -> asyncio.Task[None] | None:
        if self.on_demand is None:
            return None
        try:
            return self.on_demand(model)
        except CommandError as error:
            raise Unavailable(str(error), RETRY_AFTER_WAKE_S) from None

    async def _wait(self, task: asyncio.Task[None], slow: str, failed: str) -> None:
        timeout = self.timing().wake_timeout
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise Unavailable(f"{slow}; not ready after {timeout:g} s, try again", RETRY_AFTER_WAKE_S) from None
        except CommandError as error:
            raise Unavailable(f"{failed}: {error}", RETRY_AFTER_WAKE_S) from None

    async def close(self) -> None:
        tasks = [task for task in self._wakes.values() if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# phase -> (sleep_pending, waking, sleep level: kept, the phase's, or 0)
_FOLLOWED: dict[Phase, tuple[bool, bool, str]] = {
    "draining": (True, False, "keep"),
    "waking": (False, True, "level"),
    "asleep": (False, False, "level"),
    "awake": (False, False, "awake"),
}


async def _told(lease: Lease, phase: Phase, level: int) -> None:
    """The end of an operation, told to the other replicas. When that fails (Redis away,
    the lease lost), they find out by themselves: the lease expires and another replica
    reads the server's state and finishes or undoes the operation."""
    try:
        await lease.announce(phase, level)
    except CommandError as error:
        log.warning("could not tell the other replicas that the operation ended (%s): %s", phase, error)


def _left(server: Server) -> str:
    if not server.in_flight:
        return "requests from other replicas"
    return f"{server.in_flight} request{'' if server.in_flight == 1 else 's'}"


def _check_sleepable(server: Server, level: int) -> None:
    if level not in SLEEP_LEVELS:
        raise CommandError(f"sleep level must be 1 or 2, got {level}")
    if server.lifecycle not in (None, "running"):
        raise CommandError(f"{server.name} is {server.lifecycle}; only a running server can sleep")
    if not server.is_up and not server.asleep:  # first: a down server cannot sleep, whatever its mode
        raise CommandError(f"{server.name} is {server.health.state.value}{_because(server)}; only a server that is up can sleep")
    if server.sleep_capable is False:
        raise CommandError(f"{server.name} {NO_SLEEP_MODE}")


def _because(server: Server) -> str:
    return f" ({server.last_error})" if server.last_error else ""


def _wake_candidate(servers: list[Server], wakes: dict[str, asyncio.Task[None]]) -> Server | None:
    """A wake under way first (so waiters share it), else the sleeper used most recently."""
    sleepers = [server for server in servers if server.lifecycle in (None, "running") and (server.asleep or server.sleep_pending)]
    for server in sleepers:
        task = wakes.get(server.url)
        if task is not None and not task.done():
            return server
    return max(sleepers, key=lambda server: (-server.sleep_level, server.last_used), default=None)


async def _uncancellable(coroutine: Awaitable[bool]) -> bool:
    """Run to the end even if the caller is cancelled: a sleep abandoned between /sleep and
    its confirmation would leave a sleeping server marked routable."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Every waiter sees the error; this only keeps asyncio from reporting it as unread."""
    if not task.cancelled():
        task.exception()
