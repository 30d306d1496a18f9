"""Polls every server concurrently: /metrics often, /health and /v1/models less often.

One task per server, so a slow server never delays the others; every call has a timeout
shorter than its interval. Each task is supervised: an unexpected error is logged with the
server's name and shown (the server's `last_error` and `poll_crashes`, a "crash" event, and
`faults` in /health until a round succeeds again), and polling goes on after a pause that doubles with every crash in a row. A server that does not
answer is probed less and less often (doubling, up to a cap), so that thousands of dead
servers cost little. A /metrics that fails while /health answers is no health failure.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from mvtui.cluster.state import Cluster, Server
from mvtui.cluster.vllm import SLEEP_LEVEL_BY_STATE, VllmClient, parse_metrics
from mvtui.config.schema import TimingConfig, redact_url
from mvtui.errors import CONNECTION_ERRORS, VllmError, describe_error

log = logging.getLogger(__name__)

# Told of every failed poll: the server and the kind ("health", "models", "metrics", "crash").
PollErrorHook = Callable[[Server, str], None]

CRASH_PAUSE_FIRST_S = 0.5
CRASH_PAUSE_MAX_S = 30.0
# A server that does not answer is probed at least once per this many health-check intervals.
DOWN_PAUSE_CAP_INTERVALS = 3.0
PAUSE_JITTER = 0.1  # +-10 %: backed-off probes of many dead servers do not stay in step
MAX_DOUBLINGS = 30
# What a poll can meet from a backend; anything else is a bug, and the supervisor's.
POLL_ERRORS = (VllmError, aiohttp.ClientError, ValueError, *CONNECTION_ERRORS)
# /health answers meaning "no such endpoint": the server is checked by its model list instead.
NO_HEALTH_ENDPOINT = (404, 405, 501)
# Every vLLM /metrics page has it; a page without it is some other program's metrics.
VLLM_GAUGE = "vllm:num_requests_running"


class Scrape(enum.Enum):
    OK = "ok"
    BUSY = "busy"  # timed out: the health probe decides whether it is dead
    FAILED = "failed"  # answered, but no usable metrics
    UNREACHABLE = "unreachable"


@dataclass
class _Schedule:
    """One server's polling times and its failure streaks."""

    next_health: float = 0.0
    next_scrape: float = 0.0
    metrics_failures: int = 0
    crashes: int = 0


def backoff(first: float, streak: int, cap: float) -> float:
    """`first`, doubled for each failure in the streak after the first, at most `cap`."""
    return min(cap, first * 2.0 ** min(max(streak - 1, 0), MAX_DOUBLINGS))


