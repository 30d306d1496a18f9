"""Overload and faults: mvtui's queue and circuit breaker, each against the same simulators.

1. Bursts. 500 streamed requests at once onto a cluster of 48 slots: three `mvtui sim`
   whose --max-num-seqs add up to 48, each stated as its max_concurrent_requests. One mvtui
   with its queue (the default) and one with `queue = false` route to the same simulators,
   taking turns burst by burst. Per setting: errors, mean and p99 latency, mean and p99 time
   to the first token, how long the burst took, and the most requests each simulator held
   in its own waiting queue (its /sim/state, read every 20 ms during the burst).
   Two clusters: "mixed" (24 + 16 slots at 100 tokens/s, 8 slots at 50 tokens/s: a slower
   card; answers of 8 to 64 tokens) and "uniform" (3 x 16 slots at 100 tokens/s, 32 tokens).
2. Parity. One simulator with --max-num-seqs 64, closed loop at concurrency 64
   (benchmarks/load.py): direct, mvtui with default settings (the server listed by its URL
   only), and mvtui with max_concurrent_requests = 64. The queue must not cap below direct.
3. A server failing every request (fail_rate 1.0) beside two healthy ones: 600 requests at
   concurrency 16 through mvtui with its breaker (the default) and with `breaker = false`.
   Upstream attempts per client request (the simulators' `received`), and errors seen by
   clients.

Every process runs in its own process group and is stopped by that group at the end. The
Markdown report goes to stdout and to benchmarks/results/overload.md.

    .venv/bin/python benchmarks/overload_bench.py              # about 3 minutes
    .venv/bin/python benchmarks/overload_bench.py --bursts 1   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.router_bench import Processes, answers_completion, child_env, http, wait_ready  # noqa: E402
from tests.helpers import free_port  # noqa: E402

MODEL = "bench"
RESULTS = HERE / "results"
BURST = 500
SAMPLE_EVERY_S = 0.02
REQUEST_TIMEOUT_S = 300.0
IDLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SimSpec:
    slots: int
    tokens_per_s: float


@dataclass(frozen=True)
class Cluster:
    name: str
    sims: tuple[SimSpec, ...]
    lengths: tuple[int, int]  # max_tokens of each request: uniform in [low, high]


CLUSTERS = (
    Cluster("mixed", (SimSpec(24, 100), SimSpec(16, 100), SimSpec(8, 50)), (8, 64)),
    Cluster("uniform", (SimSpec(16, 100), SimSpec(16, 100), SimSpec(16, 100)), (32, 32)),
)


# -- processes -------------------------------------------------------------------------
def start_sim(procs: Processes, name: str, slots: int, tokens_per_s: float, extra: list[str] | None = None) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "mvtui", "sim", "--port", str(port), "--model", MODEL, "--max-num-seqs", str(slots)]
    argv += ["--tokens-per-s", str(tokens_per_s), "--ttft-ms", "20", "--prompt-ms-per-token", "0", "--kv-blocks", "100000"]
    entry = procs.start(name, argv + (extra or []), child_env(procs.logs, {}))
    url = f"http://127.0.0.1:{port}"
    wait_ready(entry, url, answers_completion)
    return url


def start_mvtui(procs: Processes, name: str, servers: list[str], router: str = "") -> str:
    """`servers`: the entries of [servers] servers as TOML inline tables."""
    port = free_port()
    config = procs.logs / f"{name}.toml"
    entries = ",\n".join(f"  {entry}" for entry in servers)
    config.write_text(f"[servers]\nservers = [\n{entries}\n]\n\n[router]\n{router}\n[admin]\nport = 0\n")
    argv = [sys.executable, "-m", "mvtui", "--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    entry = procs.start(name, argv, child_env(procs.logs, {"MVTUI_LOOP": "asyncio"}))
    url = f"http://127.0.0.1:{port}"
    wait_ready(entry, url, lambda found: sees(found, len(servers)))
    return url


def sees(url: str, count: int) -> bool:
    status, body = http("GET", url + "/load-stats")
    return status == 200 and json.loads(body).get("healthy_servers") == count and answers_completion(url)


def sim_state(url: str) -> dict:
    return json.loads(http("GET", url + "/sim/state")[1])


def wait_idle(sims: list[str]) -> None:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(state["running"] == 0 and state["waiting"] == 0 for state in map(sim_state, sims)):
            return
        time.sleep(0.1)
    raise RuntimeError("the simulators did not go idle")


# -- 1. bursts --------------------------------------------------------------------------
@dataclass
class Burst:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: list[float] = field(default_factory=list)
    max_waiting: list[int] = field(default_factory=list)  # per simulator, the most of every burst
    samples: list[list[int]] = field(default_factory=list)  # per simulator, every reading of `waiting`
    queued: list[float] = field(default_factory=list)  # per simulator: seconds requests waited inside it, together

    def add(self, other: Burst) -> None:
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.errors += other.errors
        self.seconds += other.seconds
        self.max_waiting = (
            [max(a, b) for a, b in zip(self.max_waiting, other.max_waiting, strict=True)] if self.max_waiting else other.max_waiting
        )
        self.samples = [a + b for a, b in zip(self.samples, other.samples, strict=True)] if self.samples else other.samples
        self.queued = [a + b for a, b in zip(self.queued, other.queued, strict=True)] if self.queued else other.queued

    @property
    def mean_waiting(self) -> float:
        """The simulators' `waiting`, averaged over the readings, summed over the simulators."""
        return sum(statistics.fmean(readings) for readings in self.samples if readings)

    def waited_inside_ms(self) -> float:
        """Mean time a request spent in a simulator's own waiting queue."""
        return 1000 * sum(self.queued) / max(1, len(self.latencies) + self.errors)


