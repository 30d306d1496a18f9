"""Router speed: direct-to-simulator against through-a-router, in one run, on 127.0.0.1.

Two simulated vLLM servers are started once; every target is measured against the same pair:

  direct        the load generator spreads requests round-robin over the two simulators
  mvtui         `mvtui --no-ui` on plain asyncio ($MVTUI_LOOP=asyncio)
  mvtui+uvloop  `mvtui --no-ui` on uvloop (the `fast` extra), when uvloop is installed
  aiohttp-floor an aiohttp server relaying through one ClientSession and doing nothing else
                (benchmarks/floor_relays.py; `+uvloop` on uvloop): the least any router
                built on aiohttp can cost, so mvtui's own cost shows apart from aiohttp's
  asyncio-floor bytes passed verbatim through asyncio protocols (floor_relays.py): what a
                hand-written relay in place of aiohttp could reach
  vllm-router   the vLLM project's Rust router (PyPI `vllm-router`, round_robin), when
                benchmarks/.venv-vllm-router has it:
                    python -m venv benchmarks/.venv-vllm-router
                    benchmarks/.venv-vllm-router/bin/pip install vllm-router

All targets run for the whole benchmark. For each mode (plain, stream) and concurrency,
benchmarks/load.py runs as its own process once per target and round, the rounds visiting the
targets in rotated order, so that the machine's changing background load is shared out. The
router's and the simulators' CPU time per request is read from /proc around each run, and the
router's resident memory after it. The Markdown table goes to stdout and to
benchmarks/results/router.md (raw numbers: router.json).
Every process started here runs in its own process group and is stopped by that group at the
end, whatever happens.

    .venv/bin/python benchmarks/router_bench.py                      # about 5 minutes
    .venv/bin/python benchmarks/router_bench.py --compare /tmp/before   # + that tree's mvtui
    .venv/bin/python benchmarks/router_bench.py --profile            # + py-spy on each Python router
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.proc_readings import cpu_seconds, resident_mib  # noqa: E402
from tests.helpers import free_port  # noqa: E402

RESULTS = HERE / "results"
VLLM_ROUTER = HERE / ".venv-vllm-router" / "bin" / "vllm-router"
MODEL = "bench"
MODES = ("plain", "stream")
TARGETS = ("direct", "mvtui", "mvtui+uvloop", "aiohttp-floor", "aiohttp-floor+uvloop", "asyncio-floor", "vllm-router")
READY_TIMEOUT_S = 30.0
# The targets, checked on the c=1 and c=32 rows of each mvtui variant.
MIN_RATIO = {"plain": 0.40, "stream": 0.75}
MAX_ADDED_P50_MS, MAX_ADDED_P99_MS = 1.0, 3.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- processes -------------------------------------------------------------------------
@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Processes:
    """Everything this benchmark started; `stop_all` ends each by its own process group."""

    logs: Path
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> Started:
        log = self.logs / f"{name.replace('/', '_')}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        entry = Started(name, proc, log)
        self.started.append(entry)
        return entry

    def stop(self, entry: Started, timeout: float = 10.0, signum: signal.Signals = signal.SIGTERM) -> None:
        if entry.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(entry.proc.pid, signum)
            try:
                entry.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(entry.proc.pid, signal.SIGKILL)
                entry.proc.wait()
        if entry in self.started:
            self.started.remove(entry)

    def stop_all(self) -> None:
        for entry in reversed(list(self.started)):
            self.stop(entry)


def http(method: str, url: str, body: dict | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_ready(entry: Started, url: str, check: Callable[[str], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if entry.proc.poll() is not None:
            raise RuntimeError(f"{entry.name} exited with {entry.proc.returncode}:\n{entry.tail()}")
        with contextlib.suppress(OSError):
            if check(url):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{entry.name} not ready at {url} within {READY_TIMEOUT_S} s:\n{entry.tail()}")


def answers_completion(url: str) -> bool:
    status, _ = http("POST", url + "/v1/completions", {"model": MODEL, "prompt": "ready?", "max_tokens": 2})
    return status == 200


def mvtui_sees_both(url: str) -> bool:
    status, body = http("GET", url + "/load-stats")
    return status == 200 and json.loads(body).get("healthy_servers") == 2 and answers_completion(url)


# -- targets ---------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    unavailable: str | None = None
    source: Path = REPO  # the mvtui source tree a "mvtui..." target runs


def uvloop_version() -> str | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.__version__


def vllm_router_version() -> str | None:
    python = VLLM_ROUTER.parent / "python"
    if not VLLM_ROUTER.exists():
        return None
    result = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-router'))"], capture_output=True, text=True, timeout=30
    )
    return result.stdout.strip() or None


def plan_targets(wanted: list[str], compare: Path | None) -> list[Target]:
    no_uvloop = None if uvloop_version() else "not available: uvloop is not installed (pip install -e '.[fast]')"
    why_not = {
        "mvtui+uvloop": no_uvloop,
        "aiohttp-floor+uvloop": no_uvloop,
        "vllm-router": None
        if vllm_router_version()
        else f"not available: {VLLM_ROUTER.relative_to(REPO)} missing (see this file's docstring)",
    }
    targets = [Target(name, why_not.get(name)) for name in wanted]
    if compare is not None:  # another checkout of mvtui, e.g. `git worktree add /tmp/before HEAD~1`
        targets += [Target("mvtui@" + compare.name, source=compare), Target(f"mvtui@{compare.name}+uvloop", no_uvloop, source=compare)]
    return targets


def mvtui_config(logs: Path, sims: list[str]) -> Path:
    entries = ",\n".join(f'  {{ url = "{url}", max_concurrent_requests = 512 }}' for url in sims)
    path = logs / "mvtui-bench.toml"
    path.write_text(
        f"[servers]\nservers = [\n{entries}\n]\n\n[config]\nmetrics_interval = 0.5\n\n[admin]\nport = 0  # any free port: no clash with another mvtui\n"
    )
    return path


def child_env(logs: Path, extra: dict[str, str], source: Path = REPO) -> dict[str, str]:
    """mvtui's own files (logs, admin address) go to the run's temporary folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        env[name] = str(logs / "xdg" / name.lower())
    env.pop("MVTUI_CONFIG", None)
    env.update(extra)
    return env