class Poller:
    def __init__(
        self,
        cluster: Cluster,
        session: aiohttp.ClientSession,
        timing: Callable[[], TimingConfig],
        on_poll_error: PollErrorHook | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.session = session
        self.timing = timing
        self.on_poll_error = on_poll_error
        self.rng = rng or random.Random()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watched: dict[str, Server] = {}
        self._hook_failed = False

    async def run(self) -> None:
        """Keep one polling task per server; forget removed servers once they are idle."""
        try:
            while True:
                try:
                    self.reconcile()
                except Exception:
                    log.exception("matching the poll tasks to the servers failed; trying again")
                await asyncio.sleep(self.timing().metrics_interval)
        finally:
            await self.stop()

    def reconcile(self) -> None:
        for server in self.cluster:
            if server.removed and server.in_flight == 0:
                self.cluster.forget(server)
        current = {server.url: server for server in self.cluster}
        for url in list(self._tasks):
            if current.get(url) is not self._watched[url]:
                self._tasks.pop(url).cancel()
                del self._watched[url]
        for url, server in current.items():
            if url not in self._tasks:
                self._watched[url] = server
                self._tasks[url] = asyncio.create_task(self._watch(server), name=_part(server))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._watched.clear()

    def client(self, server: Server, timeout: float) -> VllmClient:
        return VllmClient(self.session, server.url, server.config.api_key, timeout)

    # --- the supervised loop ----------------------------------------------------------

    async def _watch(self, server: Server) -> None:
        schedule = _Schedule()
        try:
            while True:
                try:
                    pause = await self._cycle(server, schedule)
                except Exception as error:  # CancelledError is no Exception: stop() still works
                    schedule.crashes += 1
                    pause = self._crashed(server, error, schedule.crashes)
                else:
                    if schedule.crashes:
                        schedule.crashes = 0
                        self.cluster.part_fault(_part(server), None)  # "running again"
                await asyncio.sleep(pause)
        finally:
            self.cluster.faults.pop(_part(server), None)  # a server no longer polled has no fault

    async def _cycle(self, server: Server, schedule: _Schedule) -> float:
        """One round of polls; returns the pause before the next."""
        timing = self.timing()
        # A managed instance that is not running is watched by its manager instead.
        if server.lifecycle not in (None, "running"):
            return timing.metrics_interval
        now = asyncio.get_running_loop().time()
        if now >= schedule.next_health or not server.is_up:
            await self.check_health(server)
            schedule.next_health = now + timing.health_check_interval
        if server.is_up and now >= schedule.next_scrape:  # a sleeping vLLM still answers /metrics
            self._scraped(await self.scrape(server), schedule, now, timing)
        return self._pause(server, timing)

    def _scraped(self, outcome: Scrape, schedule: _Schedule, now: float, timing: TimingConfig) -> None:
        if outcome is Scrape.UNREACHABLE:
            schedule.next_health = 0.0  # the health probe decides, in the next round
        if outcome is Scrape.FAILED:
            schedule.metrics_failures += 1
            cap = max(timing.metrics_interval, timing.health_check_interval)
            schedule.next_scrape = now + backoff(timing.metrics_interval, schedule.metrics_failures, cap)
        else:
            schedule.metrics_failures = 0
            schedule.next_scrape = 0.0

    def _pause(self, server: Server, timing: TimingConfig) -> float:
        """The metrics interval; for a server that fails its probes, doubling up to a cap."""
        streak = server.health.failures
        if server.is_up or streak == 0:
            return timing.metrics_interval
        cap = max(timing.metrics_interval, timing.health_check_interval * DOWN_PAUSE_CAP_INTERVALS)
        pause = backoff(timing.metrics_interval, streak + 1, cap)
        return pause * self.rng.uniform(1 - PAUSE_JITTER, 1 + PAUSE_JITTER)

    def _crashed(self, server: Server, error: Exception, streak: int) -> float:
        pause = backoff(CRASH_PAUSE_FIRST_S, streak, CRASH_PAUSE_MAX_S)
        message = redact_url(f"polling failed: {type(error).__name__}: {error}")
        log.error("%s: %s; polling again in %.1f s", server.name, message, pause, exc_info=streak == 1)
        server.poll_crashes += 1
        self._count_error(server, "crash")
        server.last_error = message
        if server.health.failure(message):  # a server that cannot be polled is not known to be up
            self.cluster.emit("down", server, f"down: {message}")
        self.cluster.part_fault(_part(server), f"{message}; polling again in {pause:.1f} s")  # /health shows it
        return pause

    # --- the polls --------------------------------------------------------------------

    async def check_health(self, server: Server) -> None:
        """/health, then the model list and sleep state when it answers."""
        timing = self.timing()
        client = self.client(server, min(5.0, max(0.2, timing.health_check_interval * 0.9)))
        try:
            status = await client.health()
        except POLL_ERRORS as error:
            # A URL that cannot be requested at all (port 99999) will not get better.
            self._failed(server, "health", describe_error(error), at_once=_is_invalid_url(error))
            return
        # An OpenAI-compatible server without /health: its model list (with its key) says it is up.
        if status != 200 and status not in NO_HEALTH_ENDPOINT:
            self._failed(server, "health", f"/health answered {status}")
            return
        was_up = server.is_up
        try:
            cards = await client.models()
        except POLL_ERRORS as error:
            self._failed(server, "models", _models_problem(server, error))
            return
        server.model_cards = cards
        server.discovered_models = tuple(card["id"] for card in cards)
        await self._read_sleep_state(server, client)
        if server.health.success() and not was_up:
            self.cluster.emit("up", server, f"up, serving {', '.join(server.models) or 'no models'}")

    async def _read_sleep_state(self, server: Server, client: VllmClient) -> None:
        if server.sleep_capable is False or server.waking or server.sleep_pending:
            return
        epoch = server.sleep_epoch
        try:
            sleeping = await client.is_sleeping()
        except CONNECTION_ERRORS:
            return
        except POLL_ERRORS:  # 404, or an answer that is not {"is_sleeping": bool}
            server.sleep_capable = False
            return
        if epoch != server.sleep_epoch or server.waking or server.sleep_pending:
            return  # a sleep or wake happened while the answer travelled: it is stale
        server.sleep_capable = True
        if not sleeping:
            server.sleep_level = 0
        elif not server.sleep_level:
            server.sleep_level = 1  # slept by someone else; the level is not visible here

    async def scrape(self, server: Server) -> Scrape:
        """/metrics; its failure is never a health failure (/health decides that)."""
        timing = self.timing()
        client = self.client(server, max(0.2, timing.metrics_interval * 0.9))
        sent_before, in_flight_before = server.sent_total, server.in_flight
        epoch = server.sleep_epoch
        try:
            text = await client.metrics_text()
        except TimeoutError:
            self._count_error(server, "metrics")  # busy, not dead: the health probe decides
            return Scrape.BUSY
        except (aiohttp.ClientConnectionError, OSError):
            self._count_error(server, "metrics")
            return Scrape.UNREACHABLE
        except POLL_ERRORS as error:
            self._metrics_failed(server, describe_error(error))
            return Scrape.FAILED
        if VLLM_GAUGE not in text:  # a Prometheus page, but not vLLM's: no load to read there
            self._metrics_failed(server, "/metrics has no vLLM metrics")
            return Scrape.FAILED
        metrics = parse_metrics(text, asyncio.get_running_loop().time())
        server.scraped(metrics, sent_before, in_flight_before)
        fresh = epoch == server.sleep_epoch and not (server.waking or server.sleep_pending)
        if metrics.sleep_state in SLEEP_LEVEL_BY_STATE and fresh:
            server.sleep_level = SLEEP_LEVEL_BY_STATE[metrics.sleep_state]
        return Scrape.OK

    def _metrics_failed(self, server: Server, error: str) -> None:
        self._count_error(server, "metrics")
        if server.metrics_available is not False:
            log.warning("%s: no metrics (%s); routing by its requests in flight", server.name, error)
        server.metrics_failed()
        server.last_error = redact_url(f"metrics: {error}")

    def _failed(self, server: Server, kind: str, error: str, *, at_once: bool = False) -> None:
        self._count_error(server, kind)
        server.last_error = error = redact_url(error)
        if server.health.failure(error, at_once=at_once):
            self.cluster.emit("down", server, f"down: {error}")

    def _count_error(self, server: Server, kind: str) -> None:
        if self.on_poll_error is None:
            return
        try:
            self.on_poll_error(server, kind)
        except Exception:  # a broken hook must not stop polling; said once
            if not self._hook_failed:
                self._hook_failed = True
                log.exception("the poll error hook failed (for %s, %s)", server.name, kind)


def _models_problem(server: Server, error: BaseException) -> str:
    """Why the model list failed; a refused key says which setting to fix."""
    status = error.status if isinstance(error, VllmError) else None
    if status in (401, 403):
        fix = "its `api_key` is not accepted" if server.config.api_key else "set `api_key` for it"
        return f"{status} from the server: {fix}"
    return describe_error(error)


def _part(server: Server) -> str:
    """The poll task's name as /health's `faults` and the events show it."""
    return f"poll {server.name}"


def _is_invalid_url(error: BaseException) -> bool:
    return isinstance(error, ValueError)  # aiohttp.InvalidURL included
