"""The oracle router of routing_quality.py: a router that knows what the others must guess.

It is told each simulator's true speed (TTFT and per-token interval, and the slow-down the
benchmark applies, at the moment it applies it) and how many of a server's slots another
client holds. It reads each request's max_tokens (the simulator generates exactly that many
tokens), keeps every request in one central queue, and places them first come, first served:
each request in queue order takes the server where it would end soonest, given the slots
there and the requests ahead of it (list scheduling by earliest completion time). A request
is bound only when that server has a free slot; otherwise it keeps waiting for it, so a
request may wait for a busy fast server rather than take an idle slow one.

    python benchmarks/oracle_router.py --port 9000 \\
        --server http://127.0.0.1:8001 4 80 20 --server http://127.0.0.1:8002 16 20 5

Control (JSON bodies): POST /oracle/slow {"url": URL, "slow": 3.0};
POST /oracle/external {"url": URL, "busy": 10}. Only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

SCAN_LIMIT = 256  # queued requests placed per pass; those behind wait for the next pass
DEFAULT_MAX_TOKENS = 64
RELAYED_HEADERS = ("Content-Type", "Cache-Control")


@dataclass(eq=False)
class Job:
    """One request: its answer length, and where it runs once bound."""

    tokens: int
    arrived: float
    bound: asyncio.Future[Server] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = 0.0
    seen_tokens: int = 0


@dataclass(eq=False)
class Server:
    url: str
    slots: int
    ttft_s: float
    interval_s: float
    slow: float = 1.0
    busy: int = 0  # slots another client holds
    running: list[Job] = field(default_factory=list)
    sent: int = 0

    def service_s(self, tokens: int) -> float:
        return (self.ttft_s + tokens * self.interval_s) * self.slow

    def remaining_s(self, job: Job, now: float) -> float:
        if job.seen_tokens == 0:
            return max(0.0, self.service_s(job.tokens) - (now - job.started))
        return max(0.0, (job.tokens - job.seen_tokens) * self.interval_s * self.slow)

    def usable_slots(self) -> int:
        return max(0, self.slots - self.busy)

    def has_free_slot(self) -> bool:
        return len(self.running) < self.usable_slots()

    def slot_free_times(self, now: float) -> list[float]:
        """Seconds from now until each of its usable slots is free (0: free now)."""
        usable = self.usable_slots()
        if usable == 0:
            return []
        times = sorted(self.remaining_s(job, now) for job in self.running)
        free = [0.0] * max(0, usable - len(times))
        return free + times[max(0, len(times) - usable) :]


class Oracle:
    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers
        self.queue: list[Job] = []

    def server(self, url: str) -> Server:
        for server in self.servers:
            if server.url == url.rstrip("/"):
                return server
        raise web.HTTPNotFound(text=f"no server {url}")

    def dispatch(self) -> None:
        """Place the queue in order on the servers' predicted slots; bind those whose best
        slot is free now."""
        now = time.monotonic()
        slots = {server.url: server.slot_free_times(now) for server in self.servers}
        for heap in slots.values():
            heapq.heapify(heap)
        placed: set[Job] = set()
        for job in itertools.islice(self.queue, SCAN_LIMIT):
            if job.bound.done():  # cancelled: its client left
                placed.add(job)
                continue
            server = self._best(job, slots)
            if server is None:
                continue
            free_in = heapq.heappop(slots[server.url])
            heapq.heappush(slots[server.url], free_in + server.service_s(job.tokens))
            if free_in <= 0.0 and server.has_free_slot():
                self._bind(job, server, now)
                placed.add(job)
        if placed:
            self.queue = [job for job in self.queue if job not in placed]

    def _best(self, job: Job, slots: dict[str, list[float]]) -> Server | None:
        usable = [server for server in self.servers if slots[server.url]]
        if not usable:
            return None
        return min(usable, key=lambda server: slots[server.url][0] + server.service_s(job.tokens))

    @staticmethod
    def _bind(job: Job, server: Server, now: float) -> None:
        job.started = now
        server.running.append(job)
        server.sent += 1
        job.bound.set_result(server)

    def finish(self, job: Job, server: Server) -> None:
        server.running.remove(job)
        self.dispatch()


class OracleApp:
    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle
        self.session: aiohttp.ClientSession | None = None

    def build(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.relay)
        app.router.add_post("/v1/completions", self.relay)
        app.router.add_post("/oracle/slow", self.set_slow)
        app.router.add_post("/oracle/external", self.set_external)
        app.router.add_get("/oracle/stats", self.stats)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)

    async def _close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def stats(self, request: web.Request) -> web.Response:
        servers = [{"url": s.url, "sent": s.sent, "running": len(s.running), "slow": s.slow, "busy": s.busy} for s in self.oracle.servers]
        return web.json_response({"queued": len(self.oracle.queue), "servers": servers})

    async def set_slow(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.oracle.server(body["url"]).slow = float(body["slow"])
        self.oracle.dispatch()
        return web.json_response({"ok": True})

    async def set_external(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.oracle.server(body["url"]).busy = int(body["busy"])
        self.oracle.dispatch()
        return web.json_response({"ok": True})

    async def relay(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        job = Job(int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS), time.monotonic())
        self.oracle.queue.append(job)
        self.oracle.dispatch()
        try:
            server = await job.bound
        except asyncio.CancelledError:  # the client left while the request waited
            self._drop(job)
            raise
        try:
            return await self._forward(request, raw, job, server)
        finally:
            self.oracle.finish(job, server)

    def _drop(self, job: Job) -> None:
        if job in self.oracle.queue:
            self.oracle.queue.remove(job)
        elif job.bound.done() and not job.bound.cancelled():  # bound just before the client left
            self.oracle.finish(job, job.bound.result())

    async def _forward(self, request: web.Request, raw: bytes, job: Job, server: Server) -> web.StreamResponse:
        assert self.session is not None
        headers = {"Content-Type": "application/json"}
        async with self.session.post(server.url + request.path, data=raw, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name in RELAYED_HEADERS:
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            response.headers["x-oracle-server"] = server.url
            response.headers["x-oracle-wait-ms"] = f"{1000 * (job.started - job.arrived):.3f}"
            await response.prepare(request)
            events = 0
            async for chunk in upstream.content.iter_any():
                events += chunk.count(b"data: ")
                job.seen_tokens = max(0, events - 1)  # the first event is the role chunk
                await response.write(chunk)
            await response.write_eof()
            return response


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--server",
        nargs=4,
        action="append",
        required=True,
        metavar=("URL", "SLOTS", "TTFT_MS", "INTERVAL_MS"),
        help="a simulator: its URL, slots, TTFT and per-token interval; repeat per server",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    servers = [
        Server(url.rstrip("/"), int(slots), float(ttft) / 1000, float(interval) / 1000) for url, slots, ttft, interval in args.server
    ]
    app = OracleApp(Oracle(servers)).build()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
