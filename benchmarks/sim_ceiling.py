"""How much load one `mvtui sim` process carries before the simulator itself is the limit.

Starts `python -m mvtui sim` on 127.0.0.1 and drives it with aiohttp from this process:
  plain      non-streamed requests with max_tokens=1: requests/s
  streams    N concurrent SSE streams at a realistic per-sequence rate: achieved vs ideal tokens/s
  flood      N concurrent SSE streams at a very high per-sequence rate: the streamed tokens/s ceiling
The sim's CPU use (from /proc) is printed beside each: a sim that is not at 100 % of a core is not
what limits a router benchmark. Usage: python benchmarks/sim_ceiling.py [--seconds 5] [--streams 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.proc_readings import cpu_seconds  # noqa: E402
from tests.helpers import Proc, start_sim  # noqa: E402


@dataclass
class Result:
    name: str
    concurrency: int
    seconds: float
    requests: int
    tokens: int
    ideal_tokens_per_s: float | None
    sim_cpu_s: float

    def row(self) -> str:
        ideal = f"{self.ideal_tokens_per_s:>10.0f}" if self.ideal_tokens_per_s else f"{'-':>10}"
        return (
            f"{self.name:<8} {self.concurrency:>5} {self.requests / self.seconds:>10.0f} "
            f"{self.tokens / self.seconds:>10.0f} {ideal} {100 * self.sim_cpu_s / self.seconds:>8.0f}%"
        )


HEADER = f"{'scenario':<8} {'conc':>5} {'req/s':>10} {'tok/s':>10} {'ideal':>10} {'sim cpu':>9}"


async def drive(
    url: str, concurrency: int, seconds: float, one: Callable[[aiohttp.ClientSession, str], Awaitable[int]]
) -> tuple[int, int, float]:
    """Keep `concurrency` requests in flight for `seconds`; returns (requests, tokens, elapsed)."""
    deadline = time.monotonic() + seconds
    counts = [0, 0]

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            tokens = await one(session, url)  # `counts[1] += await ...` would lose updates
            counts[0] += 1
            counts[1] += tokens

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return counts[0], counts[1], time.monotonic() - started


async def plain_request(session: aiohttp.ClientSession, url: str) -> int:
    body = {"model": "demo", "prompt": "hello", "max_tokens": 1}
    async with session.post(url + "/v1/completions", json=body) as response:
        return (await response.json())["usage"]["completion_tokens"]


def stream_request(max_tokens: int) -> Callable[[aiohttp.ClientSession, str], Awaitable[int]]:
    async def one(session: aiohttp.ClientSession, url: str) -> int:
        body = {"model": "demo", "prompt": "hello", "max_tokens": max_tokens, "stream": True}
        tokens = 0
        async with session.post(url + "/v1/completions", json=body) as response:
            async for data in response.content.iter_any():
                tokens += data.count(b'"finish_reason":null')
        return tokens

    return one


async def measure(
    proc: Proc,
    name: str,
    concurrency: int,
    seconds: float,
    one: Callable[[aiohttp.ClientSession, str], Awaitable[int]],
    ideal: float | None,
) -> Result:
    cpu_before = cpu_seconds(proc.pid)
    requests, tokens, elapsed = await drive(proc.url, concurrency, seconds, one)
    return Result(name, concurrency, elapsed, requests, tokens, ideal, cpu_seconds(proc.pid) - cpu_before)


def sim_args(max_num_seqs: int, tokens_per_s: float) -> list[str]:
    return [
        "--max-num-seqs",
        str(max_num_seqs),
        "--tokens-per-s",
        str(tokens_per_s),
        "--ttft-ms",
        "0",
        "--prompt-ms-per-token",
        "0",
        "--kv-blocks",
        "100000",
        "--max-model-len",
        "4096",
    ]


async def run(seconds: float, streams: int, plain_concurrency: int) -> list[Result]:
    results = []
    scenarios = [
        ("plain", plain_concurrency, sim_args(1024, 10000.0), plain_request, None),
        ("streams", streams, sim_args(1024, 40.0), stream_request(200), 40.0 * streams),
        ("flood", streams, sim_args(1024, 2000.0), stream_request(2000), None),
    ]
    for name, concurrency, args, one, ideal in scenarios:
        proc = start_sim(extra=args)
        try:
            results.append(await measure(proc, name, concurrency, seconds, one, ideal))
        finally:
            proc.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each scenario")
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams")
    parser.add_argument("--plain-concurrency", type=int, default=64, help="concurrent plain requests")
    args = parser.parse_args()
    print(f"mvtui sim ceiling on {os.cpu_count()} CPUs, {args.seconds:.0f} s per scenario (client in this process)")
    print(HEADER)
    for result in asyncio.run(run(args.seconds, args.streams, args.plain_concurrency)):
        print(result.row())


if __name__ == "__main__":
    main()
