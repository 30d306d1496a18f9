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
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from mvtui.cluster.state import Cluster, Health, RequestRecord, Server
from mvtui.config.schema import Config
from mvtui.errors import Unavailable
from mvtui.openai_errors import error_response
from mvtui.router.headers import authorized
from mvtui.router.metrics import RouterMetrics
from mvtui.router.relay import CLIENT_CLOSED, AttemptFailed, Failure, Outcome, Plan, attempt
from mvtui.router.request_body import MIB, BodyError, read_body
from mvtui.routing.policies import Chooser

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
RETRY_BACKOFF_S = 0.05
RETRY_AFTER_S = "2"
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
            for card in server.model_cards or [{"id": name, "object": "model", "owned_by": "vllm"} for name in server.models]:
                cards.setdefault(card["id"], card)
        return web.json_response({"object": "list", "data": list(cards.values())})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        config = self.config()
        model: str | None = None
        try:
            self._admit(request)
            body, model, stream = self._read_model(await self._read_body(request, config))
            return await self._dispatch(request, Plan(model, body, stream, config), started)
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

    def _read_model(self, body: bytes | bytearray) -> tuple[bytes, str, bool]:
        """The body to forward, its model and whether it asks for a stream."""
        payload = _json_object(body)
        model = payload.get("model")
        if model is None:
            models = self.cluster.models()
            if len(models) != 1:
                raise ProxyError(400, f"`model` is required; available models: {', '.join(models) or 'none'}")
            model = payload["model"] = models[0]
            body = _json_bytes(payload)
        if not isinstance(model, str):
            raise ProxyError(400, "`model` must be a string")
        return bytes(body), model, payload.get("stream") is True

    async def _choose(self, model: str, tried: set[str], excluded: set[str]) -> Server:
        waited_for_newcomers = False
        while True:
            candidates = [server for server in self.cluster.routable(model) if server.url not in excluded]
            if candidates:
                fresh = [server for server in candidates if server.url not in tried]
                return self.chooser.choose(fresh or candidates)  # type: ignore[return-value]
            if not self.cluster.serving(model):
                if not waited_for_newcomers and await self._await_newcomers():
                    waited_for_newcomers = True
                    continue
                silent = [server.name for server in self.cluster if not server.removed and not server.models]
                if silent:
                    by = "some servers" if self.config().router.scrub_upstream_errors else ", ".join(silent)
                    raise ProxyError(
                        503,
                        f"No server that answered serves `{model}`; models not reported yet by {by}",
                        headers={"Retry-After": RETRY_AFTER_S},
                    )
                models = self.cluster.models()
                raise ProxyError(404, f"The model `{model}` does not exist. Available models: {', '.join(models) or 'none'}", code="model_not_found")
            if self.make_available is None or not await self._made_available(model):
                raise ProxyError(503, f"No server can take a request for `{model}` now", headers={"Retry-After": RETRY_AFTER_S})

    async def _made_available(self, model: str) -> bool:
        """Wake or start a server for `model`; the domain's "unavailable" becomes a 503."""
        assert self.make_available is not None
        try:
            return await self.make_available(model)
        except Unavailable as error:
            raise ProxyError(503, str(error), headers={"Retry-After": str(error.retry_after_s)}) from None

    def _newcomers(self) -> list[Server]:
        return [server for server in self.cluster if server.health.state is Health.UNKNOWN and not server.removed and server.lifecycle is None]

    async def _await_newcomers(self) -> bool:
        """Servers added a moment ago have not said which models they serve: wait (bounded)
        for their first health answer before calling a model unknown. True if any were."""
        if not self._newcomers():
            return False
        deadline = time.monotonic() + NEWCOMER_WAIT_S
        while self._newcomers() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return True

    async def _dispatch(self, request: web.Request, plan: Plan, started: float) -> web.StreamResponse:
        tried: set[str] = set()
        excluded: set[str] = set()  # failed this request in a way that asking again would repeat
        retries = plan.config.timing.max_retries
        for number in range(retries + 1):
            server = await self._choose(plan.model, tried, excluded)
            tried.add(server.url)
            server.request_started()
            try:
                response, outcome = await self._attempt(request, server, plan, started, excluded, last=number == retries)
            except ProxyError as error:
                error.recorded = True
                self._record(request, plan.model, server, Outcome(error.status), started, number)
                raise
            except asyncio.CancelledError:
                self._record(request, plan.model, server, Outcome(CLIENT_CLOSED), started, number)
                raise
            finally:
                server.request_finished()
            if response is not None:
                self._record(request, plan.model, server, outcome, started, number)
                return response
            server.stats.retries += 1
            self.metrics.retries.labels(server.name).inc()
            await asyncio.sleep(RETRY_BACKOFF_S * (number + 1))
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
        return response, outcome

    def _may_retry(self, model: str, excluded: set[str]) -> bool:
        return any(server.url not in excluded for server in self.cluster.routable(model))

    def _count_failure(self, server: Server, failure: Failure) -> None:
        """A failed try, against its server: its error count, last error and metrics."""
        server.stats.errors += 1
        server.last_error = f"{failure.what}: {failure.detail}" if failure.detail else failure.what
        self.metrics.upstream_errors.labels(server.name, failure.kind).inc()
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
            RequestRecord(time.time(), request.method, request.path, model, server.name, status, latency, outcome.ttft, outcome.tokens, retries)
        )

    def _record_rejection(self, request: web.Request, model: str | None, status: int, started: float) -> None:
        """A request the router answered itself, with no server: counted as an error."""
        known = model is not None and bool(self.cluster.serving(model))
        label = model if known else "-"  # a name a client made up must not become a metric label
        self.metrics.requests.labels(ROUTER, label, str(status)).inc()
        self.cluster.rejected += 1
        shown = (model or "-")[:SHOWN_MODEL_CHARS]
        latency = time.perf_counter() - started
        self.cluster.record(RequestRecord(time.time(), request.method, request.path, shown, ROUTER, status, latency, None, None, 0))


def _json_object(body: bytes | bytearray) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProxyError(400, f"The request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ProxyError(400, "The request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(payload, dict):
        raise ProxyError(400, "The request body must be a JSON object")
    return payload


def _json_bytes(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload).encode()
    except (RecursionError, ValueError):
        raise ProxyError(400, "The request body is not valid JSON: it is nested too deeply") from None
