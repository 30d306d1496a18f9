"""Routing quality: how good mvtui's choice of server is, against an oracle and vllm-router.

Heterogeneous cluster: three `mvtui sim` processes, A (4 slots, 50 tokens/s), B (8, 100) and
C (16, 200), each with a TTFT of 4 token intervals; streamed chat completions whose max_tokens
is spread evenly over 16..256 (the simulator generates exactly that many). Four open-loop
workloads, each a fixed seeded request list that every row gets alike:

  steady         Poisson arrivals at 70 % of the cluster's capacity
  bursts         100 requests at once, the next burst once the cluster drained
  slowdown       steady, and C slowed 3x (POST /sim/faults {"slow": 3}) in the middle third
  second-client  steady at 70 % of the capacity the routers have left, while a second client
                 holds 10 closed-loop streams on C directly

Rows: mvtui (`balanced`, `fastest`), the oracle (benchmarks/oracle_router.py: it knows the true
speeds, the slow-down and the second client, and queues centrally), vllm-router
(`power_of_two`, `cache_aware`) from benchmarks/.venv-vllm-router when it is there.

Multi-turn: three equal simulators (8 slots, 100 tokens/s, 0.5 ms of prefill per uncached
prompt token, before --scale); conversations with a shared system prompt and a growing history, fresh
simulators per row. Rows: mvtui `fastest` with affinity off and on, `balanced` with affinity
off, vllm-router `cache_aware`. Figures: TTFT, end-to-end time, prefix-cache hit rate.

`--scale` multiplies every token interval, TTFT and prefill cost (and divides the rates): the
full run uses 2, because at 1 the two cores of the development machine ran 75-95 % busy and
the oracle's requests took 15-20 % longer on their server than the simulator's settings say
in the bursts (at 2: 1-6 %). The report repeats that check for its own run (lone requests,
and the oracle's time on the server over the simulator's promise). --quick runs at 1 to be
short. Rows run one after another, each router alone, after an unmeasured warm-up (what a
long-running router has learned). Every process runs in its own process group on 127.0.0.1
and is stopped by that group at the end.

    .venv/bin/python benchmarks/routing_quality.py --quick       # smoke check, ~4 minutes
    .venv/bin/python benchmarks/routing_quality.py               # the full run, ~21 minutes
    .venv/bin/python benchmarks/routing_quality.py --rows fastest oracle --workloads steady bursts
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.router_bench import VLLM_ROUTER, Processes, Started, child_env, http, vllm_router_version, wait_ready  # noqa: E402
from tests.helpers import free_port  # noqa: E402

RESULTS = HERE / "results"
MODEL = "bench"
MIN_TOKENS, MAX_TOKENS = 16, 256
STEADY_LOAD = 0.70
SLOW_FACTOR = 3.0
SECOND_CLIENT_STREAMS = 10
REQUEST_TIMEOUT_S = 600.0
IDLE_TIMEOUT_S = 180.0
METRICS_INTERVAL_S = 0.2
HETERO_WORKLOADS = ("steady", "bursts", "slowdown", "second-client")
WORKLOADS = (*HETERO_WORKLOADS, "multi-turn")
WORDS = (
    "router cluster server token cache prefix latency queue stream model batch decode prefill slot "
    "request answer history system user prompt metric speed client budget policy affinity oracle"
).split()


# -- what runs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SimSpec:
    name: str
    slots: int
    tokens_per_s: float
    ttft_ms: float
    prompt_ms_per_token: float = 0.0
    kv_blocks: int = 4096
    max_model_len: int = 4096

    def scaled(self, scale: float) -> SimSpec:
        return SimSpec(
            self.name,
            self.slots,
            self.tokens_per_s / scale,
            self.ttft_ms * scale,
            self.prompt_ms_per_token * scale,
            self.kv_blocks,
            self.max_model_len,
        )

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.tokens_per_s

    def service_s(self, tokens: float, slow: float = 1.0) -> float:
        return (self.ttft_ms + tokens * self.interval_ms) * slow / 1000.0


HETERO = (SimSpec("A", 4, 50.0, 80.0), SimSpec("B", 8, 100.0, 40.0), SimSpec("C", 16, 200.0, 20.0))
EQUAL = tuple(SimSpec(name, 8, 100.0, 20.0, 0.5, kv_blocks=32768, max_model_len=16384) for name in ("M1", "M2", "M3"))


@dataclass(frozen=True)
class RowSpec:
    key: str
    name: str
    kind: str  # "mvtui", "oracle" or "vllm-router"
    policy: str = ""
    affinity: bool | None = None  # None: the config leaves it at mvtui's default


HETERO_ROWS = (
    RowSpec("balanced", "mvtui balanced", "mvtui", "balanced"),
    RowSpec("fastest", "mvtui fastest", "mvtui", "fastest"),
    RowSpec("fastest-no-affinity", "mvtui fastest, affinity off", "mvtui", "fastest", False),
    RowSpec("oracle", "oracle", "oracle"),
    RowSpec("vllm-power_of_two", "vllm-router power_of_two", "vllm-router", "power_of_two"),
    RowSpec("vllm-cache_aware", "vllm-router cache_aware", "vllm-router", "cache_aware"),
)
MULTI_ROWS = (
    RowSpec("fastest", "mvtui fastest, affinity off", "mvtui", "fastest", False),
    RowSpec("fastest", "mvtui fastest, affinity on", "mvtui", "fastest", True),
    RowSpec("balanced", "mvtui balanced, affinity off", "mvtui", "balanced", False),
    RowSpec("vllm-cache_aware", "vllm-router cache_aware", "vllm-router", "cache_aware"),
)
ROW_KEYS = tuple(row.key for row in HETERO_ROWS)


@dataclass(frozen=True)
class Sizes:
    steady_s: float  # seconds of arrivals in the steady, slowdown and second-client workloads
    warmup_s: float  # seconds of unmeasured steady load on each router before its first cell
    bursts: int
    burst_size: int
    conversations: int
    turns: int
    stagger_s: float  # between two conversations' starts
    pause_s: tuple[float, float]  # a user's pause between an answer and the next question
    scale: float  # the default --scale


QUICK = Sizes(steady_s=4.0, warmup_s=2.0, bursts=1, burst_size=40, conversations=8, turns=3, stagger_s=0.3, pause_s=(0.3, 0.6), scale=1.0)
FULL = Sizes(steady_s=25.0, warmup_s=6.0, bursts=3, burst_size=100, conversations=50, turns=8, stagger_s=0.8, pause_s=(1.0, 2.0), scale=2.0)


@dataclass
class RunningSim:
    spec: SimSpec
    url: str
    entry: Started


@dataclass
class Target:
    row: RowSpec
    url: str | None = None
    entry: Started | None = None
    unavailable: str | None = None


# -- processes -----------------------------------------------------------------------------
def answers_chat(url: str) -> bool:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 1}
    status, _ = http("POST", url + "/v1/chat/completions", body, timeout=5.0)
    return status == 200


def start_sims(procs: Processes, specs: tuple[SimSpec, ...], seed: int, tag: str) -> list[RunningSim]:
    sims = []
    for spec in specs:
        port = free_port()
        argv = [sys.executable, "-m", "mvtui", "sim", "--port", str(port), "--model", MODEL, "--seed", str(seed)]
        argv += ["--max-num-seqs", str(spec.slots), "--tokens-per-s", f"{spec.tokens_per_s:g}", "--ttft-ms", f"{spec.ttft_ms:g}"]
        argv += ["--prompt-ms-per-token", f"{spec.prompt_ms_per_token:g}", "--kv-blocks", str(spec.kv_blocks)]
        argv += ["--max-model-len", str(spec.max_model_len)]
        entry = procs.start(f"sim-{tag}-{spec.name}", argv, child_env(procs.logs, {}))
        sims.append(RunningSim(spec, f"http://127.0.0.1:{port}", entry))
    for sim in sims:
        wait_ready(sim.entry, sim.url, answers_chat)
    return sims


def mvtui_config(path: Path, sims: list[RunningSim], row: RowSpec) -> Path:
    servers = ",\n".join(f'  {{ url = "{s.url}", max_concurrent_requests = {s.spec.slots}, name = "{s.spec.name}" }}' for s in sims)
    router = [f'policy = "{row.policy}"', "queue = true"]
    if row.affinity is not None:
        router.append(f"affinity = {'true' if row.affinity else 'false'}")
    path.write_text(
        f"[servers]\nservers = [\n{servers}\n]\n\n[config]\nmetrics_interval = {METRICS_INTERVAL_S}\n\n"
        f"[router]\n" + "\n".join(router) + "\n\n[admin]\nport = 0\n"
    )
    return path


def mvtui_sees_all(count: int) -> Callable[[str], bool]:
    def check(url: str) -> bool:
        status, body = http("GET", url + "/load-stats")
        return status == 200 and json.loads(body).get("healthy_servers") == count and answers_chat(url)

    return check


def start_target(procs: Processes, row: RowSpec, sims: list[RunningSim], tag: str) -> Target:
    """Start the row's router; a router that cannot start makes the row unavailable, not the run fail."""
    if row.kind == "vllm-router" and not VLLM_ROUTER.exists():
        return Target(row, unavailable=f"skipped: {VLLM_ROUTER.relative_to(REPO)} is missing (see router_bench.py)")
    port = free_port()
    name = f"{tag}-{row.name.replace(' ', '_').replace(',', '')}"
    if row.kind == "mvtui":
        config = mvtui_config(procs.logs / f"{name}.toml", sims, row)
        argv = [sys.executable, "-m", "mvtui", "--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
        check = mvtui_sees_all(len(sims))
    elif row.kind == "oracle":
        argv = [sys.executable, str(HERE / "oracle_router.py"), "--port", str(port)]
        for sim in sims:
            argv += ["--server", sim.url, str(sim.spec.slots), f"{sim.spec.ttft_ms:g}", f"{sim.spec.interval_ms:g}"]
        check = answers_chat
    else:
        argv = [str(VLLM_ROUTER), "--host", "127.0.0.1", "--port", str(port), "--policy", row.policy, "--log-level", "warning"]
        argv += ["--prometheus-port", str(free_port()), "--worker-urls", *[sim.url for sim in sims]]
        check = answers_chat
    entry = procs.start(name, argv, child_env(procs.logs, {"MVTUI_LOOP": "asyncio"}))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(entry, url, check)
    except RuntimeError as error:
        procs.stop(entry)
        return Target(row, unavailable=f"did not start: {str(error).splitlines()[0]}; log: {last_problem(entry)}")
    return Target(row, url, entry)


def last_problem(entry: Started) -> str:
    lines = [line for line in entry.tail(40).splitlines() if line.strip()]
    problems = [line for line in lines if any(word in line.lower() for word in ("error", "invalid", "unknown", "must be"))]
    return (problems or lines or ["(empty)"])[-1].strip()[:300]


def sim_state(sim: RunningSim) -> dict[str, Any]:
    status, body = http("GET", sim.url + "/sim/state")
    if status != 200:
        raise RuntimeError(f"{sim.spec.name}: /sim/state answered {status}")
    return json.loads(body)


def wait_idle(sims: list[RunningSim]) -> None:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        states = [sim_state(sim) for sim in sims]
        if all(state["running"] == 0 and state["waiting"] == 0 for state in states):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the simulators did not drain within {IDLE_TIMEOUT_S:g} s")


def finished_counts(sims: list[RunningSim]) -> dict[str, int]:
    return {sim.spec.name: sim_state(sim)["finished"] for sim in sims}


def prefix_counters(sims: list[RunningSim]) -> tuple[float, float]:
    """Prefix-cache (hits, queries) in tokens, summed over the simulators' /metrics."""
    hits = queries = 0.0
    for sim in sims:
        _, body = http("GET", sim.url + "/metrics")
        for line in body.decode().splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name == "vllm:prefix_cache_hits_total":
                hits += float(line.rsplit(" ", 1)[1])
            elif name == "vllm:prefix_cache_queries_total":
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def cpu_ticks() -> tuple[int, int]:
    """(all, idle) jiffies of the machine."""
    values = [int(part) for part in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values), values[3] + values[4]


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[0] - before[0]
    return 1.0 - (after[1] - before[1]) / total if total else 0.0


# -- requests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    offset_s: float
    max_tokens: int
    text: str

    def payload(self) -> dict[str, Any]:
        return {"model": MODEL, "messages": [{"role": "user", "content": self.text}], "max_tokens": self.max_tokens, "stream": True}


@dataclass
class Outcome:
    latency_s: float | None = None
    ttft_s: float | None = None
    error: str | None = None
    server: str | None = None  # the oracle says where it sent it
    wait_ms: float | None = None  # and how long it waited in its queue
    max_tokens: int = 0
    answer: str = ""


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def planned(rng: random.Random, offset: float, index: int) -> Planned:
    return Planned(offset, rng.randint(MIN_TOKENS, MAX_TOKENS), f"Request {index}: {words(rng, 10)}")


def poisson(rng: random.Random, rate: float, duration: float) -> list[Planned]:
    plan, offset = [], rng.expovariate(rate)
    while offset < duration:
        plan.append(planned(rng, offset, len(plan)))
        offset += rng.expovariate(rate)
    return plan


def capacity_rps(specs: tuple[SimSpec, ...], busy: dict[str, int] | None = None) -> float:
    """Requests per second the servers complete when full: slots over the mean service time."""
    mean_tokens = (MIN_TOKENS + MAX_TOKENS) / 2
    busy = busy or {}
    return sum((spec.slots - busy.get(spec.name, 0)) / spec.service_s(mean_tokens) for spec in specs)


async def stream_chat(session: aiohttp.ClientSession, url: str, payload: dict[str, Any], start: float, keep: bool = False) -> Outcome:
    """One streamed chat completion; latency and TTFT counted from `start` (its planned time)."""
    outcome = Outcome(max_tokens=payload["max_tokens"])
    chunks: list[bytes] = []
    try:
        async with session.post(url + "/v1/chat/completions", json=payload) as response:
            if response.status != 200:
                outcome.error = f"HTTP {response.status}: {(await response.read())[:120]!r}"
                return outcome
            outcome.server = response.headers.get("x-oracle-server")
            wait = response.headers.get("x-oracle-wait-ms")
            outcome.wait_ms = float(wait) if wait else None
            tail = b""
            async for chunk in response.content.iter_any():
                if outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - start
                tail = (tail + chunk)[-200:]
                if keep or b'"error"' in chunk:
                    chunks.append(chunk)
    except (TimeoutError, aiohttp.ClientError) as error:
        outcome.error = f"{type(error).__name__}: {error}"
        return outcome
    outcome.latency_s = time.perf_counter() - start
    body = b"".join(chunks)
    if b'"error"' in body or not tail.rstrip().endswith(b"data: [DONE]"):
        outcome.error = f"bad stream end: {tail[-120:]!r}"
    elif keep:
        outcome.answer = answer_text(body)
    return outcome


def answer_text(body: bytes) -> str:
    parts = []
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.perf_counter()))


