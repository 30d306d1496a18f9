"""The OpenAI-compatible front door: choose a server, forward, relay, retry, cancel.

Streams are relayed chunk by chunk as they arrive. A connection error, timeout or 5xx
before the first byte is retried on another server; a 4xx is the client's and passes
through. Once bytes reached the client there is no retry: an SSE error event ends the
stream. A client that disconnects cancels the handler (handler_cancellation), which
closes the upstream connection so vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from mvtui.cluster.state import Cluster, Health, RequestRecord, Server
from mvtui.config.schema import Config
from mvtui.errors import CONNECTION_ERRORS, describe_error
from mvtui.openai_errors import error_response, sse_error_event
from mvtui.router.metrics import RouterMetrics
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
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
    }
)
RETRY_BACKOFF_S = 0.05
RETRY_AFTER_S = "2"
NEWCOMER_WAIT_S = 3.0
CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer

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

    def response(self) -> web.Response:
        return error_response(self.status, self.message, code=self.code, headers=self.headers)


def forward_headers(headers: Mapping[str, str], server_key: str | None, strip_auth: bool) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or (lower == "authorization" and (server_key or strip_auth)):
            continue
        out.add(name, value)
    if server_key:
        out["Authorization"] = f"Bearer {server_key}"
    out["Accept-Encoding"] = "identity"
    return out


@functools.lru_cache(maxsize=8)
def upstream_timeout(request_timeout: float) -> aiohttp.ClientTimeout:
    """Timeouts are immutable: one object per configured value instead of one per request."""
    return aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, request_timeout), sock_read=request_timeout)


def response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in HOP_BY_HOP)


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("x-api-key")


@dataclass
class _Outcome:
    status: int
    ttft: float | None = None
    tokens: int | None = None


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
        keys = self.config().router.api_keys
        return not keys or bearer_token(request) in keys

    async def list_models(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return error_response(401, "Invalid or missing API key", code="invalid_api_key")
        cards: dict[str, dict] = {}
        for server in self.cluster:
            # a managed instance's model is served even while it is stopped: it starts on demand
            if server.removed or not (server.is_up or server.lifecycle is not None):
                continue
            for card in server.model_cards or [{"id": name, "object": "model", "owned_by": "vllm"} for name in server.models]:
                cards.setdefault(card["id"], card)
        return web.json_response({"object": "list", "data": list(cards.values())})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return error_response(401, "Invalid or missing API key", code="invalid_api_key")
        if self.closing:
            headers = {"Retry-After": RETRY_AFTER_S, "Connection": "close"}
            return error_response(503, "mvtui is shutting down", headers=headers)
        try:
            body, model = self._read_model(await request.read())
            return await self._dispatch(request, body, model)
        except ProxyError as error:
            return error.response()

    def _read_model(self, body: bytes) -> tuple[bytes, str]:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise ProxyError(400, f"The request body is not valid JSON: {error}") from None
        if not isinstance(payload, dict):
            raise ProxyError(400, "The request body must be a JSON object")
        model = payload.get("model")
        if model is None:
            models = self.cluster.models()
            if len(models) != 1:
                raise ProxyError(400, f"`model` is required; available models: {', '.join(models) or 'none'}")
            model = payload["model"] = models[0]
            body = json.dumps(payload).encode()
        if not isinstance(model, str):
            raise ProxyError(400, "`model` must be a string")
        return body, model

    async def _choose(self, model: str, tried: set[str]) -> Server:
        waited_for_newcomers = False
        while True:
            candidates = self.cluster.routable(model)
            if candidates:
                fresh = [server for server in candidates if server.url not in tried]
                return self.chooser.choose(fresh or candidates)  # type: ignore[return-value]
            if not self.cluster.serving(model):
                if not waited_for_newcomers and await self._await_newcomers():
                    waited_for_newcomers = True
                    continue
                silent = [server.name for server in self.cluster if not server.removed and not server.models]
                if silent:
                    raise ProxyError(
                        503,
                        f"No server that answered serves `{model}`; models not reported yet by {', '.join(silent)}",
                        headers={"Retry-After": RETRY_AFTER_S},
                    )
                models = self.cluster.models()
                raise ProxyError(404, f"The model `{model}` does not exist. Available models: {', '.join(models) or 'none'}", code="model_not_found")
            if self.make_available is None or not await self.make_available(model):
                raise ProxyError(503, f"No server can take a request for `{model}` now", headers={"Retry-After": RETRY_AFTER_S})

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

    async def _dispatch(self, request: web.Request, body: bytes, model: str) -> web.StreamResponse:
        config = self.config()
        tried: set[str] = set()
        started = time.perf_counter()
        for attempt in range(config.timing.max_retries + 1):
            server = await self._choose(model, tried)
            tried.add(server.url)
            server.request_started()
            try:
                result = await self._attempt(request, server, body, config, started, last=attempt == config.timing.max_retries)
            except ProxyError as error:
                self._record(request, model, server, _Outcome(error.status), started, attempt)
                raise
            except asyncio.CancelledError:
                self._record(request, model, server, _Outcome(CLIENT_CLOSED), started, attempt)
                raise
            finally:
                server.request_finished()
            if result is not None:
                response, outcome = result
                self._record(request, model, server, outcome, started, attempt)
                return response
            server.stats.retries += 1
            self.metrics.retries.labels(server.name).inc()
            await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
        raise AssertionError("unreachable: the last attempt always answers")

    async def _attempt(
        self, request: web.Request, server: Server, body: bytes, config: Config, started: float, *, last: bool
    ) -> tuple[web.StreamResponse, _Outcome] | None:
        """One try on one server; None means: retry elsewhere."""
        timeout = upstream_timeout(config.timing.request_timeout)
        headers = forward_headers(request.headers, server.config.api_key, strip_auth=bool(config.router.api_keys))
        try:
            upstream = await self.session.request(
                request.method, server.url + request.path_qs, data=body, headers=headers, timeout=timeout
            )
        except CONNECTION_ERRORS as error:
            self._upstream_failed(server, error)
            if last:
                raise ProxyError(502, f"Upstream {server.name} failed: {describe_error(error)}") from None
            return None
        try:
            if upstream.status >= 500:
                server.stats.errors += 1
                server.last_error = f"answered {upstream.status}"
                if not last:
                    return None
            return await self._relay(request, upstream, server, started)
        finally:
            upstream.close()

    def _upstream_failed(self, server: Server, error: BaseException) -> None:
        server.stats.errors += 1
        message = describe_error(error)
        server.last_error = message
        refused = isinstance(error, aiohttp.ClientConnectorError)
        if server.health.failure(message, at_once=refused):
            self.cluster.emit("down", server, f"down: {message}")

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, server: Server, started: float
    ) -> tuple[web.StreamResponse, _Outcome]:
        if upstream.content_type != "text/event-stream":
            payload = await upstream.read()
            answer = web.Response(status=upstream.status, body=payload, headers=response_headers(upstream.headers))
            return answer, _Outcome(upstream.status, tokens=_completion_tokens(payload))
        response = web.StreamResponse(status=upstream.status, headers=response_headers(upstream.headers))
        outcome = _Outcome(upstream.status, tokens=0)
        content = upstream.content
        if not await _send(response, request=request):
            return response, _Outcome(CLIENT_CLOSED)
        try:
            async for chunk in content.iter_any():
                if outcome.ttft is None:
                    outcome.ttft = time.perf_counter() - started
                outcome.tokens += chunk.count(b"data: {")  # type: ignore[operator]
                last = content.at_eof()  # then the last bytes and the end marker go in one send
                if not await _send(response, chunk, end=last):
                    outcome.status = CLIENT_CLOSED  # returning closes the upstream: vLLM aborts
                    return response, outcome
                if last:
                    return response, outcome
        except (aiohttp.ClientPayloadError, *CONNECTION_ERRORS) as error:
            self._upstream_failed(server, error)
            outcome.status = 502
            await _send(response, sse_error_event(502, f"Upstream {server.name} failed mid-stream: {describe_error(error)}"))
        await _send(response, end=True)
        return response, outcome

    def _record(self, request: web.Request, model: str, server: Server, outcome: _Outcome, started: float, retries: int) -> None:
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


async def _send(response: web.StreamResponse, data: bytes = b"", *, end: bool = False, request: web.Request | None = None) -> bool:
    """Headers (with `request`) or body bytes to the client; False when it has gone.

    Only writes to the client are guarded here, so that a client that left is never
    mistaken for a failing upstream.
    """
    try:
        if request is not None:
            await response.prepare(request)
        elif end:
            await response.write_eof(data)
        else:
            await response.write(data)
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError included
        return False
    return True


def _completion_tokens(payload: bytes) -> int | None:
    marker = payload.rfind(b'"completion_tokens"')
    if marker < 0:
        return None
    digits = payload[marker + 19 :].lstrip(b": ")
    end = 0
    while end < len(digits) and digits[end : end + 1].isdigit():
        end += 1
    return int(digits[:end]) if end else None
