"""The least an aiohttp relay can cost: the floor under any router built on aiohttp.

An aiohttp server whose one handler forwards each POST, round-robin, through one shared
ClientSession and relays the answer (streams chunk by chunk with `iter_any`). Nothing
else: no routing, health, retries, header copying, metrics or timeouts. router_bench.py
runs it as the `aiohttp-floor` targets, so mvtui's own cost and aiohttp's are told apart
in the same run. A benchmark instrument, not a router: only 127.0.0.1 upstreams.

    python benchmarks/aiohttp_floor.py --port 9000 --upstream http://127.0.0.1:8001 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web


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


async def serve(port: int, upstreams: list[str]) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", action="append", required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = parser.parse_args()
    if any(urlsplit(url).hostname != "127.0.0.1" for url in args.upstream):
        parser.error("upstreams must be on 127.0.0.1")
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port, args.upstream))
    else:
        asyncio.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