async def one_stream(session: aiohttp.ClientSession, url: str, max_tokens: int, result: Burst) -> None:
    body = {"model": MODEL, "prompt": "Say something about queues.", "max_tokens": max_tokens, "stream": True}
    started, first = time.perf_counter(), None
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                await response.read()
                result.errors += 1
                return
            async for _ in response.content.iter_any():
                first = first if first is not None else time.perf_counter() - started
    except (aiohttp.ClientError, TimeoutError):
        result.errors += 1
        return
    result.latencies.append(time.perf_counter() - started)
    result.ttfts.append(first if first is not None else result.latencies[-1])


async def sample_waiting(session: aiohttp.ClientSession, sims: list[str], result: Burst, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for index, url in enumerate(sims):
            async with session.get(url + "/sim/state") as response:
                waiting = (await response.json())["waiting"]
            result.max_waiting[index] = max(result.max_waiting[index], waiting)
            result.samples[index].append(waiting)
        await asyncio.sleep(SAMPLE_EVERY_S)


def queue_seconds(url: str) -> float:
    """vLLM's `request_queue_time_seconds` sum: seconds requests spent waiting inside it."""
    text = http("GET", url + "/metrics")[1].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_queue_time_seconds_sum"))


async def burst(router: str, sims: list[str], lengths: list[int]) -> Burst:
    result = Burst(max_waiting=[0] * len(sims), samples=[[] for _ in sims])
    before = [queue_seconds(url) for url in sims]
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_waiting(session, sims, result, stop))
        started = time.perf_counter()
        await asyncio.gather(*(one_stream(session, router, length, result) for length in lengths))
        result.seconds.append(time.perf_counter() - started)
        stop.set()
        await sampler
    result.queued = [queue_seconds(url) - start for url, start in zip(sims, before, strict=True)]
    return result


