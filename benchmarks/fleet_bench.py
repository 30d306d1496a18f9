"""Several routers, one cluster: three mvtui replicas sharing a Redis against one mvtui alone.

Started once, on 127.0.0.1: a redis-server (`--save '' --appendonly no`), two simulated vLLM
servers (as in router_bench.py), and these targets, all up for the whole run:

  direct        the load generator spreads requests round-robin over the two simulators
  alone         one `mvtui --no-ui`, no [cluster] (mvtui as it always was)
  1 replica     one `mvtui --no-ui` with [cluster] redis_url: the cost of being in a fleet
  3 replicas    three of them; the load generator spreads requests round-robin over them

For each concurrency, benchmarks/load.py runs as its own process once per target and round,
the rounds visiting the targets in rotated order. Then the time for an operator change to
reach every replica: a drain or undrain sent to replica 1's admin API, and the other replicas'
/load-stats polled until they show it (the target is 200 ms at p99). The Markdown table goes
to stdout and to benchmarks/results/fleet.md (raw numbers: fleet.json). Every process is
stopped by its process group at the end, whatever happens.

    .venv/bin/python benchmarks/fleet_bench.py                 # about 2 minutes
    .venv/bin/python benchmarks/fleet_bench.py --concurrency 32 --rounds 2 --changes 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.router_bench import Processes, child_env, measure, percentile, start_sims, wait_ready  # noqa: E402
from tests.helpers import free_port  # noqa: E402

RESULTS = HERE / "results"
TOKEN = "fleet-bench"
TARGETS = ("direct", "alone", "1 replica", "3 replicas")
POLL_TIMEOUT_S = 10.0


@dataclass
class Target:
    name: str
    urls: list[str]
    admin_urls: list[str] = field(default_factory=list)


def redis_server(procs: Processes) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    entry = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    wait_ready(entry, f"127.0.0.1:{port}", _redis_answers)
    return f"redis://127.0.0.1:{port}/0"


def _redis_answers(address: str) -> bool:
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def config_text(sims: list[str], name: str, redis_url: str | None, admin_port: int) -> str:
    entries = ",\n".join(f'  {{ url = "{url}", name = "s{index}", max_concurrent_requests = 512 }}' for index, url in enumerate(sims))
    cluster = f'[cluster]\nredis_url = "{redis_url}"\nname = "{name}"\n' if redis_url else ""
    return (
        f"[servers]\nservers = [\n{entries}\n]\n\n[config]\nmetrics_interval = 0.5\n\n"
        f'[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n\n{cluster}'
    )


def start_mvtui(procs: Processes, sims: list[str], name: str, redis_url: str | None) -> tuple[str, str]:
    folder = procs.logs / name.replace(" ", "-")
    folder.mkdir()
    port, admin_port = free_port(), free_port()
    config = folder / "servers.toml"
    config.write_text(config_text(sims, name, redis_url, admin_port))
    env = child_env(folder, {})
    argv = [sys.executable, "-m", "mvtui", "--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    entry = procs.start(name, argv, env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(entry, url, lambda url: _sees(url, 2))
    return url, f"http://127.0.0.1:{admin_port}"


def _sees(url: str, servers: int) -> bool:
    with urllib.request.urlopen(url + "/load-stats", timeout=2) as response:
        return bool(json.loads(response.read()).get("healthy_servers") == servers)


def start_targets(procs: Processes, sims: list[str], redis_url: str) -> list[Target]:
    alone, _ = start_mvtui(procs, sims, "alone", None)
    one, _ = start_mvtui(procs, sims, "solo", redis_url)
    three = [start_mvtui(procs, sims, f"r{index}", redis_url) for index in (1, 2, 3)]
    return [
        Target("direct", sims),
        Target("alone", [alone]),
        Target("1 replica", [one]),
        Target("3 replicas", [url for url, _ in three], [admin for _, admin in three]),
    ]


@dataclass
class Cell:
    target: str
    concurrency: int
    runs: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        latencies = [value for run in self.runs for value in run.get("latencies_ms", [])]
        seconds = sum(run["seconds"] for run in self.runs)
        return {
            "rps": sum(run["requests"] for run in self.runs) / seconds if seconds else 0.0,
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "errors": sum(run["errors"] for run in self.runs),
        }


def run_load(targets: list[Target], args: argparse.Namespace) -> list[Cell]:
    cells: list[Cell] = []
    for concurrency in args.concurrency:
        row = {target.name: Cell(target.name, concurrency) for target in targets}
        for round_index in range(args.rounds):
            turn = round_index % len(targets)
            for target in targets[turn:] + targets[:turn]:
                run = measure(target.urls, "plain", concurrency, args)
                row[target.name].runs.append(run)
                print(
                    f"{target.name:11} c={concurrency:<4} round {round_index + 1}: {run['rps']:8.1f} req/s  p99 {run['p99_ms']} ms  errors {run['errors']}",
                    file=sys.stderr,
                    flush=True,
                )
        cells += row.values()
    return cells


# -- the time for an operator change to reach every replica ---------------------------------


async def propagation(target: Target, changes: int) -> list[float]:
    """Milliseconds from sending each change to replica 1 until every replica shows it."""
    timings: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)) as session:
        for index in range(changes):
            drained = index % 2 == 0
            verb = "drain" if drained else "undrain"
            started = time.perf_counter()
            polls = [_until_shown(session, url, drained) for url in target.urls[1:]]
            send = session.post(f"{target.admin_urls[0]}/servers/s1/{verb}", headers={"Authorization": f"Bearer {TOKEN}"})
            async with send as response:
                if response.status != 200:
                    raise RuntimeError(f"{verb} answered {response.status}: {await response.text()}")
            seen = await asyncio.gather(*polls)
            timings.append((max(seen) - started) * 1000)
            await asyncio.sleep(0.05)
    return timings


async def _until_shown(session: aiohttp.ClientSession, url: str, drained: bool) -> float:
    deadline = time.perf_counter() + POLL_TIMEOUT_S
    while time.perf_counter() < deadline:
        async with session.get(url + "/load-stats") as response:
            servers = (await response.json())["servers"]
        if next(server for server in servers if server["name"] == "s1")["draining"] == drained:
            return time.perf_counter()
    raise RuntimeError(f"{url} did not show the change within {POLL_TIMEOUT_S} s")


# -- the report --------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def table(cells: list[Cell]) -> str:
    lines = [
        "| target | c | req/s | vs alone | p50 ms | p99 ms | added p50 vs direct | added p99 vs direct | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by = {(cell.target, cell.concurrency): cell.summary() for cell in cells}
    for cell in cells:
        row, direct, alone = by[(cell.target, cell.concurrency)], by[("direct", cell.concurrency)], by[("alone", cell.concurrency)]
        ratio = f"{row['rps'] / alone['rps'] * 100:.0f}%" if alone["rps"] and cell.target != "direct" else "–"
        added50 = row["p50_ms"] - direct["p50_ms"] if row["p50_ms"] is not None and direct["p50_ms"] is not None else None
        added99 = row["p99_ms"] - direct["p99_ms"] if row["p99_ms"] is not None and direct["p99_ms"] is not None else None
        lines.append(
            f"| {cell.target} | {cell.concurrency} | {row['rps']:.0f} | {ratio} | {fmt(row['p50_ms'])} | {fmt(row['p99_ms'])} | "
            f"{fmt(added50, sign=True)} | {fmt(added99, sign=True)} | {row['errors']} |"
        )
    return "\n".join(lines)


def propagation_table(timings: list[float]) -> str:
    return (
        "| changes | p50 ms | p99 ms | max ms | target |\n|--:|--:|--:|--:|--|\n"
        f"| {len(timings)} | {fmt(percentile(timings, 0.5))} | {fmt(percentile(timings, 0.99))} | {fmt(max(timings))} | "
        f"p99 ≤ 200 ms: {'met' if (percentile(timings, 0.99) or 0) <= 200 else 'NOT met'} |"
    )


def report(cells: list[Cell], timings: list[float], args: argparse.Namespace, started: float) -> str:
    setup = (
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}; two `mvtui sim` "
        f"({args.tokens_per_s:g} tokens/s, {args.max_tokens} tokens per request), redis-server, and every target on "
        f"127.0.0.1 sharing the machine; {args.rounds} rounds of {args.duration:g} s per cell; took {time.monotonic() - started:.0f} s."
    )
    return (
        f"# Fleet benchmark\n\n{setup}\n\n## Throughput and added latency (plain /v1/completions)\n\n{table(cells)}\n\n"
        f"## An operator change reaching every replica\n\nA drain or undrain sent to replica 1's admin API; replicas 2 and 3 "
        f"polled through /load-stats until both show it (the polling is part of the time).\n\n{propagation_table(timings)}\n"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Three mvtui replicas sharing a Redis, against one mvtui alone.")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[32, 96])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--tokens-per-s", type=float, default=100000.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--changes", type=int, default=100, help="operator changes timed")
    parser.add_argument("--output", type=Path, default=RESULTS / "fleet.md")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mvtui-fleet-bench-") as logs:
        procs = Processes(Path(logs))
        try:
            redis_url = redis_server(procs)
            sims, _ = start_sims(procs, args)
            targets = start_targets(procs, sims, redis_url)
            cells = run_load(targets, args)
            timings = asyncio.run(propagation(targets[-1], args.changes))
        finally:
            procs.stop_all()
    text = report(cells, timings, args, started)
    print(text)
    args.output.write_text(text)
    raw = {"cells": [{"target": c.target, "concurrency": c.concurrency, "summary": c.summary()} for c in cells], "propagation_ms": timings}
    args.output.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