async def open_loop(session: aiohttp.ClientSession, url: str, plan: list[Planned], start: float) -> list[Outcome]:
    async def one(item: Planned) -> Outcome:
        await sleep_until(start + item.offset_s)
        return await stream_chat(session, url, item.payload(), start + item.offset_s)

    return list(await asyncio.gather(*(one(item) for item in plan)))


async def post_json(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"POST {url} answered {response.status}: {(await response.read())[:200]!r}")


# -- workloads -----------------------------------------------------------------------------
@dataclass
class Context:
    """What one cell runs against, and the plans every row shares."""

    target: Target
    sims: list[RunningSim]
    plans: dict[str, Any]
    sizes: Sizes
    side_completed: int = 0  # the second client's requests, kept out of the routers' shares


async def run_steady(session: aiohttp.ClientSession, ctx: Context) -> list[Outcome]:
    assert ctx.target.url is not None
    return await open_loop(session, ctx.target.url, ctx.plans["steady"], time.perf_counter())


async def run_bursts(session: aiohttp.ClientSession, ctx: Context) -> list[Outcome]:
    assert ctx.target.url is not None
    outcomes: list[Outcome] = []
    for burst in ctx.plans["bursts"]:
        outcomes += await open_loop(session, ctx.target.url, burst, time.perf_counter())
        await asyncio.to_thread(wait_idle, ctx.sims)
        await asyncio.sleep(0.5)
    return outcomes


