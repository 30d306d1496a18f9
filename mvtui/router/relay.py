"""One try of one request on one server: send it, wait for the answer, relay the answer.

Time (README "Limits and timeouts"):
- a stream: `request_timeout` bounds the wait for its headers (vLLM sends them at once) and
  every silence between its bytes;
- a non-streamed answer: vLLM sends nothing until the whole generation is done, so the wait
  for it is not timed by `request_timeout`: it lasts while the server passes its health
  checks, at most `generation_timeout`; within its body, `request_timeout` bounds each silence.

Memory: an answer of up to `answer_buffer_mb` is read whole, so that a failure before its end
can still be retried on another server; a longer one is relayed chunk by chunk from there,
like a stream, and a failure after that cuts the client's answer short.

Redirects are never followed: a backend has no business sending clients elsewhere, so a 3xx
counts as a failed try (502 when no other server is left).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from aiohttp import web

from mvtui.cluster.state import Health, Server
from mvtui.config.schema import Config
from mvtui.errors import CONNECTION_ERRORS, describe_error
from mvtui.openai_errors import sse_error_event
from mvtui.router.headers import forward_headers, response_headers
from mvtui.router.queue import Ask
from mvtui.router.request_body import MIB

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer
HEALTH_WATCH_S = 0.5  # how often a non-streamed wait looks at its server's health
TAIL_BYTES = 4096  # the end of a relayed answer kept to find its token count
UPSTREAM_FAILURES = (aiohttp.ClientPayloadError, *CONNECTION_ERRORS)


@dataclass
class Deadline:
    """`[limits] max_request_time` for one request: when it ends, and what it ended."""

    at: float  # loop time
    limit: float
    scope: asyncio.Timeout | None = None
    tried: bool = False  # a server was asked
    recorded: bool = False  # the try it ended is in the request log
    response: web.StreamResponse | None = None  # the answer under way, once bytes went out

    def left(self) -> float:
        return self.at - asyncio.get_running_loop().time()

    def expired(self) -> bool:
        return self.scope is not None and self.scope.expired()

    def message(self) -> str:
        return f"The request took longer than [limits] max_request_time ({self.limit:g} s)"


@dataclass(frozen=True)
class Plan:
    """One request as the router forwards it, and the config it is served under."""

    model: str
    body: bytes
    stream: bool
    config: Config
    ask: Ask  # what routing knows of it
    deadline: Deadline | None = None

    def message(self, server: Server, failure: Failure) -> str:
        """What the client is told; without server names or details when scrubbing."""
        if self.config.router.scrub_upstream_errors:
            return f"An upstream server {failure.what}" + (": timed out" if failure.kind == "timeout" else "")
        return f"Upstream {server.name} {failure.what}" + (f": {failure.detail}" if failure.detail else "")


@dataclass(frozen=True)
class Failure:
    """A server failing a request, as it is counted against that server."""

    kind: str  # connect, timeout, cut, status, redirect, down, generation_timeout
    what: str
    detail: str = ""
    health: bool = False  # counts as a failed health check
    at_once: bool = False  # enough on its own to call the server down (connection refused)

    @classmethod
    def of(cls, error: BaseException, what: str = "failed") -> Failure:
        timeout = isinstance(error, asyncio.TimeoutError)
        kind = "timeout" if timeout else "cut" if isinstance(error, aiohttp.ClientPayloadError) else "connect"
        return cls(kind, what, describe_error(error), health=True, at_once=isinstance(error, aiohttp.ClientConnectorError))


class AttemptFailed(Exception):
    """The server failed the request before any byte reached the client."""

    def __init__(self, status: int, failure: Failure, message: str, *, exclude: bool, retry: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.failure = failure
        self.message = message
        self.exclude = exclude  # not to be asked again for this request
        self.retry = retry  # another server may be asked


@dataclass
class Outcome:
    status: int
    ttft: float | None = None
    tokens: int | None = None
    failure: Failure | None = None  # the server failed after bytes reached the client
    first_at: float | None = None  # perf_counter() at its first byte of a stream


@functools.lru_cache(maxsize=16)
def upstream_timeout(request_timeout: float, stream: bool) -> aiohttp.ClientTimeout:
    """Timeouts are immutable: one object per configured value instead of one per request.
    A non-streamed answer is timed by `_while_healthy` and `_next_chunk` instead."""
    return aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, request_timeout), sock_read=request_timeout if stream else None)


async def attempt(
    session: aiohttp.ClientSession, request: web.Request, server: Server, plan: Plan, started: float, *, spare: Callable[[], bool]
) -> tuple[web.StreamResponse, Outcome]:
    """One try; AttemptFailed when the server failed before the client got a byte. When
    `spare()` (another server could take it) a 5xx answer is a failed try, else it is relayed."""
    upstream = await _send_upstream(session, request, server, plan)
    try:
        failure = _failed_status(upstream.status)
        if failure is not None:
            retry = spare()
            if retry or failure.kind == "redirect" or plan.config.router.scrub_upstream_errors:
                status = 502 if failure.kind == "redirect" else upstream.status
                raise AttemptFailed(status, failure, plan.message(server, failure), exclude=True, retry=retry)
        response, outcome = await _relay(request, upstream, server, plan, started)
        outcome.failure = outcome.failure or failure
        return response, outcome
    finally:
        upstream.close()


async def _send_upstream(session: aiohttp.ClientSession, request: web.Request, server: Server, plan: Plan) -> aiohttp.ClientResponse:
    timing, router = plan.config.timing, plan.config.router
    headers = forward_headers(request.headers, server.config.api_key, strip_auth=bool(router.api_keys) or server.url_has_credentials)
    answer = session.request(
        request.method,
        server.url + request.path_qs,
        data=plan.body,
        headers=headers,
        timeout=upstream_timeout(timing.request_timeout, plan.stream),
        allow_redirects=False,
    )
    try:
        if plan.stream:
            return await answer
        return await _while_healthy(answer, server, plan)
    except CONNECTION_ERRORS as error:
        failure = Failure.of(error)
        # a server that took the request and then said nothing is not asked again
        raise AttemptFailed(502, failure, plan.message(server, failure), exclude=failure.kind == "timeout") from None


async def _while_healthy(answer: Awaitable[T], server: Server, plan: Plan) -> T:
    """Wait for a non-streamed answer while `server` passes its health checks, at most
    `generation_timeout` seconds (0: no limit), both looked at every HEALTH_WATCH_S."""
    limit = plan.config.timing.generation_timeout
    scope = asyncio.timeout(None)
    watch = _HealthWatch(server, scope, limit)
    try:
        async with scope:
            watch.start()
            return await answer
    except TimeoutError:
        if not scope.expired():
            raise  # aiohttp's own (connecting)
        if watch.down:
            failure = Failure("down", "stopped passing its health checks while generating")
            raise AttemptFailed(502, failure, plan.message(server, failure), exclude=True) from None
        failure = Failure("generation_timeout", f"sent no answer within [config] generation_timeout ({limit:g} s)", "timed out")
        raise AttemptFailed(504, failure, plan.message(server, failure), exclude=True, retry=False) from None
    finally:
        watch.stop()


class _HealthWatch:
    """Ends a wait (through its timeout scope) when the server is found down or the time
    limit has passed: one timer per wait, however long it lasts."""

    def __init__(self, server: Server, scope: asyncio.Timeout, limit: float) -> None:
        self.server = server
        self.scope = scope
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + limit if limit else None
        self.down = False
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = self.loop.call_later(HEALTH_WATCH_S, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _check(self) -> None:
        if self.scope.expired():
            return
        self.down = self.server.health.state is Health.DOWN
        if self.down or (self.deadline is not None and self.loop.time() >= self.deadline):
            self.scope.reschedule(self.loop.time())
            return
        self.start()


def _failed_status(status: int) -> Failure | None:
    if 300 <= status < 400:
        return Failure("redirect", f"answered with a redirect ({status}), which the router does not follow")
    if status >= 500:
        return Failure("status", f"answered {status}")
    return None


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, server: Server, plan: Plan, started: float
) -> tuple[web.StreamResponse, Outcome]:
    if upstream.content_type == "text/event-stream":
        return await _relay_stream(request, upstream, server, plan, started)
    timeout = plan.config.timing.request_timeout
    try:
        head, complete = await _read_head(upstream.content, int(plan.config.limits.answer_buffer_mb * MIB), timeout)
    except UPSTREAM_FAILURES as error:
        failure = Failure.of(error, "failed mid-answer")
        raise AttemptFailed(502, failure, plan.message(server, failure), exclude=True) from None
    headers = response_headers(upstream.headers)
    if complete:
        answer = web.Response(status=upstream.status, body=bytes(head), headers=headers)
        return answer, Outcome(upstream.status, tokens=completion_tokens(head))
    response = web.StreamResponse(status=upstream.status, headers=headers)
    if plan.deadline is not None:
        plan.deadline.response = response
    return response, await _relay_rest(request, response, upstream, head, timeout)


async def _read_head(content: aiohttp.StreamReader, limit: int, timeout: float) -> tuple[bytearray, bool]:
    """Up to about `limit` bytes of an answer, and whether that was all of it."""
    head = bytearray()
    while len(head) <= limit:
        chunk = await _next_chunk(content, timeout)
        if not chunk:
            return head, True
        head += chunk
    return head, False


async def _next_chunk(content: aiohttp.StreamReader, timeout: float) -> bytes:
    """The next bytes of an answer (b"" at its end), waiting at most `timeout` for them."""
    chunk = content.read_nowait()  # what has arrived already needs no timer
    if chunk or content.at_eof():
        return chunk
    async with asyncio.timeout(timeout):
        return await content.readany()


async def _relay_rest(
    request: web.Request, response: web.StreamResponse, upstream: aiohttp.ClientResponse, head: bytearray, timeout: float
) -> Outcome:
    """A long answer: what was read, then the rest chunk by chunk as it comes."""
    outcome = Outcome(upstream.status)
    tail = bytes(head[-TAIL_BYTES:])
    if not await send(response, request=request) or not await send(response, bytes(head)):
        return Outcome(CLIENT_CLOSED)
    try:
        while chunk := await _next_chunk(upstream.content, timeout):
            tail = (tail + chunk)[-TAIL_BYTES:]
            if not await send(response, chunk):
                outcome.status = CLIENT_CLOSED  # returning closes the upstream
                return outcome
    except UPSTREAM_FAILURES as error:
        outcome.status, outcome.failure = 502, Failure.of(error, "failed mid-answer")
        if request.transport is not None:
            request.transport.close()  # the client sees an answer cut short, never a whole one
        return outcome
    outcome.tokens = completion_tokens(tail)
    await send(response, end=True)
    return outcome


async def _relay_stream(
    request: web.Request, upstream: aiohttp.ClientResponse, server: Server, plan: Plan, started: float
) -> tuple[web.StreamResponse, Outcome]:
    response = web.StreamResponse(status=upstream.status, headers=response_headers(upstream.headers))
    if plan.deadline is not None:
        plan.deadline.response = response
    outcome = Outcome(upstream.status, tokens=0)
    content = upstream.content
    if not await send(response, request=request):
        return response, Outcome(CLIENT_CLOSED)
    try:
        async for chunk in content.iter_any():
            if outcome.ttft is None:
                outcome.first_at = time.perf_counter()
                outcome.ttft = outcome.first_at - started
            outcome.tokens += chunk.count(b"data: {")  # type: ignore[operator]
            last = content.at_eof()  # then the last bytes and the end marker go in one send
            if not await send(response, chunk, end=last):
                outcome.status = CLIENT_CLOSED  # returning closes the upstream: vLLM aborts
                return response, outcome
            if last:
                return response, outcome
    except UPSTREAM_FAILURES as error:
        outcome.status, outcome.failure = 502, Failure.of(error, "failed mid-stream")
        await send(response, sse_error_event(502, plan.message(server, outcome.failure)))
    await send(response, end=True)
    return response, outcome


async def send(response: web.StreamResponse, data: bytes = b"", *, end: bool = False, request: web.Request | None = None) -> bool:
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


def completion_tokens(payload: bytes | bytearray) -> int | None:
    marker = payload.rfind(b'"completion_tokens"')
    if marker < 0:
        return None
    digits = payload[marker + 19 :].lstrip(b": ")
    end = 0
    while end < len(digits) and digits[end : end + 1].isdigit():
        end += 1
    return int(digits[:end]) if end else None
