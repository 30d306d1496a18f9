"""Does the dashboard get in the proxy's way? Router throughput with the full-screen
dashboard up against `mvtui --no-ui`, in one run, against the same two simulators.

  direct      the load generator straight at the two simulators (the ceiling)
  no-ui       `mvtui --no-ui`
  dashboard   `mvtui` drawing its dashboard into a real pseudo-terminal (160x48) that this
              script reads, as a terminal emulator would

Both mvtui runs use plain asyncio ($MVTUI_LOOP=asyncio), so only the dashboard differs. The
load comes from benchmarks/load.py in its own process (closed loop, C workers). Each round
measures no-ui and dashboard back to back (the order alternating between rounds) and takes
their ratio, so slow drifts in what else the machine does hit both sides of a ratio alike;
the figure is the median of the per-round ratios (the issue's target: >= 0.90), with their
range. Every process runs in its own process group and is stopped by it at the end.

    .venv/bin/python benchmarks/dashboard_overhead.py            # about 3 minutes
    .venv/bin/python benchmarks/dashboard_overhead.py --rounds 2 --duration 3
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
MODEL = "bench"
TERMINAL = (160, 48)
READY_TIMEOUT_S = 30.0
TARGET_RATIO = 0.90
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.path.insert(0, str(REPO))

from benchmarks.proc_readings import cpu_seconds  # noqa: E402
from tests.helpers import free_port  # noqa: E402


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    terminal: int | None = None  # the pty master, for the dashboard
    screen_bytes: list[int] = field(default_factory=lambda: [0])

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Processes:
    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.running: list[Proc] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """mvtui's own files (logs, remembered theme) go to the run's scratch folder."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
            env[name] = str(self.scratch / "xdg" / name.lower())
        env.pop("MVTUI_CONFIG", None)
        env.update(extra or {})
        return env

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.scratch / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def start_in_terminal(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Run `argv` on a pseudo-terminal of TERMINAL size; a thread reads what it draws."""
        master, slave = pty.openpty()
        columns, rows = TERMINAL
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
        popen = subprocess.Popen(argv, cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        proc = Proc(name, popen, self.scratch / "xdg" / "xdg_state_home" / "mvtui" / "log" / "mvtui.log", terminal=master)
        threading.Thread(target=_drain_terminal, args=(proc,), daemon=True).start()
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> None:
        if proc.popen.poll() is None:
            if proc.terminal is not None:
                with contextlib.suppress(OSError):
                    os.write(proc.terminal, b"q")  # the dashboard's own quit: drains, then exits
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        if proc.terminal is not None:
            with contextlib.suppress(OSError):
                os.close(proc.terminal)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def _drain_terminal(proc: Proc) -> None:
    while True:
        try:
            data = os.read(proc.terminal, 65536)  # type: ignore[arg-type]
        except OSError:
            return
        if not data:
            return
        proc.screen_bytes[0] += len(data)


def get_json(url: str) -> dict:
    with _NO_PROXY.open(url, timeout=2) as response:
        return json.loads(response.read())


def wait_until(proc: Proc, check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name}: {what} not within {READY_TIMEOUT_S} s:\n{proc.tail()}")


def start_sims(procs: Processes, tokens_per_s: float) -> list[str]:
    urls = []
    for index in range(2):
        port = free_port()
        argv = [sys.executable, "-m", "mvtui", "sim", "--port", str(port), "--model", MODEL, "--max-num-seqs", "512"]
        argv += ["--tokens-per-s", f"{tokens_per_s:g}", "--ttft-ms", "0", "--prompt-ms-per-token", "0", "--kv-blocks", "100000"]
        proc = procs.start(f"sim{index}", argv, procs.env())
        url = f"http://127.0.0.1:{port}"
        wait_until(proc, lambda url=url: get_json(url + "/v1/models")["data"], "answering")
        urls.append(url)
    return urls


def write_config(scratch: Path, sims: list[str]) -> Path:
    servers = ", ".join(f'{{ url = "{url}", max_concurrent_requests = 256 }}' for url in sims)
    path = scratch / "servers.toml"
    path.write_text(f'[router]\nhost = "127.0.0.1"\n\n[admin]\nenabled = false\n\n[servers]\nservers = [{servers}]\n')
    return path


@contextlib.contextmanager
def target(name: str, procs: Processes, sims: list[str], config: Path) -> Iterator[tuple[list[str], Proc | None]]:
    if name == "direct":
        yield sims, None
        return
    port = free_port()
    argv = [sys.executable, "-m", "mvtui", "--config", str(config), "--port", str(port)]
    env = procs.env({"MVTUI_LOOP": "asyncio"})
    proc = procs.start(name, [*argv, "--no-ui"], env) if name == "no-ui" else procs.start_in_terminal(name, argv, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(proc, lambda: get_json(url + "/health")["healthy_servers"] == len(sims), "both servers up")
        yield [url], proc
    finally:
        procs.stop(proc)


def run_load(urls: list[str], args: argparse.Namespace) -> dict:
    argv = [sys.executable, str(HERE / "load.py"), "--concurrency", str(args.concurrency), "--duration", str(args.duration)]
    argv += ["--warmup", "1", "--max-tokens", str(args.max_tokens), "--model", MODEL, "--no-uvloop"]
    argv += ["--stream"] if args.stream else []
    for url in urls:
        argv += ["--url", url]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=args.duration + 90)
    if done.returncode != 0:
        raise RuntimeError(f"load.py failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Measured:
    rps: list[float] = field(default_factory=list)
    cpu_share: list[float] = field(default_factory=list)  # mvtui's CPU seconds per wall second
    cpu_ms_per_request: list[float] = field(default_factory=list)
    errors: int = 0
    screen_kib_per_s: list[float] = field(default_factory=list)


def measure(name: str, procs: Processes, sims: list[str], config: Path, args: argparse.Namespace, into: Measured) -> None:
    with target(name, procs, sims, config) as (urls, proc):
        for _ in range(args.windows):
            cpu_before = cpu_seconds(proc.popen.pid) if proc else 0.0
            screen_before = proc.screen_bytes[0] if proc else 0
            started = time.monotonic()
            result = run_load(urls, args)
            wall = time.monotonic() - started
            into.rps.append(result["rps"])
            into.errors += result["errors"]
            if proc is not None:
                used = cpu_seconds(proc.popen.pid) - cpu_before
                into.cpu_share.append(used / wall)
                # load.py's window excludes its warm-up, the CPU reading does not: count both
                served = result["rps"] * (wall - 1.0) if result["rps"] else 0.0
                if served:
                    into.cpu_ms_per_request.append(1000 * used / served)
                if proc.terminal is not None:
                    into.screen_kib_per_s.append((proc.screen_bytes[0] - screen_before) / 1024 / wall)
            print(
                f"  {name:9} {result['rps']:8.1f} req/s  p50 {result['p50_ms']} ms  errors {result['errors']}", file=sys.stderr, flush=True
            )


def report(results: dict[str, Measured], ratios: list[float], loads: tuple[float, float], args: argparse.Namespace) -> str:
    median = {name: statistics.median(found.rps) for name, found in results.items()}
    ratio = statistics.median(ratios)
    lines = [
        "# Dashboard overhead",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, asyncio loop for both mvtui runs",
        f"- load: benchmarks/load.py, {args.concurrency} workers, {'streamed' if args.stream else 'plain'} /v1/completions, "
        f"max_tokens {args.max_tokens}; {args.rounds} round(s) x {args.windows} window(s) x {args.duration:g} s per target",
        f"- backends: 2 x `mvtui sim` (--tokens-per-s {args.tokens_per_s:g}, --ttft-ms 0, --max-num-seqs 512); dashboard on a {TERMINAL[0]}x{TERMINAL[1]} pty",
        f"- machine load average (1 min) before / after: {loads[0]:.2f} / {loads[1]:.2f} (other work on the machine widens the spread)",
        "",
        "| target | req/s (median) | of direct | mvtui CPU (cores) | mvtui CPU per request | screen output | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, found in results.items():
        cpu = f"{statistics.median(found.cpu_share):.2f}" if found.cpu_share else "–"
        screen = f"{statistics.median(found.screen_kib_per_s):.0f} KiB/s" if found.screen_kib_per_s else "–"
        per_request = f"{statistics.median(found.cpu_ms_per_request):.3f} ms" if found.cpu_ms_per_request else "–"
        lines.append(
            f"| {name} | {median[name]:.1f} | {median[name] / median['direct']:.2f} | {cpu} | {per_request} | {screen} | {found.errors} |"
        )
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    spread = ", ".join(f"{value:.2f}" for value in ratios)
    lines += [
        "",
        f"**dashboard / no-ui throughput: {ratio:.3f}** (median of {len(ratios)} back-to-back rounds: {spread}; "
        f"{verdict} the >= {TARGET_RATIO:.2f} target)",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per window")
    parser.add_argument("--windows", type=int, default=1, help="measured windows per target per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds; the order of the two mvtui targets alternates")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tokens-per-s", type=float, default=2000.0)
    parser.add_argument("--plain", dest="stream", action="store_false", help="non-streamed requests (default: streamed)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/dashboard.md")
    args = parser.parse_args()
    results = {name: Measured() for name in ("direct", "no-ui", "dashboard")}
    ratios: list[float] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mvtui-dashboard-bench-") as scratch_name:
        procs = Processes(Path(scratch_name))
        try:
            sims = start_sims(procs, args.tokens_per_s)
            config = write_config(procs.scratch, sims)
            measure("direct", procs, sims, config, args, results["direct"])
            for round_index in range(args.rounds):
                order = ("no-ui", "dashboard") if round_index % 2 == 0 else ("dashboard", "no-ui")
                this_round: dict[str, float] = {}
                for name in order:
                    measure(name, procs, sims, config, args, results[name])
                    this_round[name] = statistics.median(results[name].rps[-args.windows :])
                ratios.append(this_round["dashboard"] / this_round["no-ui"])
                print(f"  round {round_index + 1}: dashboard / no-ui = {ratios[-1]:.3f}", file=sys.stderr, flush=True)
        finally:
            procs.stop_all()
    text = report(results, ratios, (load_before, os.getloadavg()[0]), args)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "dashboard.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