async def set_slow(session: aiohttp.ClientSession, ctx: Context, sim: RunningSim, slow: float) -> None:
    await post_json(session, sim.url + "/sim/faults", {"slow": slow})
    if ctx.target.row.kind == "oracle" and ctx.target.url is not None:
        await post_json(session, ctx.target.url + "/oracle/slow", {"url": sim.url, "slow": slow})


async def run_slowdown(session: aiohttp.ClientSession, ctx: Context) -> list[Outcome]:
    assert ctx.target.url is not None
    fast, duration = ctx.sims[-1], ctx.sizes.steady_s
    start = time.perf_counter()

    async def fault() -> None:
        await sleep_until(start + duration / 3)
        await set_slow(session, ctx, fast, SLOW_FACTOR)
        await sleep_until(start + 2 * duration / 3)
        await set_slow(session, ctx, fast, 1.0)

    faulting = asyncio.create_task(fault())
    try:
        return await open_loop(session, ctx.target.url, ctx.plans["slowdown"], start)
    finally:
        faulting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await faulting
        await set_slow(session, ctx, fast, 1.0)


async def second_client(session: aiohttp.ClientSession, url: str, seed: int, stop: asyncio.Event) -> int:
    """One closed-loop stream after another straight to the simulator until `stop`."""
    rng, done = random.Random(seed), 0
    while not stop.is_set():
        item = planned(rng, 0.0, done)
        outcome = await stream_chat(session, url, item.payload(), time.perf_counter())
        done += outcome.error is None
    return done


