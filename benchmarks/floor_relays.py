"""Floor relays: the least a Python router can cost, for router_bench.py to set beside mvtui.

aiohttp   an aiohttp server whose one handler forwards each POST, round-robin, through one
          shared ClientSession and relays the answer (streams chunk by chunk with
          `iter_any`). The most any router built on aiohttp, as the brief and issue #3 ask,
          can reach here: mvtui's own cost shows apart from aiohttp's.
asyncio   bytes passed through asyncio protocols: each client request (head and
          Content-Length body) goes verbatim to a pooled keep-alive connection to the next
          upstream, and the answer comes back verbatim, its framing followed only far enough
          to see where it ends. What a hand-written relay in place of aiohttp could reach.

Neither routes, checks health, retries, handles headers, times out or answers errors: they
assume well-formed peers and are benchmark instruments, not routers. Only 127.0.0.1.

    python benchmarks/floor_relays.py aiohttp --port 9000 --upstream http://127.0.0.1:8001 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web


# -- on aiohttp ------------------------------------------------------------------------
class FloorRelay:
    def __init__(self, upstreams: list[str], session: aiohttp.ClientSession) -> None:
        self.next_upstream = itertools.cycle(upstreams).__next__
        self.session = session

    async def relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        url = self.next_upstream() + request.path_qs
        async with self.session.post(url, data=body, headers={"Content-Type": "application/json"}) as upstream:
            if upstream.content_type != "text/event-stream":
                return web.Response(status=upstream.status, body=await upstream.read(), content_type=upstream.content_type)
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


async def serve_aiohttp(port: int, upstreams: list[str]) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        app = web.Application()
        app.router.add_post("/{path:.*}", FloorRelay(upstreams, session).relay)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await asyncio.Event().wait()  # until the benchmark stops this process group
        finally:
            await runner.cleanup()


# -- on asyncio protocols ----------------------------------------------------------------
Address = tuple[str, int]
HEAD_END = b"\r\n\r\n"


def header_value(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


class ChunkedEnd:
    """Follows chunked framing just far enough to say where the body ends."""

    def __init__(self) -> None:
        self.skip = 0  # bytes of chunk data (and its CRLF) still to pass
        self.line = b""  # a size or trailer line split across reads
        self.last_chunk_seen = False

    def feed(self, data: bytes) -> bool:
        pos = 0
        while pos < len(data):
            if self.skip:
                step = min(self.skip, len(data) - pos)
                self.skip -= step
                pos += step
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self.line += data[pos:]
                return False
            line, self.line, pos = (self.line + data[pos:end]).strip(), b"", end + 1
            if self.last_chunk_seen:
                if not line:
                    return True  # the blank line after the last chunk and its trailers
            elif (size := int(line.split(b";")[0], 16)) == 0:
                self.last_chunk_seen = True
            else:
                self.skip = size + 2
        return False


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: list[UpstreamConnection]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.head = b""
        self.in_head = True
        self.body_left = 0
        self.chunked: ChunkedEnd | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, client: ClientConnection, request: bytes) -> None:
        self.client, self.head, self.in_head, self.chunked = client, b"", True, None
        self.transport.write(request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        assert self.client is not None and self.client.transport is not None
        self.client.transport.write(data)
        if self.in_head:
            self.head += data
            end = self.head.find(HEAD_END)
            if end < 0:
                return
            head, data, self.head, self.in_head = self.head[:end], self.head[end + 4 :], b"", False
            if (header_value(head, b"transfer-encoding") or b"").lower() == b"chunked":
                self.chunked = ChunkedEnd()
            else:
                self.body_left = int(header_value(head, b"content-length") or 0)
        finished = self.chunked.feed(data) if self.chunked else self._count(data)
        if finished:
            client, self.client = self.client, None
            self.pool.append(self)
            client.answered()

    def _count(self, data: bytes) -> bool:
        self.body_left -= len(data)
        return self.body_left <= 0

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()


class ClientConnection(asyncio.Protocol):
    def __init__(self, next_upstream: Callable[[], tuple[Address, list[UpstreamConnection]]]) -> None:
        self.next_upstream = next_upstream
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upstream: UpstreamConnection | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next_request()

    def _next_request(self) -> None:
        if self.busy:
            return
        end = self.buffer.find(HEAD_END)
        if end < 0:
            return
        size = end + 4 + int(header_value(self.buffer[:end], b"content-length") or 0)
        if len(self.buffer) < size:
            return
        request, self.buffer, self.busy = self.buffer[:size], self.buffer[size:], True
        asyncio.ensure_future(self._forward(request))

    async def _forward(self, request: bytes) -> None:
        (host, port), pool = self.next_upstream()
        if pool:
            self.upstream = pool.pop()
        else:
            _, self.upstream = await asyncio.get_running_loop().create_connection(lambda: UpstreamConnection(pool), host, port)
        self.upstream.send(self, request)

    def answered(self) -> None:
        self.busy, self.upstream = False, None
        self._next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()  # mid-answer: the upstream sees the disconnect


async def serve_asyncio(port: int, upstreams: list[str]) -> None:
    addresses = [(urlsplit(url).hostname or "", urlsplit(url).port or 80) for url in upstreams]
    pools: list[tuple[Address, list[UpstreamConnection]]] = [(address, []) for address in addresses]
    next_upstream = itertools.cycle(pools).__next__
    server = await asyncio.get_running_loop().create_server(lambda: ClientConnection(next_upstream), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()  # until the benchmark stops this process group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("relay", choices=["aiohttp", "asyncio"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", action="append", required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    args = parser.parse_args()
    if any(urlsplit(url).hostname != "127.0.0.1" for url in args.upstream):
        parser.error("upstreams must be on 127.0.0.1")
    serve = serve_aiohttp if args.relay == "aiohttp" else serve_asyncio
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port, args.upstream))
    else:
        asyncio.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
