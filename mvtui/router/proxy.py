"""The OpenAI-compatible front door: choose a server, forward, relay, retry, cancel.

The router reads the client's body (bounded: request_body.py) to find `model`, then tries
servers (relay.py) until one answers. A try that failed before any byte reached the client
is retried on another server, at most `max_retries` times: a server that answered 5xx or a
redirect, took too long or cut its answer is not asked again for the same request (one that
could not be reached may be, when no other is left). A 4xx is the client's and passes through.
Once bytes reached the client there is no retry: an SSE error event ends a stream, a long
answer is cut short. A client that disconnects cancels the handler (handler_cancellation),
which closes the upstream connection so vLLM aborts the request.

Every request is counted, in the request log and `mvtui_requests_total`, including those the
router answers itself (401, 400, 404, 408, 413, 415, 503: server label "router").
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from mvtui.cluster.state import Cluster, Health, RequestRecord, Server
from mvtui.config.schema import Config
from mvtui.errors import Unavailable
from mvtui.openai_errors import error_response, sse_error_event
from mvtui.router.breakers import Breakers
from mvtui.router.headers import authorized
from mvtui.router.metrics import RouterMetrics
from mvtui.router.queue import Admission, Ask, QueueFull, QueueTimeout
from mvtui.router.relay import CLIENT_CLOSED, AttemptFailed, Deadline, Failure, Outcome, Plan, attempt
from mvtui.router.request_body import MIB, BodyError, json_object, read_body
from mvtui.routing.affinity import conversation_of
from mvtui.routing.policies import Chooser
from mvtui.routing.retry_budget import RetryBudget, backoff

GENERATION_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/tokenize",
    "/detokenize",
)
RETRY_AFTER_S = "2"
RETRY_AFTER_QUEUE_S = "1"  # after a 429 or 408 from the queue: the openai SDK retries by itself
NEWCOMER_WAIT_S = 3.0
ROUTER = "router"  # the server label of answers the router gives itself
SHOWN_MODEL_CHARS = 64  # of a model name the router did not know, in the request log

# Asked when a model has servers but none may take a request now (all asleep, not
# started): True when it made one available, so the proxy chooses again.
MakeAvailable = Callable[[str], Awaitable[bool]]


class ProxyError(Exception):
    """Answered to the client as an OpenAI error."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers
        self.recorded = False  # already in the request log, as a try on a server

    def response(self) -> web.Response:
        return error_response(self.status, self.message, code=self.code, headers=self.headers)