async def set_external(session: aiohttp.ClientSession, ctx: Context, sim: RunningSim, busy: int) -> None:
    if ctx.target.row.kind == "oracle" and ctx.target.url is not None:
        await post_json(session, ctx.target.url + "/oracle/external", {"url": sim.url, "busy": busy})


async def run_second_client(session: aiohttp.ClientSession, ctx: Context) -> list[Outcome]:
    assert ctx.target.url is not None
    fast, stop = ctx.sims[-1], asyncio.Event()
    await set_external(session, ctx, fast, SECOND_CLIENT_STREAMS)
    side = [asyncio.create_task(second_client(session, fast.url, 1000 + index, stop)) for index in range(SECOND_CLIENT_STREAMS)]
    try:
        await asyncio.sleep(1.0)  # the second client's streams are running before the first routed request
        return await open_loop(session, ctx.target.url, ctx.plans["second-client"], time.perf_counter())
    finally:
        stop.set()
        ctx.side_completed = sum(await asyncio.gather(*side))
        await set_external(session, ctx, fast, 0)


RUNNERS: dict[str, Callable[[aiohttp.ClientSession, Context], Awaitable[list[Outcome]]]] = {
    "steady": run_steady,
    "bursts": run_bursts,
    "slowdown": run_slowdown,
    "second-client": run_second_client,
}


def hetero_plans(args: argparse.Namespace, specs: tuple[SimSpec, ...]) -> dict[str, Any]:
    sizes: Sizes = args.sizes
    full = capacity_rps(specs)
    left = capacity_rps(specs, {specs[-1].name: SECOND_CLIENT_STREAMS})
    rate = STEADY_LOAD * full
    bursts_rng = random.Random(args.seed + 2)
    return {
        "rates": {"steady": rate, "slowdown": rate, "second-client": STEADY_LOAD * left, "capacity": full, "capacity_left": left},
        "warmup": poisson(random.Random(args.seed), rate, sizes.warmup_s),
        "steady": poisson(random.Random(args.seed + 1), rate, sizes.steady_s),
        "bursts": [[planned(bursts_rng, 0.0, i) for i in range(sizes.burst_size)] for _ in range(sizes.bursts)],
        "slowdown": poisson(random.Random(args.seed + 3), rate, sizes.steady_s),
        "second-client": poisson(random.Random(args.seed + 4), STEADY_LOAD * left, sizes.steady_s),
    }


