"""Admission: which server a request goes to, and when.

A request goes at once to a server with room (`Server.has_room`: its requests in flight from
the router, plus those other clients have there by its /metrics, under its slot limit). When
every server for its model is full it waits in the model's queue, first come first served,
and the server is chosen when a slot frees (late binding): a request that finishes hands its
slot to the head of the queue of a model its server serves, and a timer looks again every
TICK_S while anything waits (for servers that come up, wake, are undrained or get a bigger
capacity, and breakers whose cool-down ends).

With a policy that may wait (`fastest`), a request may also wait while a server has room: when
a busy fast server would still end it sooner than an idle slow one. The policy decides that
again at every look, with what the request has waited so far, so it never waits longer than
waiting can pay. A conversation's turns go to its own server first (routing/affinity.py).

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
from mvtui.routing import affinity
from mvtui.routing.affinity import Conversation
from mvtui.routing.policies import Chooser, Route, answer_times

TICK_S = 0.05
# How many of a model's mean answer lengths a request's max_tokens is believed, at most.
LENGTH_BOUND_MEANS = 2.0
# How much slower than the fastest a conversation's own server may be and still get it.
SLOWER_HOME_BOUND = 2.0

# Makes a server for the model available (wakes or starts one): True when one is routable.
MakeAvailable = Callable[[str], Awaitable[bool]]
# Why no server can take a request for the model, when there was nothing to wake or start.
Explain = Callable[[str], Unavailable]


class QueueFull(Exception):
    """`queue_size` requests wait for the model already."""


class QueueTimeout(Exception):
    """The request waited as long as it may."""


@dataclass(frozen=True)
class Ask:
    """What the router knows of a request when it places it."""

    model: str
    tokens: int | None = None  # its max_tokens: the longest its answer can be
    conversation: Conversation | None = None  # routing/affinity.py


@dataclass(eq=False)
class Waiter:
    ask: Ask
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

    def take(
        self, ask: Ask, servers: Sequence[Server], tried: set[str], *, retry: bool, roomy_only: bool, ahead: int = 0, waited: float = 0.0
    ) -> Server | None:
        """Choose among `servers` and take a slot there; None when the request is to wait
        (with the queue on: no server has room, or the policy waits for a busy one). Servers
        not yet tried by this request come first."""
        if tried:
            servers = [server for server in servers if server.url not in tried] or servers
        route = self._route(ask, ahead, waited)
        server = None if retry else self._home(ask, servers, route)
        if server is None:
            server = self._choose(servers, route, retry=retry, roomy_only=roomy_only)
        if server is None or (roomy_only and not server.has_room):
            return None
        server.request_started()
        self.breakers.dispatched(server)
        return server

    def _choose(self, servers: Sequence[Server], route: Route, *, retry: bool, roomy_only: bool) -> Server | None:
        """The policy's choice (with the queue on: among servers with room, unless the policy
        may wait for a busy one); None when none has room."""
        if roomy_only:
            roomy = [server for server in servers if server.has_room]
            if not roomy:
                return None
            if not self.chooser.may_wait:
                servers = roomy
        return self.chooser.choose(servers, route, advance=not retry)

    def _route(self, ask: Ask, ahead: int, waited: float) -> Route:
        length = self.cluster.answer_length(ask.model).mean
        route = Route(model=ask.model, tokens=ask.tokens, ahead=ahead, waited=waited)
        if length is not None:
            route.mean_tokens = length
            if ask.tokens is not None:  # a bound, often set high: past a few means it says little
                route.tokens = min(ask.tokens, LENGTH_BOUND_MEANS * length)
        return route

    def _home(self, ask: Ask, servers: Sequence[Server], route: Route) -> Server | None:
        """The conversation's own server, while it holds no more than `affinity_bound` times
        its share of the model's requests (or is at most half full) and is no more than
        SLOWER_HOME_BOUND times slower over the answer than the fastest. When it is full the
        request waits for it: its cached history saves more than a slot's wait costs."""
        router, conversation = self.config().router, ask.conversation
        if conversation is None or not router.affinity or len(servers) < 2:
            return None
        times = answer_times(servers, route)
        quickest = min(times)
        quick = {server.url for server, time in zip(servers, times, strict=True) if time <= SLOWER_HOME_BOUND * quickest}
        return affinity.home(servers, conversation.key, router.affinity_bound, lambda server: server.url in quick)

    def release(self, server: Server) -> None:
        """A try on `server` ended: its slot goes to whoever waits for a model it serves."""
        server.request_finished()
        if self.waiting:
            for model in server.models:
                if model in self.waiting:
                    self.pump(model)

    # --- waiting ------------------------------------------------------------------------

    async def wait(self, ask: Ask, excluded: set[str], tried: set[str], *, retry: bool, timeout: float) -> Server:
        """Queue for the model until a server is handed over (its slot already taken)."""
        model = ask.model
        queue = self.waiting.get(model)
        if queue is None:
            queue = self.waiting[model] = deque()
        stats = self.cluster.queues.setdefault(model, QueueStats())
        if len(queue) >= self.config().router.queue_size:
            stats.full += 1
            raise QueueFull()
        waiter = Waiter(ask, excluded, tried, retry, time.monotonic())
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
        model = waiter.ask.model
        queue = self.waiting.get(model)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._update(model)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result())
        elif not future.done():
            future.cancel()

    def pump(self, model: str) -> None:
        """Hand free slots to the model's waiters, first come first served (a waiter the
        policy keeps waiting for a busy server lets the next ones by)."""
        queue = self.waiting.get(model)
        while queue:
            while queue and queue[0].future.done():  # its client left; its own handler removes it too
                queue.popleft()
            routable = self.cluster.routable(model)
            if not queue or not routable:
                break
            servers = self.breakers.allowed(routable, set(), time.monotonic())
            if not any(server.has_room for server in servers):
                break
            handed = self._hand_over(queue, servers)
            if handed is None:
                break
            queue.remove(handed)
        self._update(model)

    def _hand_over(self, queue: deque[Waiter], servers: list[Server]) -> Waiter | None:
        """The first waiter that takes a slot of `servers` (none goes back to a server that
        failed it), looking no further than the slots there are: past them, a waiter would
        only wait behind the ones before it."""
        now, ahead = time.monotonic(), 0
        horizon = max(8, sum(server.slots for server in servers))
        for waiter in queue:
            if ahead > horizon:
                break
            if waiter.future.done():
                continue
            allowed = [server for server in servers if server.url not in waiter.excluded]
            if not any(server.has_room for server in allowed):
                continue
            server = self.take(
                waiter.ask, allowed, waiter.tried, retry=waiter.retry, roomy_only=True, ahead=ahead, waited=now - waiter.since
            )
            if server is not None:
                waiter.future.set_result(server)
                return waiter
            ahead += 1
        return None

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