def run_bursts(procs: Processes, cluster: Cluster, bursts: int, rng: random.Random) -> dict[str, Burst]:
    sims = [start_sim(procs, f"{cluster.name}-sim{i}", spec.slots, spec.tokens_per_s) for i, spec in enumerate(cluster.sims)]
    entries = [f'{{ url = "{url}", max_concurrent_requests = {spec.slots} }}' for url, spec in zip(sims, cluster.sims, strict=True)]
    routers = {
        "queue": start_mvtui(procs, f"{cluster.name}-queue", entries),
        "no queue": start_mvtui(procs, f"{cluster.name}-push", entries, "queue = false"),
    }
    results = {name: Burst() for name in routers}
    for number in range(bursts):
        lengths = [rng.randint(*cluster.lengths) for _ in range(BURST)]
        order = list(routers) if number % 2 == 0 else list(reversed(routers))
        for name in order:  # the same requests through each, taking turns
            wait_idle(sims)
            results[name].add(asyncio.run(burst(routers[name], sims, lengths)))
            print(f"  {cluster.name} burst {number + 1}, {name}: {results[name].seconds[-1]:.1f} s", file=sys.stderr)
    return results


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def burst_table(results: dict[str, dict[str, Burst]]) -> list[str]:
    rows = [
        "| cluster | router | requests | errors | mean latency s | p99 latency s | mean TTFT s | p99 TTFT s | burst s "
        "| sims' waiting: most (each sim) | sims' waiting: mean (all) | time waited inside a sim, mean ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for cluster, by_router in results.items():
        for name, r in by_router.items():
            rows.append(
                f"| {cluster} | mvtui, {name} | {len(r.latencies) + r.errors} | {r.errors} | {statistics.fmean(r.latencies):.2f} "
                f"| {percentile(r.latencies, 0.99):.2f} | {statistics.fmean(r.ttfts):.2f} | {percentile(r.ttfts, 0.99):.2f} "
                f"| {statistics.fmean(r.seconds):.2f} | {' / '.join(map(str, r.max_waiting))} | {r.mean_waiting:.1f} | {r.waited_inside_ms():.0f} |"
            )
    return rows


def burst_checks(results: dict[str, dict[str, Burst]]) -> list[str]:
    lines = []
    for cluster, by_router in results.items():
        queued, pushed = by_router["queue"], by_router["no queue"]
        lower = 1 - percentile(queued.latencies, 0.99) / percentile(pushed.latencies, 0.99)
        lines.append(
            f"- {cluster}: with the queue the simulators held {queued.mean_waiting:.1f} requests waiting on average (without: "
            f"{pushed.mean_waiting:.0f}), each request waited {queued.waited_inside_ms():.0f} ms inside one (without: "
            f"{pushed.waited_inside_ms():.0f} ms); p99 latency {100 * lower:.0f} % lower than without (target ≥ 30 %): "
            f"{'met' if lower >= 0.30 else 'not met'}"
        )
    return lines


# -- 2. parity --------------------------------------------------------------------------
def load(url: str, concurrency: int, duration: float) -> dict:
    argv = [sys.executable, str(HERE / "load.py"), "--url", url, "--concurrency", str(concurrency), "--duration", str(duration)]
    argv += ["--warmup", "1", "--max-tokens", "32", "--model", MODEL]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120, check=True)
    return json.loads(done.stdout)


def run_parity(procs: Processes, rounds: int, duration: float) -> list[str]:
    sim = start_sim(procs, "parity-sim", 64, 100)
    targets = {
        "direct": sim,
        "mvtui, default settings": start_mvtui(procs, "parity-default", [f'{{ url = "{sim}" }}']),
        "mvtui, max_concurrent_requests = 64": start_mvtui(procs, "parity-64", [f'{{ url = "{sim}", max_concurrent_requests = 64 }}']),
    }
    runs: dict[str, list[dict]] = {name: [] for name in targets}
    for number in range(rounds):
        names = list(targets)
        for name in names[number % len(names) :] + names[: number % len(names)]:
            wait_idle([sim])
            runs[name].append(load(targets[name], 64, duration))
    direct = statistics.fmean(run["rps"] for run in runs["direct"])
    rows = ["| target | req/s | vs direct | p50 ms | p99 ms | errors |", "|---|--:|--:|--:|--:|--:|"]
    for name, done in runs.items():
        rps = statistics.fmean(run["rps"] for run in done)
        p50 = statistics.fmean(run["p50_ms"] for run in done)
        p99 = max(run["p99_ms"] for run in done)
        rows.append(f"| {name} | {rps:.0f} | {100 * rps / direct:.0f}% | {p50:.0f} | {p99:.0f} | {sum(run['errors'] for run in done)} |")
    return rows


# -- 3. a failing server ------------------------------------------------------------------
async def fixed_count(url: str, total: int, concurrency: int) -> int:
    """`total` plain requests over `concurrency` connections; the number that failed."""
    failed, left = 0, iter(range(total))
    body = {"model": MODEL, "prompt": "ok?", "max_tokens": 4}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        for _ in left:
            async with session.post(url + "/v1/completions", json=body) as response:
                await response.read()
                failed += response.status != 200

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failed