# -- figures -------------------------------------------------------------------------------
def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def latency_figures(outcomes: list[Outcome]) -> dict[str, Any]:
    good = [o for o in outcomes if o.error is None and o.latency_s is not None]
    latencies = [o.latency_s for o in good if o.latency_s is not None]
    ttfts = [o.ttft_s for o in good if o.ttft_s is not None]
    errors = [o.error for o in outcomes if o.error is not None]
    return {
        "requests": len(outcomes),
        "errors": len(errors),
        "error_samples": errors[:3],
        "mean_s": mean(latencies),
        "p50_s": percentile(latencies, 0.50),
        "p99_s": percentile(latencies, 0.99),
        "ttft_mean_s": mean(ttfts),
        "ttft_p99_s": percentile(ttfts, 0.99),
    }


def stretch(outcomes: list[Outcome], specs: dict[str, SimSpec]) -> list[float]:
    """The oracle's requests: time on the server over what the simulator's settings promise."""
    ratios = []
    for outcome in outcomes:
        spec = specs.get(outcome.server or "")
        if outcome.error is None and spec is not None and outcome.latency_s is not None and outcome.wait_ms is not None:
            ratios.append((outcome.latency_s - outcome.wait_ms / 1000) / spec.service_s(outcome.max_tokens))
    return ratios


@dataclass
class Cell:
    workload: str
    row: str
    figures: dict[str, Any] = field(default_factory=dict)
    shares: dict[str, int] = field(default_factory=dict)
    cpu_busy: float | None = None
    seconds: float | None = None
    stretch_mean: float | None = None
    stretch_p99: float | None = None
    unavailable: str | None = None


def measure_cell(session_run: Callable[[Context], list[Outcome]], ctx: Context, workload: str) -> Cell:
    counts, ticks, began = finished_counts(ctx.sims), cpu_ticks(), time.monotonic()
    outcomes = session_run(ctx)
    wait_idle(ctx.sims)
    after = finished_counts(ctx.sims)
    shares = {name: after[name] - counts[name] for name in counts}
    shares[ctx.sims[-1].spec.name] -= ctx.side_completed
    cell = Cell(workload, ctx.target.row.name, latency_figures(outcomes), shares, busy_share(ticks, cpu_ticks()), time.monotonic() - began)
    if ctx.target.row.kind == "oracle" and workload in ("steady", "bursts"):
        ratios = stretch(outcomes, {sim.url: sim.spec for sim in ctx.sims})
        cell.stretch_mean, cell.stretch_p99 = mean(ratios), percentile(ratios, 0.99)
    return cell


def in_loop(runner: Callable[[aiohttp.ClientSession, Context], Awaitable[list[Outcome]]]) -> Callable[[Context], list[Outcome]]:
    async def go(ctx: Context) -> list[Outcome]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            return await runner(session, ctx)

    return lambda ctx: asyncio.run(go(ctx))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def describe(cell: Cell) -> str:
    f = cell.figures
    return (
        f"{cell.workload:13} {cell.row:26} n={f['requests']:4} err={f['errors']} mean={fmt(f['mean_s'])} s "
        f"p99={fmt(f['p99_s'])} s ttft={fmt(f['ttft_mean_s'], 3)} s shares={cell.shares} cpu={100 * (cell.cpu_busy or 0):.0f}%"
    )


# -- the heterogeneous cluster -------------------------------------------------------------
def run_hetero(args: argparse.Namespace, procs: Processes, specs: tuple[SimSpec, ...]) -> tuple[list[Cell], dict[str, Any]]:
    workloads = [w for w in args.workloads if w in HETERO_WORKLOADS]
    rows = [row for row in HETERO_ROWS if row.key in args.rows]
    if not workloads or not rows:
        return [], {}
    sims = start_sims(procs, specs, args.seed, "hetero")
    plans = hetero_plans(args, specs)
    setup = {"lone": lone_checks(procs, sims), "rates": plans["rates"]}
    cells = []
    for row in rows:
        target = start_target(procs, row, sims, "hetero")
        if target.unavailable:
            log(f"{row.name}: {target.unavailable}")
            cells += [Cell(w, row.name, unavailable=target.unavailable) for w in workloads]
            continue
        try:
            cells += run_row(target, sims, plans, args.sizes, workloads)
        finally:
            if target.entry is not None:
                procs.stop(target.entry)
    return cells, setup


def run_row(target: Target, sims: list[RunningSim], plans: dict[str, Any], sizes: Sizes, workloads: list[str]) -> list[Cell]:
    warm = Context(target, sims, {"steady": plans["warmup"]}, sizes)
    in_loop(run_steady)(warm)  # unmeasured: what a long-running router has learned
    wait_idle(sims)
    cells = []
    for workload in workloads:
        cell = measure_cell(in_loop(RUNNERS[workload]), Context(target, sims, plans, sizes), workload)
        log(describe(cell))
        cells.append(cell)
    return cells


def lone_checks(procs: Processes, sims: list[RunningSim], tokens: int = 128) -> list[dict[str, Any]]:
    """One request alone to each simulator directly, and one through a fresh oracle: the measured
    time against TTFT + tokens x interval (the oracle sends a lone request to the fastest)."""
    checks = []
    oracle = start_target(procs, RowSpec("oracle", "oracle-lone", "oracle"), sims, "lone")
    targets = [(sim.spec.name + " direct", sim.url, sim.spec) for sim in sims]
    if oracle.url is not None:
        targets.append((f"oracle -> {sims[-1].spec.name}", oracle.url, sims[-1].spec))
    for name, url, spec in targets:
        outcome = asyncio.run(lone_request(url, tokens))
        expected = spec.service_s(tokens)
        checks.append({"target": name, "measured_s": outcome.latency_s, "expected_s": expected, "error": outcome.error})
    if oracle.entry is not None:
        procs.stop(oracle.entry)
    return checks