class Proxy:
    def __init__(
        self,
        cluster: Cluster,
        session: aiohttp.ClientSession,
        config: Callable[[], Config],
        chooser: Chooser,
        metrics: RouterMetrics,
        make_available: MakeAvailable | None = None,
    ) -> None:
        self.cluster = cluster
        self.session = session
        self.config = config
        self.chooser = chooser
        self.metrics = metrics
        self.make_available = make_available
        self.closing = False  # set at shutdown: keep-alive clients get 503 instead of new work
        self.breakers = Breakers(cluster, config)
        self.admission = Admission(cluster, chooser, config, metrics, self.breakers)
        self.budget = RetryBudget(config().router.retry_budget)
        self.rng = random.Random()

    def routes(self) -> list[web.RouteDef]:
        forward = [web.post(path, self.handle) for path in GENERATION_PATHS]
        return [web.get("/v1/models", self.list_models), *forward]

    def authorized(self, request: web.Request) -> bool:
        return authorized(request, self.config().router.api_keys)

    async def list_models(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            self._record_rejection(request, None, 401, time.perf_counter())
            return error_response(401, "Invalid or missing API key", code="invalid_api_key")
        cards: dict[str, dict[str, Any]] = {}
        for server in self.cluster:
            # a managed instance's model is served even while it is stopped: it starts on demand
            if server.removed or not (server.is_up or server.lifecycle is not None):
                continue
            for card in _cards(server):
                cards.setdefault(card["id"], card)
        return web.json_response({"object": "list", "data": list(cards.values())})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        config = self.config()
        model: str | None = None
        try:
            self._admit(request)
            body, model, stream, ask = self._read_model(await self._read_body(request, config), request)
            limit = config.limits.max_request_time
            deadline = Deadline(asyncio.get_running_loop().time() + limit, limit) if limit else None
            plan = Plan(model, body, stream, config, ask, deadline)
            if deadline is None:
                return await self._dispatch(request, plan, started)
            return await self._within_deadline(request, plan, started, deadline)
        except ProxyError as error:
            if not error.recorded:
                self._record_rejection(request, model, error.status, started)
            return error.response()

    def _admit(self, request: web.Request) -> None:
        if not self.authorized(request):
            raise ProxyError(401, "Invalid or missing API key", code="invalid_api_key")
        if self.closing:
            raise ProxyError(503, "mvtui is shutting down", headers={"Retry-After": RETRY_AFTER_S, "Connection": "close"})

    @staticmethod
    async def _read_body(request: web.Request, config: Config) -> bytearray:
        try:
            return await read_body(request, int(config.limits.max_body_mb * MIB), config.limits.body_timeout)
        except BodyError as error:
            raise ProxyError(error.status, error.message) from None

    def _read_model(self, body: bytes | bytearray, request: web.Request) -> tuple[bytes, str, bool, Ask]:
        """The body to forward, its model, whether it asks for a stream, and what routing
        needs to know of it."""
        try:
            payload = json_object(body)
        except BodyError as error:
            raise ProxyError(error.status, error.message) from None
        model = payload.get("model")
        if model is None:
            models = self.cluster.models()
            if len(models) != 1:
                raise ProxyError(400, f"`model` is required; available models: {', '.join(models) or 'none'}")
            model = payload["model"] = models[0]
            body = _json_bytes(payload)
        if not isinstance(model, str):
            raise ProxyError(400, "`model` must be a string")
        ask = Ask(model, _answer_limit(payload), conversation_of(payload, request.headers))
        return bytes(body), model, payload.get("stream") is True, ask

    # --- choosing a server --------------------------------------------------------------

    async def _acquire(self, plan: Plan, tried: set[str], excluded: set[str], *, retry: bool) -> Server:
        """A server for the request, its slot taken: at once, or after waiting in the queue."""
        model, waited_for_newcomers = plan.model, False
        while True:
            routable = self.cluster.routable(model)
            if routable:
                server = self._at_once(plan, routable, tried, excluded, retry=retry)
                return server or await self._slot(plan, routable, tried, excluded, retry=retry)
            if not waited_for_newcomers and await self._await_newcomers(model):
                waited_for_newcomers = True
                continue
            if not self.cluster.serving(model):
                raise self._unknown_model(model)
            if self.make_available is None:
                raise self._none_available(model)
            if plan.config.router.queue:  # a wake or a start: waited for in the model's queue
                self.admission.demand(model, self._make_available, self._unavailable)
                return await self._wait_in_queue(plan, tried, excluded, retry=retry)
            if not await self._made_available(model):
                raise self._none_available(model)

    def _at_once(self, plan: Plan, routable: list[Server], tried: set[str], excluded: set[str], *, retry: bool) -> Server | None:
        """The common case, without a coroutine: every breaker closed, nobody waiting ahead,
        a server with room (the queue off: any server)."""
        if self.breakers.tripped or excluded or plan.model in self.admission.waiting:
            return None
        return self.admission.take(plan.ask, routable, tried, retry=retry, roomy_only=plan.config.router.queue)

    async def _slot(self, plan: Plan, routable: list[Server], tried: set[str], excluded: set[str], *, retry: bool) -> Server:
        allowed = self.breakers.allowed(routable, excluded, time.monotonic())
        if not allowed:
            raise self._all_breakers_open(plan.model, routable, excluded)
        queue = plan.config.router.queue
        if not queue or plan.model not in self.admission.waiting:  # nobody waits ahead of it
            server = self.admission.take(plan.ask, allowed, tried, retry=retry, roomy_only=queue)
            if server is not None:
                return server
        return await self._wait_in_queue(plan, tried, excluded, retry=retry)

    async def _wait_in_queue(self, plan: Plan, tried: set[str], excluded: set[str], *, retry: bool) -> Server:
        router, deadline = plan.config.router, plan.deadline
        timeout = router.queue_timeout
        if deadline is not None:
            timeout = min(timeout, deadline.left())
        retry_after = {"Retry-After": RETRY_AFTER_QUEUE_S}
        try:
            return await self.admission.wait(plan.ask, excluded, tried, retry=retry, timeout=timeout)
        except QueueFull:
            message = f"Too many requests are waiting for `{plan.model}` ([router] queue_size = {router.queue_size}); retry later"
            raise ProxyError(429, message, code="rate_limit_exceeded", headers=retry_after) from None
        except QueueTimeout:
            if deadline is not None and deadline.left() <= 0:
                raise ProxyError(408, deadline.message(), headers=retry_after) from None
            message = f"No server for `{plan.model}` was free within [router] queue_timeout ({router.queue_timeout:g} s); retry later"
            raise ProxyError(408, message, headers=retry_after) from None
        except Unavailable as error:
            raise ProxyError(503, str(error), headers={"Retry-After": str(error.retry_after_s)}) from None

    async def _make_available(self, model: str) -> bool:
        assert self.make_available is not None
        return await self.make_available(model)

    async def _made_available(self, model: str) -> bool:
        """Wake or start a server for `model`; the domain's "unavailable" becomes a 503."""
        assert self.make_available is not None
        try:
            return await self.make_available(model)
        except Unavailable as error:
            raise ProxyError(503, str(error), headers={"Retry-After": str(error.retry_after_s)}) from None

    def _unknown_model(self, model: str) -> ProxyError:
        silent = [server for server in self.cluster if not server.removed and not server.models]
        if silent:
            by = "some servers" if self.config().router.scrub_upstream_errors else ", ".join(_named(server) for server in silent)
            return ProxyError(
                503, f"No server that answered serves `{model}`; models not reported yet by {by}", headers={"Retry-After": RETRY_AFTER_S}
            )
        models = self.cluster.models()
        return ProxyError(
            404, f"The model `{model}` does not exist. Available models: {', '.join(models) or 'none'}", code="model_not_found"
        )

    def _none_available(self, model: str) -> ProxyError:
        error = self._unavailable(model)
        return ProxyError(503, str(error), headers={"Retry-After": str(error.retry_after_s)})

    def _unavailable(self, model: str) -> Unavailable:
        """No server for `model` can take a request, and why (unless scrubbing)."""
        why = ""
        if not self.config().router.scrub_upstream_errors:
            down = [_named(server) for server in self.cluster.serving(model) if server.last_error and not server.is_up]
            why = f" ({'; '.join(down)})" if down else ""
        return Unavailable(f"No server can take a request for `{model}` now{why}", int(RETRY_AFTER_S))

    def _all_breakers_open(self, model: str, routable: list[Server], excluded: set[str]) -> ProxyError:
        blocked = [server for server in routable if server.url not in excluded]
        if not blocked:  # every server that may take it already failed this very request
            return ProxyError(
                502, f"Every server for `{model}` failed this request; see the request log", headers={"Retry-After": RETRY_AFTER_S}
            )
        wait = self.breakers.retry_after(blocked, time.monotonic())
        return ProxyError(
            503, f"Every server for `{model}` is failing (circuit breaker open); retry in {wait} s", headers={"Retry-After": str(wait)}
        )

    def _newcomers(self, model: str) -> list[Server]:
        """Servers added a moment ago, not yet checked, that serve `model` or have not said
        what they serve."""
        return [
            server
            for server in self.cluster
            if server.health.state is Health.UNKNOWN
            and not server.removed
            and server.lifecycle is None
            and (not server.models or server.serves(model))
        ]

    async def _await_newcomers(self, model: str) -> bool:
        """Servers added a moment ago have not answered their first health check: wait
        (bounded) for it before calling a model unknown or unavailable. True if any were."""
        if not self._newcomers(model):
            return False
        deadline = time.monotonic() + NEWCOMER_WAIT_S
        while self._newcomers(model) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return True

    # --- trying servers ------------------------------------------------------------------

    async def _within_deadline(self, request: web.Request, plan: Plan, started: float, deadline: Deadline) -> web.StreamResponse:
        """`_dispatch` bounded by `[limits] max_request_time`: 408 while queued, 504 while a
        server works on it; an answer under way is ended as a failure after bytes would be."""
        try:
            async with asyncio.timeout_at(deadline.at) as scope:
                deadline.scope = scope
                return await self._dispatch(request, plan, started)
        except TimeoutError:
            if not deadline.expired():
                raise
        response = deadline.response
        if response is None:
            error = ProxyError(504 if deadline.tried else 408, deadline.message())
            error.recorded = deadline.recorded
            raise error from None
        await _end_short(request, response, deadline.message())
        return response

    async def _dispatch(self, request: web.Request, plan: Plan, started: float) -> web.StreamResponse:
        tried: set[str] = set()
        excluded: set[str] = set()  # failed this request in a way that asking again would repeat
        retries = plan.config.timing.max_retries
        self.budget.request(time.monotonic())
        for number in range(retries + 1):
            server = await self._acquire(plan, tried, excluded, retry=number > 0)
            tried.add(server.url)
            if plan.deadline is not None:
                plan.deadline.tried = True
            sent = time.perf_counter()
            try:
                response, outcome = await self._attempt(request, server, plan, started, excluded, last=number == retries)
            except ProxyError as error:
                error.recorded = True
                self._record(request, plan.model, server, Outcome(error.status), started, number)
                raise
            except asyncio.CancelledError:  # the client left, or max_request_time ended it
                self.breakers.released(server)
                deadline = plan.deadline
                expired = deadline is not None and deadline.expired()
                self._record(request, plan.model, server, Outcome(504 if expired else CLIENT_CLOSED), started, number)
                if deadline is not None:
                    deadline.recorded = expired
                raise
            finally:
                self.admission.release(server)
            if response is not None:
                self._record(request, plan.model, server, outcome, started, number)
                self._learn(server, plan.model, outcome, sent)
                return response
            server.stats.retries += 1
            self.metrics.retries.labels(server.name).inc()
            self.budget.spend(time.monotonic())
            await asyncio.sleep(backoff(number, self.rng))
        raise AssertionError("unreachable: the last attempt always answers")

    async def _attempt(
        self, request: web.Request, server: Server, plan: Plan, started: float, excluded: set[str], *, last: bool
    ) -> tuple[web.StreamResponse | None, Outcome]:
        """One try on one server; no response means: try another."""

        def spare() -> bool:  # asked only when the server answered badly
            return not last and self._may_retry(plan.model, excluded | {server.url})

        try:
            response, outcome = await attempt(self.session, request, server, plan, started, spare=spare)
        except AttemptFailed as failed:
            self._count_failure(server, failed.failure)
            if failed.exclude:
                excluded.add(server.url)
            if failed.retry and not last and self._may_retry(plan.model, excluded):
                return None, Outcome(failed.status)
            raise ProxyError(failed.status, failed.message) from None
        if outcome.failure is not None:
            self._count_failure(server, outcome.failure)
        elif outcome.status == CLIENT_CLOSED:
            self.breakers.released(server)
        else:
            self.breakers.succeeded(server)
        return response, outcome

    def _may_retry(self, model: str, excluded: set[str]) -> bool:
        """Another server may take the request, and the retry budget allows one more."""
        now = time.monotonic()
        if not self.breakers.allowed(self.cluster.routable(model), excluded, now):
            return False
        self.budget.ratio = self.config().router.retry_budget
        if self.budget.allows(now):
            return True
        self.budget.deny()
        self.metrics.retries_denied.inc()
        return False

    def _count_failure(self, server: Server, failure: Failure) -> None:
        """A failed try, against its server: its error count, last error, metrics, breaker."""
        server.stats.errors += 1
        server.last_error = f"{failure.what}: {failure.detail}" if failure.detail else failure.what
        self.metrics.upstream_errors.labels(server.name, failure.kind).inc()
        self.breakers.failed(server)
        if failure.health and server.health.failure(server.last_error, at_once=failure.at_once):
            self.cluster.emit("down", server, f"down: {server.last_error}")

    def _record(self, request: web.Request, model: str, server: Server, outcome: Outcome, started: float, retries: int) -> None:
        latency = time.perf_counter() - started
        status = outcome.status  # its errors were counted where they happened
        self.metrics.requests.labels(server.name, model, str(status)).inc()
        self.metrics.latency.labels(model).observe(latency)
        if outcome.ttft is not None:
            server.stats.ttft.append(outcome.ttft)
            self.metrics.ttft.labels(model).observe(outcome.ttft)
        self.cluster.record(
            RequestRecord(
                time.time(), request.method, request.path, model, server.name, status, latency, outcome.ttft, outcome.tokens, retries
            )
        )

    def _learn(self, server: Server, model: str, outcome: Outcome, sent: float) -> None:
        """A whole answer: how fast the server was, and how long the model's answers are."""
        if outcome.status != 200 or outcome.failure is not None or not outcome.tokens:
            return
        speed = server.learned_speed(model)
        if speed is None:
            return
        ttft = outcome.first_at - sent if outcome.first_at is not None else None
        speed.observe_answer(time.perf_counter() - sent, outcome.tokens, ttft)
        self.cluster.answer_length(model).observe(outcome.tokens)

    def _record_rejection(self, request: web.Request, model: str | None, status: int, started: float) -> None:
        """A request the router answered itself, with no server: counted as an error."""
        known = model is not None and bool(self.cluster.serving(model))
        label = model if known else "-"  # a name a client made up must not become a metric label
        self.metrics.requests.labels(ROUTER, label, str(status)).inc()
        self.cluster.rejected += 1
        shown = (model or "-")[:SHOWN_MODEL_CHARS]
        latency = time.perf_counter() - started
        self.cluster.record(RequestRecord(time.time(), request.method, request.path, shown, ROUTER, status, latency, None, None, 0))


def _answer_limit(payload: dict[str, Any]) -> int | None:
    """The most tokens the answer may have, as the request says (chat, completions, responses)."""
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _named(server: Server) -> str:
    return f"{server.name} ({server.last_error})" if server.last_error else server.name


def _cards(server: Server) -> list[dict[str, Any]]:
    """The model cards a server is listed with: its configured `models` when it has them (its
    own card for each where it has one), else the cards it reported."""
    if server.config.models:
        own = {card["id"]: card for card in server.model_cards}
        return [own.get(name) or _card(name) for name in server.config.models]
    return server.model_cards or [_card(name) for name in server.models]


def _card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "vllm"}


async def _end_short(request: web.Request, response: web.StreamResponse, message: str) -> None:
    """An answer under way whose time ran out: a stream ends with an error event; any other
    answer is cut (the client sees an incomplete body, never a complete-looking one)."""
    try:
        if response.content_type == "text/event-stream":
            await response.write(sse_error_event(504, message))
            await response.write_eof()
        elif request.transport is not None:
            request.transport.close()
    except ConnectionResetError:
        pass


def _json_bytes(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload).encode()
    except (RecursionError, ValueError):
        raise ProxyError(400, "The request body is not valid JSON: it is nested too deeply") from None
