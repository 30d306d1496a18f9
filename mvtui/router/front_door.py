"""The router's listening socket and what any client may hold of it (`[limits]`).

aiohttp serves the routes; around its per-connection protocol sits a gate that
- refuses connections over `max_connections` with a short 503 (never more than the open-file
  limit allows: the process keeps descriptors for its upstream connections, polls and logs),
- closes a connection whose request headers are not complete within `header_timeout`
  (slowloris), counted from the connection's opening or from the first byte of a request
  on a kept-alive one; an idle kept-alive connection goes after `keepalive_timeout`,
and a middleware that answers every error the router makes itself in OpenAI's shape, asks
for the key on the status endpoints that are not open, and logs misbehaving clients in one
line, never a traceback per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler

from mvtui.config.schema import STATUS_ENDPOINTS, Config, LimitsConfig
from mvtui.openai_errors import error_body, error_response
from mvtui.router.headers import authorized
from mvtui.router.request_body import MIB

log = logging.getLogger(__name__)
HTTP_LOG = logging.getLogger("mvtui.router.http")  # aiohttp's per-connection messages

# aiohttp's default (128) drops SYNs when hundreds of clients connect at once; each then waits
# a 1 s retransmit (benchmarks/router_bench.py, c=256). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
# Connections taken from that queue at each wake-up of the loop (asyncio's accept loop takes
# `backlog` of them): each holds a descriptor before the gate can refuse it.
ACCEPT_BURST = 16
FD_SOFT_TARGET = 65536  # the open-file limit is raised towards this (never above the hard one)
MAX_PENDING_REFUSALS = 32  # 503s still being delivered; beyond this, excess connections are dropped
# Descriptors kept for everything but client connections, their upstreams and the servers'
# polls: the loop, logs, listening sockets, connections accepted and not yet refused.
FD_RESERVE = 64 + 4 * ACCEPT_BURST + MAX_PENDING_REFUSALS
REFUSAL_LINGER_S = 1.0
SWEEP_S = 0.5  # how often connections are checked for late headers
NOTE_EVERY_S = 10.0


def _raw_answer(status: int, reason: str, message: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 answer with an OpenAI error body, for connections aiohttp does not own."""
    body = json.dumps(error_body(status, message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


REFUSAL = _raw_answer(503, "Service Unavailable", "The router has too many connections open; retry later", "Retry-After: 1\r\n")
HEADER_TIMEOUT = _raw_answer(408, "Request Timeout", "The request headers did not arrive within [limits] header_timeout")


def open_file_limit() -> int:
    """The soft open-file limit, raised towards FD_SOFT_TARGET first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_SOFT_TARGET if hard == resource.RLIM_INFINITY else min(hard, FD_SOFT_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, error)
    return FD_SOFT_TARGET if soft == resource.RLIM_INFINITY else soft


def connection_capacity(open_files: int, config: Config) -> int:
    """How many client connections fit in `open_files` descriptors: each may hold an upstream
    connection too, and every server is polled on connections of its own."""
    others = FD_RESERVE + 2 * len(config.servers) + 4 * len(config.instances)
    return max(1, (open_files - others) // 2)


class _Notes:
    """At most one log line per NOTE_EVERY_S for a repeated event, with the count since."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.count = 0
        self._last = -NOTE_EVERY_S

    def add(self, *args: object, error: BaseException | None = None) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= NOTE_EVERY_S:
            self._last = now
            log.warning(self.text + f" ({self.count} so far)", *args, exc_info=error)


class _OneLine(logging.Filter):
    """aiohttp's per-connection errors (bad requests, resets) as one rate-limited warning
    without a traceback: a hostile client must not be able to fill the log."""

    def __init__(self) -> None:
        super().__init__()
        self._last = -1.0
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        now = time.monotonic()
        if now - self._last < 1.0:
            self.dropped += 1
            return False
        self._last = now
        error = record.exc_info[1] if record.exc_info else None
        record.msg = record.getMessage() + (f": {error!r}" if error else "") + (f" ({self.dropped} more not shown)" if self.dropped else "")
        record.args, record.exc_info, record.exc_text = (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self.dropped = 0
        return True


HTTP_LOG.addFilter(_OneLine())


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one client connection, and since when it has been waiting for
    a request's headers (the gate's sweep closes it past `header_timeout`)."""

    def __init__(self, inner: RequestHandler, gate: ConnectionGate) -> None:
        self.inner = inner
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a request is being handled
        self.waiting_since: float | None = None  # for the headers of a request to complete
        self._partial = False  # some bytes of that request have come
        self._bytes_while_busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.waiting_since = self.gate.loop.time()  # a new connection owes a request
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.busy:
            self._bytes_while_busy = True
        else:
            self._partial = True
            if self.waiting_since is None:
                self.waiting_since = self.gate.loop.time()
        self.inner.data_received(data)

    def eof_received(self) -> None:
        self.inner.eof_received()  # nothing to keep open for: the transport closes

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.closed(self)
        self.inner.connection_lost(exc)

    def request_started(self) -> None:
        self.busy, self.waiting_since, self._partial, self._bytes_while_busy = True, None, False, False

    def request_finished(self) -> None:
        self.busy = False
        if self._bytes_while_busy:  # the next request began to arrive meanwhile: time it
            self._partial, self.waiting_since = True, self.gate.loop.time()

    def expire(self) -> None:
        """Its headers are late: a 408 when a request had begun, then closed."""
        self.waiting_since = None
        if self.busy or self.transport is None or self.transport.is_closing():
            return
        if self._partial:
            self.gate.slow_headers.add()
            self.transport.write(HEADER_TIMEOUT)
        self.transport.close()


class _Refusal(asyncio.Protocol):
    """A connection over the limit: a 503 at once, then closed when the client has read it
    (its end of file) or after REFUSAL_LINGER_S, whichever comes first."""

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.gate.refusing += 1
        if self.gate.refusing > MAX_PENDING_REFUSALS:
            transport.abort()  # a flood: keep no descriptor for it
            return
        transport.write(REFUSAL)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is read and dropped, so that closing does not reset the answer

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.refusing -= 1
        if self._timer is not None:
            self._timer.cancel()


class ConnectionGate:
    """The protocol factory the listening socket uses: counts, limits and times connections."""

    def __init__(self, server: web.Server, config: Callable[[], Config], open_files: int) -> None:
        self.server = server
        self.config = config
        self.open_files = open_files
        self.connections: dict[RequestHandler, GuardedConnection] = {}
        self.loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self.refusing = 0
        self.refused = _Notes("refused a client connection: [limits] max_connections (%d) are open")
        self.slow_headers = _Notes("closed a connection whose request headers were not complete within [limits] header_timeout")
        self._clamped_at: int | None = None

    def limits(self) -> LimitsConfig:
        return self.config().limits

    def __call__(self) -> asyncio.Protocol:
        """A new connection (counted from here: several may be accepted before any starts)."""
        allowed = self.allowed()
        if len(self.connections) >= allowed:
            self.refused.add(allowed)
            return _Refusal(self)
        connection = GuardedConnection(self.server(), self)
        self.connections[connection.inner] = connection
        return connection

    def allowed(self) -> int:
        config = self.config()
        wanted, capacity = config.limits.max_connections, connection_capacity(self.open_files, config)
        if wanted > capacity and self._clamped_at != capacity:
            self._clamped_at = capacity
            log.warning(
                "[limits] max_connections = %d is more than the open-file limit (%d) allows; using %d", wanted, self.open_files, capacity
            )
        return min(wanted, capacity)

    def closed(self, connection: GuardedConnection) -> None:
        self.connections.pop(connection.inner, None)

    def sweep(self) -> None:
        """Close the connections whose request headers are late; again every SWEEP_S (one
        timer for all of them, none per request)."""
        late = self.loop.time() - self.limits().header_timeout
        for connection in list(self.connections.values()):
            if connection.waiting_since is not None and connection.waiting_since <= late:
                connection.expire()
        self._sweeper = self.loop.call_later(SWEEP_S, self.sweep)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def connection_of(self, request: web.BaseRequest) -> GuardedConnection | None:
        return self.connections.get(request.protocol)


class _Site(web.BaseSite):
    """A TCP site whose connections pass the gate."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, gate: ConnectionGate) -> None:
        super().__init__(runner, backlog=LISTEN_BACKLOG)
        self.host, self.port, self.gate = host, port, gate

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self.gate, self.host, self.port, backlog=ACCEPT_BURST, reuse_address=True)
        for listening in server.sockets:  # asyncio listened with the burst; the queue stays long
            with socket.fromfd(listening.fileno(), listening.family, listening.type) as same:
                same.listen(self._backlog)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self.gate.sweep()

    async def stop(self) -> None:
        self.gate.stop_sweeping()
        await super().stop()


class FrontDoor:
    """`await start()` listens on `[router] host:port`; `await stop()` closes everything.
    `runner` and `site` are aiohttp's, for a caller that stops in two steps."""

    def __init__(self, config: Callable[[], Config], routes: Iterable[web.RouteDef], shutdown_timeout: float) -> None:
        self.config = config
        self.routes = list(routes)
        self.shutdown_timeout = shutdown_timeout
        self.runner: web.AppRunner | None = None
        self.site: web.BaseSite | None = None
        self.gate: ConnectionGate | None = None
        self._crashes = _Notes("a request handler failed: %r")

    @property
    def port(self) -> int:
        assert isinstance(self.site, _Site), "not started"
        return self.site.port

    async def start(self) -> None:
        config = self.config()
        app = web.Application(middlewares=[self._guard], client_max_size=int(config.limits.max_body_mb * MIB))
        app.add_routes(self.routes)
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self.shutdown_timeout,
            keepalive_timeout=config.limits.keepalive_timeout,
            auto_decompress=False,  # request_body.py decodes, within the size limit
            logger=HTTP_LOG,
        )
        await runner.setup()
        assert runner.server is not None
        self.gate = ConnectionGate(runner.server, self.config, open_file_limit())
        site = _Site(runner, config.router.host, config.router.port, self.gate)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.runner, self.site = runner, site

    async def stop(self) -> None:
        if self.site is not None:
            await self.site.stop()
        if self.runner is not None:
            await self.runner.cleanup()
        self.site = self.runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = self.gate.connection_of(request) if self.gate is not None else None
        if connection is not None:
            connection.request_started()
        try:
            if not self._may_see(request):
                return error_response(401, "Invalid or missing API key", code="invalid_api_key")
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return error_response(error.status, error.reason, headers=_allow_header(error))
        except Exception as error:  # a bug: the client still gets JSON, the log one line
            self._crashes.add(error, error=error)
            return error_response(500, "The router failed to answer this request; see its log")
        finally:
            if connection is not None:
                connection.request_finished()

    def _may_see(self, request: web.Request) -> bool:
        router = self.config().router
        if request.path not in STATUS_ENDPOINTS or request.path in router.open_endpoints:
            return True
        return authorized(request, router.api_keys)


def _allow_header(error: web.HTTPException) -> dict[str, str] | None:
    allow = error.headers.get("Allow")
    return {"Allow": allow} if allow else None