async def lone_request(url: str, tokens: int) -> Outcome:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        return await stream_chat(session, url, Planned(0.0, tokens, "lone request").payload(), time.perf_counter())


# -- multi-turn ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Conversation:
    start_s: float
    questions: tuple[str, ...]
    answer_tokens: tuple[int, ...]
    pauses_s: tuple[float, ...]


def conversations(seed: int, sizes: Sizes) -> tuple[str, list[Conversation]]:
    rng = random.Random(seed + 10)
    system = "You are a helpful assistant for cluster operators. " + words(rng, 220)
    plan = []
    for index in range(sizes.conversations):
        questions = tuple(f"Question {turn} of chat {index}: {words(rng, rng.randint(24, 40))}?" for turn in range(sizes.turns))
        tokens = tuple(rng.randint(32, 96) for _ in range(sizes.turns))
        pauses = tuple(rng.uniform(*sizes.pause_s) for _ in range(sizes.turns))
        plan.append(Conversation(index * sizes.stagger_s, questions, tokens, pauses))
    return system, plan


async def converse(session: aiohttp.ClientSession, url: str, system: str, chat: Conversation, start: float) -> list[Outcome]:
    await sleep_until(start + chat.start_s)
    history: list[dict[str, str]] = [{"role": "system", "content": system}]
    outcomes = []
    for question, tokens, pause in zip(chat.questions, chat.answer_tokens, chat.pauses_s, strict=True):
        history.append({"role": "user", "content": question})
        payload = {"model": MODEL, "messages": history, "max_tokens": tokens, "stream": True}
        outcome = await stream_chat(session, url, payload, time.perf_counter(), keep=True)
        outcomes.append(outcome)
        if outcome.error is not None:
            break
        history.append({"role": "assistant", "content": outcome.answer})
        await asyncio.sleep(pause)
    return outcomes


def run_multi_turn(args: argparse.Namespace, procs: Processes, specs: tuple[SimSpec, ...]) -> list[Cell]:
    rows = [row for row in MULTI_ROWS if row.key in args.rows]
    system, plan = conversations(args.seed, args.sizes)
    cells = []
    for index, row in enumerate(rows):
        sims = start_sims(procs, specs, args.seed, f"multi{index}")
        try:
            cells.append(multi_turn_cell(procs, row, sims, (system, plan), args.sizes, index))
        finally:
            for sim in sims:
                procs.stop(sim.entry)
    return cells


def multi_turn_cell(
    procs: Processes, row: RowSpec, sims: list[RunningSim], chats_plan: tuple[str, list[Conversation]], sizes: Sizes, index: int
) -> Cell:
    system, plan = chats_plan
    target = start_target(procs, row, sims, f"multi{index}")
    if target.unavailable or target.url is None:
        log(f"multi-turn {row.name}: {target.unavailable}")
        return Cell("multi-turn", row.name, unavailable=target.unavailable)
    url = target.url

    async def chats(session: aiohttp.ClientSession, ctx: Context) -> list[Outcome]:
        start = time.perf_counter()
        results = await asyncio.gather(*(converse(session, url, system, chat, start) for chat in plan))
        return [outcome for chat in results for outcome in chat]

    try:
        hits_before, queries_before = prefix_counters(sims)
        cell = measure_cell(in_loop(chats), Context(target, sims, {}, sizes), "multi-turn")
        hits, queries = prefix_counters(sims)
        cell.figures["hit_rate"] = (hits - hits_before) / (queries - queries_before) if queries > queries_before else None
        log(describe(cell) + f" hit={fmt(cell.figures['hit_rate'], 3)}")
        return cell
    finally:
        if target.entry is not None:
            procs.stop(target.entry)


# -- the report ----------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def hetero_table(cells: list[Cell], workload: str, names: list[str]) -> list[str]:
    rows = [c for c in cells if c.workload == workload]
    oracle = next((c.figures for c in rows if c.row == "oracle" and not c.unavailable), {})
    head = (
        "| row | requests | mean s | p99 s | mean / oracle | p99 / oracle | mean TTFT s | " + " | ".join(names) + " | errors | CPU busy |"
    )
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|" + "--:|" * len(names) + "--:|--:|"]
    for cell in rows:
        if cell.unavailable:
            lines.append(f"| {cell.row} | {cell.unavailable} |" + " |" * (8 + len(names)))
            continue
        f, total = cell.figures, sum(cell.shares.values()) or 1
        shares = " | ".join(f"{100 * cell.shares.get(name, 0) / total:.0f}%" for name in names)
        lines.append(
            f"| {cell.row} | {f['requests']} | {fmt(f['mean_s'])} | {fmt(f['p99_s'])} | {fmt(ratio(f['mean_s'], oracle.get('mean_s')))} "
            f"| {fmt(ratio(f['p99_s'], oracle.get('p99_s')))} | {fmt(f['ttft_mean_s'], 3)} | {shares} | {f['errors']} "
            f"| {100 * (cell.cpu_busy or 0):.0f}% |"
        )
    return lines


