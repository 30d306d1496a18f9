"""Admission: which server a request goes to, and when.

A request goes at once to a server with room (`Server.has_room`: its requests in flight from
the router, plus those other clients have there by its /metrics, under its slot limit). When
every server for its model is full it waits in the model's queue, first come first served,
and the server is chosen when a slot frees (late binding): a request that finishes hands its
slot to the head of the queue of a model its server serves, and a timer looks again every
TICK_S while anything waits (for servers that come up, wake, are undrained or get a bigger
capacity, and breakers whose cool-down ends).

The queue is bounded (`queue_size`: QueueFull) and so is the wait (`queue_timeout`:
QueueTimeout). A client that leaves while queued leaves the queue at once. A wake or a start
for a model whose servers all sleep waits in the same queue: one shared `demand` per model.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from mvtui.cluster.state import Cluster, QueueStats, Server
from mvtui.config.schema import Config
from mvtui.errors import Unavailable
from mvtui.router.breakers import Breakers
from mvtui.router.metrics import RouterMetrics
from mvtui.routing.policies import Chooser

TICK_S = 0.05

# Makes a server for the model available (wakes or starts one): True when one is routable.
MakeAvailable = Callable[[str], Awaitable[bool]]
# Why no server can take a request for the model, when there was nothing to wake or start.
Explain = Callable[[str], Unavailable]


class QueueFull(Exception):
    """`queue_size` requests wait for the model already."""


class QueueTimeout(Exception):
    """The request waited as long as it may."""


@dataclass(eq=False)
class Waiter:
    model: str
    excluded: set[str]  # servers that failed this request: never handed to it
    tried: set[str]
    retry: bool
    since: float
    future: asyncio.Future[Server] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    def __init__(
        self, cluster: Cluster, chooser: Chooser, config: Callable[[], Config], metrics: RouterMetrics, breakers: Breakers
    ) -> None:
        self.cluster = cluster
        self.chooser = chooser
        self.config = config
        self.metrics = metrics
        self.breakers = breakers
        self.waiting: dict[str, deque[Waiter]] = {}  # only models with someone waiting
        self.demands: dict[str, asyncio.Task[bool]] = {}
        self._tick: asyncio.TimerHandle | None = None

    # --- taking and giving back slots ---------------------------------------------------

    def take(self, servers: Sequence[Server], tried: set[str], *, retry: bool, roomy_only: bool) -> Server | None:
        """Choose among `servers` (those with room only, with the queue on) and take a slot
        there; None when none has room. Servers not yet tried by this request come first."""
        if roomy_only:
            servers = [server for server in servers if server.has_room]
            if not servers:
                return None
        if tried:
            servers = [server for server in servers if server.url not in tried] or servers
        server: Server | None = self.chooser.choose(servers, advance=not retry)
        if server is not None:
            server.request_started()
            self.breakers.dispatched(server)
        return server

    def release(self, server: Server) -> None:
        """A try on `server` ended: its slot goes to whoever waits for a model it serves."""
        server.request_finished()
        if self.waiting:
            for model in server.models:
                if model in self.waiting:
                    self.pump(model)

    # --- waiting ------------------------------------------------------------------------

    async def wait(self, model: str, excluded: set[str], tried: set[str], *, retry: bool, timeout: float) -> Server:
        """Queue for `model` until a server is handed over (its slot already taken)."""
        queue = self.waiting.get(model)
        if queue is None:
            queue = self.waiting[model] = deque()
        stats = self.cluster.queues.setdefault(model, QueueStats())
        if len(queue) >= self.config().router.queue_size:
            stats.full += 1
            raise QueueFull()
        waiter = Waiter(model, excluded, tried, retry, time.monotonic())
        # a retry has waited its turn already: it goes first
        queue.appendleft(waiter) if retry else queue.append(waiter)
        self.pump(model)
        self._schedule_tick()
        try:
            async with asyncio.timeout(timeout):
                server = await waiter.future
        except TimeoutError:
            self._abandon(waiter)
            stats.timed_out += 1
            raise QueueTimeout() from None
        except BaseException:  # the client left, a wake failed...
            self._abandon(waiter)
            raise
        self._waited(model, stats, time.monotonic() - waiter.since)
        return server

    def _waited(self, model: str, stats: QueueStats, seconds: float) -> None:
        stats.admitted += 1
        stats.wait_total += seconds
        stats.last_wait = seconds
        self.metrics.queue_wait.labels(model).observe(seconds)

    def _abandon(self, waiter: Waiter) -> None:
        """Out of the queue at once; a slot handed over meanwhile goes to the next."""
        queue = self.waiting.get(waiter.model)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._update(waiter.model)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result())
        elif not future.done():
            future.cancel()

    def pump(self, model: str) -> None:
        """Hand free slots to the model's waiters, first come first served."""
        queue = self.waiting.get(model)
        while queue:
            head = queue[0]
            if head.future.done():  # its client left; its own handler removes it too
                queue.popleft()
                continue
            routable = self.cluster.routable(model)
            if not routable:
                break
            servers = [server for server in self.breakers.allowed(routable, set(), time.monotonic()) if server.has_room]
            waiter = _first_that_may_use(queue, servers)
            if waiter is None:
                break
            queue.remove(waiter)
            allowed = [server for server in servers if server.url not in waiter.excluded]
            server = self.take(allowed, waiter.tried, retry=waiter.retry, roomy_only=False)
            assert server is not None
            waiter.future.set_result(server)
        self._update(model)

    def _update(self, model: str) -> None:
        queue = self.waiting.get(model)
        stats = self.cluster.queues.setdefault(model, QueueStats())
        stats.depth = len(queue) if queue else 0
        stats.oldest_since = queue[0].since if queue else None
        if not queue:
            self.waiting.pop(model, None)

    def _schedule_tick(self) -> None:
        if self._tick is None and self.waiting:
            self._tick = asyncio.get_running_loop().call_later(TICK_S, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        for model in list(self.waiting):
            self.pump(model)
        self._schedule_tick()

    # --- waking or starting a server for the queue ----------------------------------------

    def demand(self, model: str, make_available: MakeAvailable, explain: Explain) -> None:
        """One wake or start per model, shared by every request queued for it; when it fails,
        every request still waiting for the model gets its reason (`explain` when there was
        nothing to wake or start)."""
        task = self.demands.get(model)
        if task is not None and not task.done():
            return
        task = asyncio.ensure_future(make_available(model))
        task.set_name(f"make {model} available")
        task.add_done_callback(lambda done: self._demand_done(model, done, explain))
        self.demands[model] = task

    def _demand_done(self, model: str, task: asyncio.Task[bool], explain: Explain) -> None:
        if self.demands.get(model) is task:
            del self.demands[model]
        if task.cancelled():
            return
        error = task.exception()
        if error is None and task.result():
            self.pump(model)
            return
        if self.cluster.routable(model):
            return  # another server came meanwhile: the queue goes on
        self._fail_all(model, error if isinstance(error, Unavailable) else explain(model))

    def _fail_all(self, model: str, error: Unavailable) -> None:
        for waiter in self.waiting.pop(model, deque()):
            if not waiter.future.done():
                waiter.future.set_exception(error)
        self._update(model)

    async def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        tasks = [task for task in self.demands.values() if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _first_that_may_use(queue: deque[Waiter], servers: list[Server]) -> Waiter | None:
    """The first waiter that one of `servers` may take (a retry never goes back to a server
    that failed it); None when no server is free."""
    if not servers:
        return None
    for waiter in queue:
        if waiter.future.done():
            continue
        if not waiter.excluded or any(server.url not in waiter.excluded for server in servers):
            return waiter
    return None