@dataclass
class Running:
    """A target ready for load: where to send it, and whose CPU time it spends."""

    name: str
    urls: list[str]
    pid: int | None = None


def start_target(target: Target, procs: Processes, sims: list[str]) -> Running:
    """Start the router under test (none for direct) and wait until it routes to both simulators."""
    if target.name == "direct":
        return Running(target.name, sims)
    port = free_port()
    if target.name.startswith("mvtui"):
        loop = "uvloop" if target.name.endswith("+uvloop") else "asyncio"
        argv = [
            sys.executable,
            "-m",
            "mvtui",
            "--no-ui",
            "--config",
            str(mvtui_config(procs.logs, sims)),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        entry = procs.start(target.name, argv, child_env(procs.logs, {"MVTUI_LOOP": loop}, target.source), cwd=target.source)
        check = mvtui_sees_both
    elif "-floor" in target.name:
        relay = target.name.split("-floor")[0]
        argv = [sys.executable, str(HERE / "floor_relays.py"), relay, "--port", str(port)] + [
            part for url in sims for part in ("--upstream", url)
        ]
        argv += ["--uvloop"] if target.name.endswith("+uvloop") else []
        entry = procs.start(target.name, argv, child_env(procs.logs, {}))
        check = answers_completion
    else:
        argv = [
            str(VLLM_ROUTER),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            "round_robin",
            "--worker-urls",
            *sims,
            "--log-level",
            "warning",
        ]
        entry = procs.start(target.name, argv, child_env(procs.logs, {}))
        check = answers_completion
    url = f"http://127.0.0.1:{port}"
    wait_ready(entry, url, check)
    return Running(target.name, [url], entry.proc.pid)


# -- profiling -------------------------------------------------------------------------
def start_profiler(procs: Processes, name: str, pid: int) -> tuple[Started, Path] | None:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        print("--profile: py-spy is not installed (pip install py-spy); profiling skipped", file=sys.stderr)
        return None
    out = RESULTS / f"profile-{name.replace('+', '-')}.txt"
    argv = [py_spy, "record", "--pid", str(pid), "--gil", "--format", "raw", "--rate", "200", "--nonblocking", "-o", str(out)]
    return procs.start(f"py-spy-{name}", argv), out


def summarize_profile(raw: Path, name: str, top: int = 25) -> None:
    """Self and inclusive time per function from py-spy's collapsed stacks."""
    if not raw.exists():
        print(f"profile of {name}: py-spy wrote nothing", file=sys.stderr)
        return
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")" for frame in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"# py-spy profile of {name}: {total} samples", "", "## self time"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "## inclusive time"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    (RESULTS / f"profile-{name.replace('+', '-')}-top.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: top // 2 + 3]), file=sys.stderr)


# -- measuring -------------------------------------------------------------------------
@dataclass
class Cell:
    """One target, mode and concurrency: the pooled rounds."""

    target: str
    mode: str
    concurrency: int
    runs: list[dict] = field(default_factory=list)
    router_cpu_s: float = 0.0
    router_rss_mib: float | None = None  # the largest reading after a round
    sims_cpu_s: float = 0.0
    unavailable: str | None = None

    def add(self, run: dict, router_cpu_s: float | None, sims_cpu_s: float | None) -> None:
        self.runs.append(run)
        self.router_cpu_s += router_cpu_s or 0.0
        self.sims_cpu_s += sims_cpu_s or 0.0

    def summary(self) -> dict | None:
        if not self.runs:
            return None
        latencies = [value for run in self.runs for value in run["latencies_ms"]]
        ttfts = [value for run in self.runs for value in run["ttfts_ms"]]
        completed = sum(run["completed"] for run in self.runs) or 1
        return {
            "requests": len(latencies),
            "rps": len(latencies) / sum(run["seconds"] for run in self.runs),
            "errors": sum(run["errors"] for run in self.runs),
            "error_samples": [sample for run in self.runs for sample in run["error_samples"]][:5],
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "ttft_p50_ms": percentile(ttfts, 0.50),
            "router_cpu_us": 1e6 * self.router_cpu_s / completed if self.router_cpu_s else None,
            "router_rss_mib": self.router_rss_mib,
            "sims_cpu_us": 1e6 * self.sims_cpu_s / completed,
            "load_cpu_us": 1e6 * sum(run["cpu_s"] for run in self.runs) / completed,
        }


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(urls: list[str], mode: str, concurrency: int, args: argparse.Namespace) -> dict:
    argv = [
        sys.executable,
        str(HERE / "load.py"),
        "--raw",
        "--concurrency",
        str(concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
    ]
    argv += ["--max-tokens", str(args.max_tokens), "--model", MODEL] + [part for url in urls for part in ("--url", url)]
    if mode == "stream":
        argv.append("--stream")
    run = subprocess.run(argv, capture_output=True, text=True, timeout=args.warmup + args.duration + 60)
    if run.returncode != 0:
        raise RuntimeError(f"load.py failed ({run.returncode}): {run.stderr[-2000:]}")
    return json.loads(run.stdout)


def cpu_of(pids: list[int]) -> float | None:
    """Their CPU seconds together; None if one of them is gone."""
    try:
        return sum(cpu_seconds(pid) for pid in pids)
    except OSError:
        return None


def measure_cell(running: Running, cell: Cell, sim_pids: list[int], args: argparse.Namespace) -> None:
    """One round of one cell, with the CPU time the router and the simulators spent on it
    and the router's resident memory right after it."""
    router_before, sims_before = cpu_of([running.pid]) if running.pid else None, cpu_of(sim_pids)
    run = measure(running.urls, cell.mode, cell.concurrency, args)
    router_after, sims_after = cpu_of([running.pid]) if running.pid else None, cpu_of(sim_pids)
    cell.add(run, _delta(router_before, router_after), _delta(sims_before, sims_after))
    rss = resident_mib(running.pid) if running.pid else None
    if rss is not None:
        cell.router_rss_mib = max(rss, cell.router_rss_mib or 0.0)
    print(
        f"{cell.target:20} {cell.mode:6} c={cell.concurrency:<4} round {len(cell.runs)}: {run['rps']:8.1f} req/s  "
        f"p50 {run['p50_ms']} ms  p99 {run['p99_ms']} ms  errors {run['errors']}",
        file=sys.stderr,
        flush=True,
    )


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def run_all(args: argparse.Namespace, procs: Processes) -> list[Cell]:
    """Every target runs at once; each cell's rounds rotate through them, so drift in the
    machine's background load is shared out instead of landing on whoever ran last."""
    sims, sim_pids = start_sims(procs, args)
    targets = plan_targets(args.targets, args.compare)
    running = [start_target(target, procs, sims) for target in targets if not target.unavailable]
    profilers = [start_profiler(procs, r.name, r.pid) for r in running if args.profile and r.pid and r.name != "vllm-router"]
    cells: list[Cell] = []
    for mode in args.modes:
        for concurrency in args.concurrency:
            row = {r.name: Cell(r.name, mode, concurrency) for r in running}
            for round_index in range(args.rounds):
                turn = round_index % len(running)
                for target in running[turn:] + running[:turn]:
                    measure_cell(target, row[target.name], sim_pids, args)
            cells += [row.get(t.name) or Cell(t.name, mode, concurrency, unavailable=t.unavailable) for t in targets]
    for profiler in profilers:
        if profiler is not None:
            procs.stop(profiler[0], timeout=60, signum=signal.SIGINT)  # py-spy writes its file on SIGINT
            summarize_profile(profiler[1], profiler[0].name.removeprefix("py-spy-"))
    return cells


def start_sims(procs: Processes, args: argparse.Namespace) -> tuple[list[str], list[int]]:
    urls, pids = [], []
    for index in range(2):
        port = free_port()
        argv = [sys.executable, "-m", "mvtui", "sim", "--port", str(port), "--model", MODEL, "--max-num-seqs", "512"]
        argv += ["--tokens-per-s", str(args.tokens_per_s), "--ttft-ms", "0", "--prompt-ms-per-token", "0"]
        argv += ["--default-max-tokens", str(args.max_tokens), "--kv-blocks", "100000", "--max-model-len", "4096"]
        entry = procs.start(f"sim{index}", argv, child_env(procs.logs, {}))
        url = f"http://127.0.0.1:{port}"
        wait_ready(entry, url, answers_completion)
        urls.append(url)
        pids.append(entry.proc.pid)
    return urls, pids


# -- the table -------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def direct_results(cells: list[Cell]) -> dict[tuple[str, int], dict]:
    return {(c.mode, c.concurrency): s for c in cells if c.target == "direct" and (s := c.summary())}


def table(cells: list[Cell]) -> str:
    direct = direct_results(cells)
    head = (
        "| target | mode | c | req/s | vs direct | p50 ms | p99 ms | added p50 | added p99 | TTFT p50 ms | added TTFT "
        "| router CPU µs/req | sims CPU µs/req | router RSS MiB | errors |"
    )
    rows = [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for cell in cells:
        r = cell.summary()
        if r is None:
            rows.append(f"| {cell.target} | {cell.mode} | {cell.concurrency} | {cell.unavailable} |" + " |" * 11)
            continue
        base = direct.get((cell.mode, cell.concurrency)) or {}
        ratio = 100 * r["rps"] / base["rps"] if base.get("rps") else None
        rows.append(
            f"| {cell.target} | {cell.mode} | {cell.concurrency} | {r['rps']:.0f} | {fmt(ratio, 0)}% "
            f"| {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {fmt(diff(r['p50_ms'], base.get('p50_ms')), sign=True)} "
            f"| {fmt(diff(r['p99_ms'], base.get('p99_ms')), sign=True)} | {fmt(r['ttft_p50_ms'])} "
            f"| {fmt(diff(r['ttft_p50_ms'], base.get('ttft_p50_ms')), sign=True)} "
            f"| {fmt(r['router_cpu_us'], 0)} | {fmt(r['sims_cpu_us'], 0)} | {fmt(r['router_rss_mib'], 0)} | {r['errors']} |"
        )
    return "\n".join(rows)


def target_checks(cells: list[Cell]) -> list[str]:
    direct = direct_results(cells)
    lines = []
    for cell in cells:
        result = cell.summary()
        base = direct.get((cell.mode, cell.concurrency))
        if result is None or base is None:
            continue
        if "-floor" in cell.target and cell.concurrency == 32:
            on = "on aiohttp" if cell.target.startswith("aiohttp") else "passing bytes through asyncio protocols"
            lines.append(
                f"- {cell.target} {cell.mode} c=32: {100 * result['rps'] / base['rps']:.0f}% of direct: the ceiling for a relay {on} here"
            )
        if not cell.target.startswith("mvtui"):
            continue
        if cell.concurrency == 32:
            ratio, goal = result["rps"] / base["rps"], MIN_RATIO[cell.mode]
            lines.append(
                f"- {cell.target} {cell.mode} c=32: {100 * ratio:.0f}% of direct (target ≥ {100 * goal:.0f}%): {'met' if ratio >= goal else 'NOT met'}"
            )
        if cell.concurrency == 1 and cell.mode == "plain":
            p50, p99 = result["p50_ms"] - base["p50_ms"], result["p99_ms"] - base["p99_ms"]
            met = p50 < MAX_ADDED_P50_MS and p99 < MAX_ADDED_P99_MS
            lines.append(
                f"- {cell.target} plain c=1: added p50 {p50:+.2f} ms (target < {MAX_ADDED_P50_MS:g}), "
                f"added p99 {p99:+.2f} ms (target < {MAX_ADDED_P99_MS:g}): {'met' if met else 'NOT met'}"
            )
    errors = [
        f"- {c.target} {c.mode} c={c.concurrency}: {s['errors']} errors, e.g. {s['error_samples'][:2]}"
        for c in cells
        if (s := c.summary()) and s["errors"]
    ]
    return lines + errors


def setup_lines(args: argparse.Namespace) -> list[str]:
    import aiohttp

    return [
        f"- machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"uvloop {uvloop_version() or 'absent'}, vllm-router {vllm_router_version() or 'absent'}",
        f"- backends: 2 × `mvtui sim` (--tokens-per-s {args.tokens_per_s:g}, --ttft-ms 0, --prompt-ms-per-token 0, --max-num-seqs 512), "
        f"/v1/completions with max_tokens {args.max_tokens}; all processes share the cores",
        f"- each cell: {args.rounds} rounds of {args.warmup:g} s warm-up + {args.duration:g} s measured per target, closed loop, "
        "the load generator in its own process (benchmarks/load.py); all targets run for the whole benchmark and each "
        "round visits them in a rotated order; rates and percentiles pool the rounds",
        "- CPU µs/req: user+system CPU time of the router process (all threads) and of both simulators, over every "
        "request they completed during the cell (warm-up included), from /proc; router RSS: the largest resident "
        "memory (VmRSS) read right after a round",
        "- added p50/p99/TTFT: the target's percentile minus direct's in the same run; TTFT = time to the first body chunk of a stream",
        "- mvtui uses its default policy (balanced); vllm-router uses round_robin; direct is round-robin in the load generator",
    ]


def report(cells: list[Cell], args: argparse.Namespace, started: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f"## Router speed ({when}, {time.monotonic() - started:.0f} s)",
        "",
        *setup_lines(args),
        "",
        table(cells),
        "",
        "Targets (issue #3):",
        *target_checks(cells),
    ]
    return "\n".join(parts) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Router speed against direct connections to two simulated vLLM servers.")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cell and target")
    parser.add_argument("--duration", type=float, default=1.5, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per round")
    parser.add_argument("--tokens-per-s", type=float, default=100000.0, help="simulator decode speed per sequence")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--compare", type=Path, help="also run the mvtui of this other source tree (before/after a change)")
    parser.add_argument(
        "--profile", action="store_true", help="record each Python router (mvtui, the floors) with py-spy into benchmarks/results/"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "router.md")
    args = parser.parse_args()
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")
    return args


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mvtui-bench-") as logs:
        procs = Processes(Path(logs))
        try:
            cells = run_all(args, procs)
        finally:
            procs.stop_all()
    text = report(cells, args, started)
    print(text)
    args.output.write_text(text)
    raw = [
        {"target": c.target, "mode": c.mode, "concurrency": c.concurrency, "summary": c.summary(), "unavailable": c.unavailable}
        for c in cells
    ]
    args.output.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