def multi_table(cells: list[Cell], names: list[str]) -> list[str]:
    head = "| row | requests | TTFT mean s | TTFT p99 s | end-to-end mean s | prefix-cache hit rate | " + " | ".join(names) + " | errors |"
    lines = [head, "|---|--:|--:|--:|--:|--:|" + "--:|" * len(names) + "--:|"]
    for cell in (c for c in cells if c.workload == "multi-turn"):
        if cell.unavailable:
            lines.append(f"| {cell.row} | {cell.unavailable} |" + " |" * (6 + len(names)))
            continue
        f, total = cell.figures, sum(cell.shares.values()) or 1
        shares = " | ".join(f"{100 * cell.shares.get(name, 0) / total:.0f}%" for name in names)
        hit = f.get("hit_rate")
        lines.append(
            f"| {cell.row} | {f['requests']} | {fmt(f['ttft_mean_s'], 3)} | {fmt(f['ttft_p99_s'], 3)} | {fmt(f['mean_s'])} "
            f"| {'–' if hit is None else f'{100 * hit:.1f}%'} | {shares} | {f['errors']} |"
        )
    return lines


def default_policy() -> str:
    try:
        from mvtui.config.schema import RouterConfig
    except ImportError:
        return "balanced"
    return str(RouterConfig().policy)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def figures_of(cells: list[Cell], workload: str, row: str) -> dict[str, Any] | None:
    cell = next((c for c in cells if c.workload == workload and c.row == row), None)
    return None if cell is None or cell.unavailable else cell.figures


def hetero_checks(cells: list[Cell], default: str) -> list[str]:
    lines, mine = [], f"mvtui {default}"
    for workload in HETERO_WORKLOADS:
        own, oracle = figures_of(cells, workload, mine), figures_of(cells, workload, "oracle")
        if own is None:
            continue
        if oracle is not None:
            m, p = ratio(own["mean_s"], oracle["mean_s"]), ratio(own["p99_s"], oracle["p99_s"])
            ok = None if m is None or p is None else m <= 1.15 and p <= 2.0
            lines.append(f"- {workload}: {mine} mean {fmt(m)}x the oracle's (≤ 1.15), p99 {fmt(p)}x (≤ 2): {verdict(ok)}")
        for row in (r for r in HETERO_ROWS if r.kind == "vllm-router"):
            other = figures_of(cells, workload, row.name)
            if other is None or other["mean_s"] is None or own["mean_s"] is None:
                continue
            ok = own["mean_s"] < other["mean_s"]
            lines.append(
                f"- {workload}: {mine} ahead of {row.name}: mean {fmt(own['mean_s'])} s against {fmt(other['mean_s'])} s "
                f"(p99 {fmt(own['p99_s'])} against {fmt(other['p99_s'])}): {verdict(ok)}"
            )
    return lines


def affinity_check(cells: list[Cell], default: str) -> list[str]:
    """Affinity is on by default: on single-turn traffic it must cost nothing."""
    own, off = figures_of(cells, "steady", f"mvtui {default}"), figures_of(cells, "steady", "mvtui fastest, affinity off")
    if own is None or off is None or own["mean_s"] is None or off["mean_s"] is None:
        return []
    ok = own["mean_s"] <= off["mean_s"]
    return [
        f"- steady: mvtui {default} (affinity on, the default) mean {fmt(own['mean_s'])} s against {fmt(off['mean_s'])} s "
        f"with affinity off (no worse): {verdict(ok)}"
    ]


def multi_checks(cells: list[Cell]) -> list[str]:
    on = figures_of(cells, "multi-turn", MULTI_ROWS[1].name)
    base = figures_of(cells, "multi-turn", MULTI_ROWS[2].name)
    if on is None:
        return []
    hit = on.get("hit_rate")
    lines = [f"- multi-turn: {MULTI_ROWS[1].name}: prefix-cache hit rate {fmt(None if hit is None else 100 * hit, 1)}% (≥ 80 %): "]
    lines[0] += verdict(None if hit is None else hit >= 0.80)
    if base is not None:
        gain = ratio(base["ttft_mean_s"], on["ttft_mean_s"])
        lines.append(
            f"- multi-turn: mean TTFT {fmt(on['ttft_mean_s'], 3)} s against {fmt(base['ttft_mean_s'], 3)} s for "
            f"{MULTI_ROWS[2].name}: {fmt(gain)}x lower (≥ 2x): {verdict(None if gain is None else gain >= 2.0)}"
        )
    return lines


