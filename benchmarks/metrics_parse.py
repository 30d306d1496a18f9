"""mvtui.vllm.parse_metrics against prometheus-client's parser on a real vLLM-style /metrics page.

The page comes from a simulator started here on 127.0.0.1 and put under load first, so its
histograms have filled buckets. Real servers often run several engines (data parallel), so
the page is also measured with every engine-labelled series repeated for engines 1..N-1,
as such a server shows it. Both parsers must read the same number of running requests
from each page before any time is reported.

    .venv/bin/python benchmarks/metrics_parse.py [--engines 2] [--repeat 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mvtui.cluster.vllm import parse_metrics  # noqa: E402
from tests.helpers import free_port  # noqa: E402

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with _NO_PROXY.open(request, timeout=5) as response:
        return response.read()


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the simulator exited with {proc.returncode}")
        try:
            get(url + "/health")
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the simulator did not answer at {url} within {timeout} s")


async def put_under_load(url: str, requests: int, concurrency: int) -> None:
    """Fill the latency histograms with varied requests (bounded in count)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            body = {"model": "bench", "prompt": "word " * (1 + index % 300), "max_tokens": 1 + index % 40, "stream": index % 2 == 0}
            async with semaphore, session.post(url + "/v1/completions", json=body) as response:
                await response.read()

        await asyncio.gather(*(one(index) for index in range(requests)))


def sampled_page() -> str:
    """A /metrics page from a simulator that is still busy with requests when it is read."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        "-m",
        "mvtui",
        "sim",
        "--port",
        str(port),
        "--model",
        "bench",
        "--max-num-seqs",
        "64",
        "--tokens-per-s",
        "2000",
        "--ttft-ms",
        "5",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_up(url, proc)
        asyncio.run(put_under_load(url, requests=600, concurrency=64))
        busy = subprocess.Popen([sys.executable, "-c", _BUSY.format(url=url)], cwd=REPO, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(0.5)
            return get(url + "/metrics").decode()
        finally:
            busy.kill()
            busy.wait()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# Keeps requests running while the page is read, so the gauges are not all zero.
_BUSY = """
import json, threading, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
body = json.dumps({{"model": "bench", "prompt": "hi", "max_tokens": 3000}}).encode()
def one():
    request = urllib.request.Request("{url}/v1/completions", data=body, headers={{"Content-Type": "application/json"}})
    opener.open(request, timeout=30).read()
threads = [threading.Thread(target=one) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def with_engines(page: str, engines: int) -> str:
    """The page as a server with `engines` engines shows it: each engine="0" sample repeated."""
    lines: list[str] = []
    for line in page.splitlines():
        lines.append(line)
        if line.startswith("vllm:") and 'engine="0"' in line:
            lines += [line.replace('engine="0"', f'engine="{index}"') for index in range(1, engines)]
    return "\n".join(lines) + "\n"


def running_by_prometheus_client(page: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(page):
        if family.name == "vllm:num_requests_running":
            total += sum(sample.value for sample in family.samples)
    return total


def microseconds_per_page(parse: Callable[[str], object], page: str, repeat: int) -> float:
    parse(page)  # warm
    best = float("inf")
    for _ in range(5):  # the best of five batches: the least disturbed by other processes
        started = time.perf_counter()
        for _ in range(repeat):
            parse(page)
        best = min(best, (time.perf_counter() - started) / repeat)
    return best * 1e6


def consume(page: str) -> None:
    for _ in text_string_to_metric_families(page):
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=2, help="engines of the second page (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=100, help="parses per timed batch")
    parser.add_argument("--save", type=Path, help="also write the sampled page to this file")
    args = parser.parse_args()
    page = sampled_page()
    if args.save:
        args.save.write_text(page)
    rows = []
    for name, text in (("1 engine", page), (f"{args.engines} engines", with_engines(page, args.engines))):
        ours, theirs = parse_metrics(text).running, running_by_prometheus_client(text)
        if ours != theirs:
            raise SystemExit(f"{name}: the parsers disagree on running requests ({ours} vs {theirs})")
        mvtui_us = microseconds_per_page(parse_metrics, text, args.repeat)
        client_us = microseconds_per_page(consume, text, max(1, args.repeat // 10))
        rows.append((name, len(text.encode()), text.count("\n"), ours, mvtui_us, client_us))
    print("| page | bytes | lines | running | mvtui.vllm.parse_metrics µs | prometheus_client parser µs | ratio |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, size, lines, running, mvtui_us, client_us in rows:
        print(f"| {name} | {size} | {lines} | {running:g} | {mvtui_us:.0f} | {client_us:.0f} | {client_us / mvtui_us:.1f}× |")
    print(f"\nPython {sys.version.split()[0]}, prometheus-client {version('prometheus-client')}; best of 5 batches per parser")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
