"""Closed-loop load generator: C workers send /v1/completions requests for a fixed time.

Run as its own process by router_bench.py (so it has its own interpreter and loop), one
cell per run: it warms up, measures for `--duration` seconds, and prints one JSON object.
Requests go round-robin over `--url`s: two simulator URLs for "direct", one router URL
otherwise, so both see the same backends. Only 127.0.0.1 targets are accepted.

    python benchmarks/load.py --url http://127.0.0.1:8001 --concurrency 32 --duration 4 [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

REQUEST_TIMEOUT_S = 30.0
MAX_ERROR_SAMPLES = 5


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    completed: int = 0  # warm-up and drain included: what the servers' CPU time was spent on

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(message)


@dataclass
class Window:
    """Requests that finish inside [start, end) are counted; the rest is warm-up or drain."""

    start: float
    end: float

    def counts(self, finished: float) -> bool:
        return self.start <= finished < self.end


def request_body(model: str, max_tokens: int, stream: bool) -> bytes:
    return json.dumps({"model": model, "prompt": "Say something about routers.", "max_tokens": max_tokens, "stream": stream}).encode()


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> tuple[float, float | None]:
    """Latency to the last byte and, for streams, to the first body chunk; raises on failure."""
    started = time.perf_counter()
    first: float | None = None
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        if not stream:
            await response.read()
            return time.perf_counter() - started, None
        last = b""
        async for chunk in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
            last = chunk
        if not last.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"stream ended without [DONE]: {last[-120:]!r}")
    return time.perf_counter() - started, first


async def worker(
    session: aiohttp.ClientSession, urls: itertools.cycle, body: bytes, stream: bool, window: Window, samples: Samples
) -> None:
    while time.perf_counter() < window.end:
        url = next(urls)
        try:
            latency, ttft = await one_request(session, url, body, stream)
        except (TimeoutError, aiohttp.ClientError, RuntimeError) as error:
            if window.counts(time.perf_counter()):
                samples.error(f"{type(error).__name__}: {error}")
            continue
        samples.completed += 1
        if window.counts(time.perf_counter()):
            samples.latencies.append(latency)
            if ttft is not None:
                samples.ttfts.append(ttft)


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def summary(samples: Samples, window: Window, raw: bool) -> dict:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    result = {
        "requests": len(samples.latencies),
        "completed": samples.completed,
        "errors": samples.errors,
        "error_samples": samples.error_samples,
        "seconds": round(window.end - window.start, 3),
        "rps": round(len(samples.latencies) / (window.end - window.start), 1),
        "p50_ms": ms(percentile(samples.latencies, 0.50)),
        "p99_ms": ms(percentile(samples.latencies, 0.99)),
        "ttft_p50_ms": ms(percentile(samples.ttfts, 0.50)),
        "ttft_p99_ms": ms(percentile(samples.ttfts, 0.99)),
    }
    if raw:
        result["latencies_ms"] = [round(value * 1000, 3) for value in samples.latencies]
        result["ttfts_ms"] = [round(value * 1000, 3) for value in samples.ttfts]
    return result


async def run(args: argparse.Namespace) -> dict:
    body = request_body(args.model, args.max_tokens, args.stream)
    urls = itertools.cycle([url.rstrip("/") + "/v1/completions" for url in args.url])
    samples = Samples()
    cpu_at_start = time.process_time()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        now = time.perf_counter()
        window = Window(now + args.warmup, now + args.warmup + args.duration)
        workers = [worker(session, urls, body, args.stream, window, samples) for _ in range(args.concurrency)]
        await asyncio.wait_for(asyncio.gather(*workers), args.warmup + args.duration + REQUEST_TIMEOUT_S + 5)
    return {**summary(samples, window, args.raw), "cpu_s": round(time.process_time() - cpu_at_start, 3)}


def loopback_only(urls: list[str]) -> None:
    for url in urls:
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit(f"load.py only targets loopback addresses, not {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", required=True, help="base URL; repeat to spread round-robin")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--no-uvloop", action="store_true", help="the load generator's own loop: plain asyncio")
    parser.add_argument("--raw", action="store_true", help="also print every latency, to pool several runs")
    args = parser.parse_args()
    loopback_only(args.url)
    loop_factory = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(run(args))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