def setup_lines(args: argparse.Namespace, setup: dict[str, Any], cells: list[Cell]) -> list[str]:
    import aiohttp as http_client

    sizes: Sizes = args.sizes
    hetero = ", ".join(
        f"{s.name} {s.slots} slots {s.interval_ms:g} ms/token TTFT {s.ttft_ms:g} ms" for s in (x.scaled(args.scale) for x in HETERO)
    )
    equal = EQUAL[0].scaled(args.scale)
    rates = setup.get("rates", {})
    lines = [
        f"- machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"aiohttp {http_client.__version__}, vllm-router {vllm_router_version() or 'absent'}; every process shares the cores",
        f"- scale factor {args.scale:g} (token intervals and TTFTs x{args.scale:g}, rates /{args.scale:g}); seed {args.seed}; "
        f"{'quick' if args.quick else 'full'} sizes",
        f"- heterogeneous sims: {hetero}; streamed chat, max_tokens uniform {MIN_TOKENS}..{MAX_TOKENS}, no stop strings",
        f"- capacity {fmt(rates.get('capacity'))} req/s; steady and slowdown at {fmt(rates.get('steady'))} req/s "
        f"({100 * STEADY_LOAD:.0f} %) for {sizes.steady_s:g} s; second-client at {fmt(rates.get('second-client'))} req/s "
        f"({100 * STEADY_LOAD:.0f} % of the {fmt(rates.get('capacity_left'))} req/s left beside {SECOND_CLIENT_STREAMS} "
        f"closed-loop streams on C); bursts: {sizes.bursts} x {sizes.burst_size} at once, each after the last drained; "
        f"slowdown: C x{SLOW_FACTOR:g} in the middle third",
        f"- each router gets {sizes.warmup_s:g} s of unmeasured steady load first; mvtui: max_concurrent_requests = slots, "
        f"queue on, metrics_interval {METRICS_INTERVAL_S} s; latency = planned send time to the stream's end; "
        "shares = requests each sim finished (its /sim/state), the second client's taken out",
        f"- multi-turn sims: 3 x {equal.slots} slots, {equal.interval_ms:g} ms/token, TTFT {equal.ttft_ms:g} ms + "
        f"{equal.prompt_ms_per_token:g} ms per uncached prompt token, {equal.kv_blocks} KV blocks (no eviction); "
        f"{sizes.conversations} conversations x {sizes.turns} turns, starts {sizes.stagger_s:g} s apart, "
        f"{sizes.pause_s[0]:g}-{sizes.pause_s[1]:g} s pauses, "
        "fresh sims per row",
    ]
    for check in setup.get("lone", []):
        lines.append(
            f"- lone request, 128 tokens, {check['target']}: {fmt(check['measured_s'], 3)} s against "
            f"{fmt(check['expected_s'], 3)} s expected{'; ' + check['error'] if check['error'] else ''}"
        )
    for cell in cells:
        if cell.stretch_mean is not None:
            lines.append(
                f"- CPU check, oracle {cell.workload}: time on the server / the sim's own service time: mean "
                f"{fmt(cell.stretch_mean, 3)}, p99 {fmt(cell.stretch_p99, 3)}; machine busy {100 * (cell.cpu_busy or 0):.0f} %"
            )
    return lines


def report(args: argparse.Namespace, setup: dict[str, Any], cells: list[Cell], seconds: float) -> str:
    default = default_policy()
    parts = [f"## Routing quality ({time.strftime('%Y-%m-%d %H:%M:%S')}, {seconds:.0f} s)", ""]
    parts += [f"`{args.command}`", "", *setup_lines(args, setup, cells), ""]
    names = [spec.name for spec in HETERO]
    for workload in (w for w in args.workloads if w in HETERO_WORKLOADS):
        parts += [f"### {workload}", "", *hetero_table(cells, workload, names), ""]
    if "multi-turn" in args.workloads:
        parts += ["### multi-turn", "", *multi_table(cells, [spec.name for spec in EQUAL]), ""]
    parts += [
        f"Targets (mvtui's default policy here: `{default}`):",
        *hetero_checks(cells, default),
        *affinity_check(cells, default),
        *multi_checks(cells),
    ]
    errors = [
        f"- {c.workload} / {c.row}: {c.figures['errors']} errors, e.g. {c.figures['error_samples'][:2]}"
        for c in cells
        if c.figures.get("errors")
    ]
    return "\n".join(parts + errors) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke check of a few minutes")
    parser.add_argument("--rows", nargs="+", default=list(ROW_KEYS), choices=ROW_KEYS)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale", type=float, help="multiplies every token interval and TTFT, divides the rates (default: 2, --quick: 1)")
    parser.add_argument("--output", type=Path, default=RESULTS / "routing.md")
    args = parser.parse_args()
    args.sizes = QUICK if args.quick else FULL
    args.scale = args.scale or args.sizes.scale
    args.command = " ".join([".venv/bin/python", "benchmarks/routing_quality.py", *map(shlex.quote, sys.argv[1:])])
    return args


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mvtui-routing-") as logs:
        procs = Processes(Path(logs))
        try:
            cells, setup = run_hetero(args, procs, tuple(spec.scaled(args.scale) for spec in HETERO))
            if "multi-turn" in args.workloads:
                cells += run_multi_turn(args, procs, tuple(spec.scaled(args.scale) for spec in EQUAL))
        finally:
            procs.stop_all()
    text = report(args, setup, cells, time.monotonic() - started)
    print(text)
    args.output.write_text(text)
    raw = {"command": args.command, "setup": setup, "sizes": asdict(args.sizes), "scale": args.scale, "cells": [asdict(c) for c in cells]}
    args.output.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