def run_failing(procs: Processes, total: int) -> list[str]:
    sims = [start_sim(procs, f"failing-{i}", 32, 2000) for i in range(3)]
    entries = [f'{{ url = "{url}", max_concurrent_requests = 32 }}' for url in sims]
    rows = [
        "| router | client requests | upstream attempts | attempts per request | to the failing server | client errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name, router in (("breaker (default)", ""), ("breaker = false", "breaker = false")):
        url = start_mvtui(procs, "failing-" + ("breaker-off" if router else "breaker"), entries, router)
        http("POST", sims[0] + "/sim/faults", {"fail_rate": 1.0})  # the first one fails everything from now on
        before = [sim_state(sim)["received"] for sim in sims]
        errors = asyncio.run(fixed_count(url, total, 16))
        received = [sim_state(sim)["received"] - start for sim, start in zip(sims, before, strict=True)]
        rows.append(f"| mvtui, {name} | {total} | {sum(received)} | {sum(received) / total:.3f} | {received[0]} | {errors} |")
        http("POST", sims[0] + "/sim/faults", {"fail_rate": 0.0})  # the next router finds all three up
    return rows


# -- the report ---------------------------------------------------------------------------
def report(args: argparse.Namespace, bursts: dict[str, dict[str, Burst]], parity: list[str], failing: list[str], took: float) -> str:
    import aiohttp as client

    lines = [
        f"## Overload ({time.strftime('%Y-%m-%d %H:%M:%S')}, {took:.0f} s)",
        "",
        f"- machine: {subprocess.check_output(['nproc']).decode().strip()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, aiohttp {client.__version__}; every process on 127.0.0.1, sharing the cores",
        f"- `.venv/bin/python benchmarks/overload_bench.py --bursts {args.bursts} --rounds {args.rounds} --duration {args.duration:g} --failing {args.failing}`",
        "",
        f"### Bursts of {BURST} streamed requests onto 48 slots ({args.bursts} per setting, pooled)",
        "",
        "mixed: simulators of 24 and 16 slots at 100 tokens/s and 8 slots at 50 tokens/s, answers of 8 to 64 tokens; "
        "uniform: 3 x 16 slots at 100 tokens/s, 32 tokens. Each server's max_concurrent_requests is its slots; "
        "--ttft-ms 20. Sims' waiting: each simulator's `waiting` read every 20 ms during the bursts (the most, "
        "and the mean of all readings summed over the simulators); time waited inside: vLLM's `request_queue_time_seconds`.",
        "",
        *burst_table(bursts),
        "",
        *burst_checks(bursts),
        "",
        f"### Throughput at concurrency 64 onto one simulator with --max-num-seqs 64 ({args.rounds} rounds of {args.duration:g} s)",
        "",
        "/v1/completions, 32 tokens at 100 tokens/s each (about 0.34 s a request), closed loop (benchmarks/load.py).",
        "",
        *parity,
        "",
        f"### A server failing every request, beside two healthy ones ({args.failing} requests, concurrency 16)",
        "",
        *failing,
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=3, help="bursts per cluster and setting")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per target in the throughput part")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per round in the throughput part")
    parser.add_argument("--failing", type=int, default=600, help="requests per setting in the failing-server part")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "overload.md")
    return parser.parse_args()


def in_processes(work: Callable[[Processes], object]) -> object:
    with tempfile.TemporaryDirectory(prefix="mvtui-overload-") as folder:
        procs = Processes(Path(folder))
        try:
            return work(procs)
        finally:
            procs.stop_all()


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    rng = random.Random(args.seed)
    bursts = {cluster.name: in_processes(lambda procs, c=cluster: run_bursts(procs, c, args.bursts, rng)) for cluster in CLUSTERS}  # type: ignore[misc]
    parity = in_processes(lambda procs: run_parity(procs, args.rounds, args.duration))
    failing = in_processes(lambda procs: run_failing(procs, args.failing))
    text = report(args, bursts, parity, failing, time.monotonic() - started)  # type: ignore[arg-type]
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
