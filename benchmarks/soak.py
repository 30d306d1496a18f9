"""Soak: mixed traffic through a headless mvtui while its backends misbehave, for minutes.

Three `mvtui sim` servers (sim-c with sleep mode and VLLM_SERVER_DEV_MODE=1) and one
`mvtui --no-ui` run on 127.0.0.1 with free ports, mvtui with scratch XDG folders (nothing
touches the user's config or state). For `--duration` seconds:

- traffic: `--concurrency` closed-loop clients send a mix of chat and completions, streamed
  and not, with a random max_tokens; a few streams hang up after their first chunk, as
  impatient clients do. Every request has a client-side timeout (`--client-timeout`); after
  an error a client pauses 0.2-1 s, as real ones do, instead of looping on instant 503s;
- faults, at random, on at most two simulators at a time, each held a few seconds then
  undone: SIGKILL or SIGTERM of the simulator's process group and a restart on the same port,
  the simulator's own `exit` fault, and through `POST /sim/faults`: `hang`, `fail_rate`,
  `slow`, `cut_body`, `stall_body`, `cut_after_tokens` and `dead`; sim-c is also put to sleep
  (level 1 or 2) and woken through mvtui, by the CLI or the admin API;
- operator changes, one at a time: the config file rewritten (a server's capacity changed,
  a server removed and later added back), a drain and undrain through the CLI, a live
  `set-capacity` through the CLI.

Every event is logged with its time (stderr and benchmarks/results/soak-events.log); mvtui's
resident memory (VmRSS) and open file descriptors (/proc/PID/fd) are read every second.

What counts: a request is served when it ends with 200 and a complete answer (JSON with
choices, or a stream ending in `data: [DONE]`); an error when it ends with another status or a
stream carries an SSE `data: {"error": ...}` event; a connection reset (the client's socket
closed under it) is counted on its own line; a request is LOST when the client timeout
fires first, whether before the status (no answer at all) or after a 200 (a stream or body
that went silent without an error event). mvtui's configured bounds (request_timeout 5 s,
generation_timeout 15 s, wake_timeout 10 s, 3 retries, queue_timeout 20 s: at most about
55 s together) bound every answer inside the client timeout (90 s by default), so a lost
request is a router bug.

The table goes to stdout and benchmarks/results/soak.md (ignored by git), the event log to
soak-events.log beside it, every process's output to benchmarks/results/soak-logs/
(mvtui.log, sim-a.log, sim-a.1.log after a restart...). A watcher asks mvtui's /health every
2 s; when it gets no answer it logs mvtui's CPU use and, with py-spy installed, dumps mvtui's
stacks into soak-logs/. Exit status 1 if anything was lost, or mvtui died, logged a traceback
or did not stop cleanly on SIGTERM. Every loop ends at the deadline; every process started
here runs in its own process group and is stopped by it at the end, also on Ctrl-C, SIGTERM
or an exception.

    .venv/bin/python benchmarks/soak.py --duration 60         # a short run
    .venv/bin/python benchmarks/soak.py                       # the full 10 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.proc_readings import cpu_seconds, resident_mib  # noqa: E402
from benchmarks.router_bench import Processes, Started, child_env  # noqa: E402
from tests.helpers import free_port  # noqa: E402

RESULTS = HERE / "results"
MODEL = "soak"
SIM_NAMES = ("sim-a", "sim-b", "sim-c")
SLEEPER = "sim-c"  # started with sleep mode: the sleep and wake target
READY_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 40.0
ADMIN_TIMEOUT_S = 10.0
MAX_FAULTED_SIMS = 2
CLEAR_FAULTS = {
    "fail_rate": 0.0,
    "hang": False,
    "slow": 1.0,
    "cut_after_tokens": None,
    "dead": False,
    "cut_body": False,
    "stall_body": False,
}
SIM_FAULTS = {
    "hang": {"hang": True},
    "fail_rate": None,  # a random share, chosen when injected
    "slow": None,
    "cut_body": {"cut_body": True},
    "stall_body": {"stall_body": True},
    "cut_after_tokens": None,
    "dead": {"dead": True},
}
PROCESS_FAULTS = ("kill", "term", "exit")
ALL_FAULTS = (*PROCESS_FAULTS, *SIM_FAULTS, "sleep")
# mvtui's bounds: every answer comes well inside the client timeout
MVTUI_TIMING = {
    "health_check_interval": 2,
    "request_timeout": 5,
    "generation_timeout": 15,
    "max_retries": 3,
    "metrics_interval": 0.5,
    "wake_timeout": 10,
    "drain_timeout": 5,
    "shutdown_timeout": 5,
}
MVTUI_ROUTER = {"queue_timeout": 20}  # `[router]`: a request waits in the model's queue at most this
SAMPLE_EVERY_S = 1.0
ABANDON_SHARE = 0.03  # streams whose client hangs up after the first chunk
EXAMPLES_PER_CAUSE = 2
HEALTH_TIMEOUT_S, WATCH_EVERY_S, MAX_STACK_DUMPS = 5.0, 2.0, 3
ERROR_PAUSE_S = (0.2, 1.0)  # a client's pause after an error answer


# -- events -------------------------------------------------------------------------------
class EventLog:
    def __init__(self, path: Path, started: float) -> None:
        self.path = path
        self.started = started
        self.lines: list[str] = []
        self.counts: Counter[str] = Counter()
        self.first: dict[str, float] = {}  # seconds since the soak started, per kind of event
        path.write_text("")

    def __call__(self, lane: str, text: str, kind: str | None = None) -> None:
        line = f"{time.strftime('%H:%M:%S')} +{time.monotonic() - self.started:7.1f}s  {lane:7}  {text}"
        self.lines.append(line)
        if kind:
            self.counts[kind] += 1
            self.first.setdefault(kind, time.monotonic() - self.started)
        print(line, file=sys.stderr, flush=True)
        with self.path.open("a") as out:
            out.write(line + "\n")


# -- the processes ------------------------------------------------------------------------
@dataclass
class Sim:
    name: str
    port: int
    sleep_mode: bool
    seed: int
    entry: Started | None = None
    restarts: int = 0
    busy: bool = False  # a fault is being held on it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self, args: argparse.Namespace) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "mvtui",
            "sim",
            "--port",
            str(self.port),
            "--model",
            MODEL,
            "--max-num-seqs",
            str(args.sim_max_num_seqs),
        ]
        argv += [
            "--tokens-per-s",
            str(args.tokens_per_s),
            "--ttft-ms",
            "20",
            "--default-max-tokens",
            "16",
            "--seed",
            str(self.seed + self.restarts),
        ]
        if self.sleep_mode:
            argv += ["--enable-sleep-mode", "--wake-ms-l1", "300", "--wake-ms-l2", "1500"]
        return argv


@dataclass
class Cluster:
    """Everything this run started, and where it is."""

    procs: Processes
    args: argparse.Namespace
    sims: dict[str, Sim]
    config_path: Path
    router_port: int = 0
    mvtui: Started | None = None
    capacities: dict[str, int] = field(default_factory=dict)
    in_file: set[str] = field(default_factory=set)

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return child_env(self.procs.logs, extra or {})

    def start_sim(self, sim: Sim) -> None:
        extra = {"VLLM_SERVER_DEV_MODE": "1"} if sim.sleep_mode else {}
        suffix = f".{sim.restarts}" if sim.restarts else ""
        sim.entry = self.procs.start(sim.name + suffix, sim.argv(self.args), self.env(extra))

    def write_config(self) -> None:
        """As an editor saves: a new file renamed over the old one."""
        entries = ",\n".join(
            f'  {{ url = "{self.sims[name].url}", max_concurrent_requests = {self.capacities[name]}, name = "{name}" }}'
            for name in SIM_NAMES
            if name in self.in_file
        )
        timing = "\n".join(f"{key} = {value}" for key, value in MVTUI_TIMING.items())
        router = "\n".join(f"{key} = {value}" for key, value in MVTUI_ROUTER.items())
        text = (
            f"# benchmarks/soak.py rewrites this file while mvtui runs\n[servers]\nservers = [\n{entries}\n]\n\n"
            f"[config]\n{timing}\n\n[router]\n{router}\n\n[admin]\nport = 0\n"
        )
        scratch = self.config_path.with_name(f".{self.config_path.name}.{os.getpid()}.tmp")
        scratch.write_text(text)
        os.replace(scratch, self.config_path)


async def wait_ready(session: aiohttp.ClientSession, entry: Started, url: str, path: str = "/health") -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if entry.proc.poll() is not None:
            raise RuntimeError(f"{entry.name} exited with {entry.proc.returncode}:\n{entry.tail()}")
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(url + path, timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{entry.name} not ready at {url}{path} within {READY_TIMEOUT_S} s:\n{entry.tail()}")


async def start_cluster(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    for sim in cluster.sims.values():
        cluster.start_sim(sim)
    for sim in cluster.sims.values():
        assert sim.entry is not None
        await wait_ready(session, sim.entry, sim.url)
    cluster.capacities = {name: 8 for name in SIM_NAMES}
    cluster.in_file = set(SIM_NAMES)
    cluster.write_config()
    cluster.router_port = free_port()
    argv = [
        sys.executable,
        "-m",
        "mvtui",
        "--no-ui",
        "--config",
        str(cluster.config_path),
        "--port",
        str(cluster.router_port),
        "--host",
        "127.0.0.1",
    ]
    cluster.mvtui = cluster.procs.start("mvtui", argv, cluster.env())
    await wait_ready(session, cluster.mvtui, cluster.router_url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:  # every simulator up in mvtui's eyes
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            async with session.get(cluster.router_url + "/load-stats", timeout=aiohttp.ClientTimeout(total=2)) as response:
                if (await response.json()).get("healthy_servers") == len(SIM_NAMES):
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"mvtui did not see the three simulators up within {READY_TIMEOUT_S} s:\n{cluster.mvtui.tail()}")


# -- traffic ------------------------------------------------------------------------------
@dataclass
class Tally:
    sent: int = 0
    causes: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def add(self, cause: str, example: str = "") -> None:
        self.causes[cause] += 1
        shown = self.examples.setdefault(cause, [])
        if example and len(shown) < EXAMPLES_PER_CAUSE:
            shown.append(example)


OK = "served OK"
ABANDONED = "client hung up after the first chunk (on purpose)"
RESET = "connection reset"
LOST_NO_STATUS = "LOST: no status before the client timeout"
LOST_AFTER_200 = "LOST: 200, then silence until the client timeout"


def request_for(rng: random.Random) -> tuple[str, dict[str, Any], bool, bool]:
    """(path, body, stream, abandon) of one request from the mix."""
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(4, 48), "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Tell me about router number {rng.randint(1, 10**6)}."}]
    else:
        body["prompt"] = f"Once upon a time, router {rng.randint(1, 10**6)}"
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    abandon = stream and rng.random() < ABANDON_SHARE
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, stream, abandon


def error_gist(body: bytes) -> str:
    """An OpenAI error's message without its particulars, to group answers by cause:
    `Upstream sim-b failed: timed out` -> `Upstream sim-? failed: timed out`."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "not an OpenAI error body"
    message = re.sub(r"sim-[a-z]", "sim-?", message)
    message = re.sub(r"<.*", "", message)  # aiohttp's exception details
    message = re.sub(r" \((?!circuit).*", " (...)", message)  # which servers failed, and how
    message = re.sub(r"\d+(\.\d+)?", "N", message)
    return message.replace("|", "/").strip()[:90]


async def one_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: bool, abandon: bool, state: dict[str, Any]
) -> tuple[str, str]:
    """(cause, example) once the router answered; raises on client-side failures."""
    async with session.post(url, json=body) as response:
        state["status"] = response.status
        if response.status != 200:
            body_bytes = await response.read()
            return f"HTTP {response.status}: {error_gist(body_bytes)}", body_bytes[:200].decode(errors="replace")
        if not stream:
            payload = json.loads(await response.read())
            if not payload.get("choices"):
                return "200 without choices", json.dumps(payload)[:160]
            return OK, ""
        done = False
        async for line in response.content:
            if abandon:
                return ABANDONED, ""
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: ") and b'"error"' in line and b'"choices"' not in line:
                return f"SSE error event after 200: {error_gist(line[6:])}", line[6:200].decode(errors="replace").strip()
        if done:
            return OK, ""
        return "stream ended without [DONE] or an error event", ""


async def traffic_worker(
    session: aiohttp.ClientSession,
    cluster: Cluster,
    tally: Tally,
    rng: random.Random,
    deadline: float,
    client_timeout: float,
    log: EventLog,
) -> None:
    while time.monotonic() < deadline:
        path, body, stream, abandon = request_for(rng)
        state: dict[str, Any] = {}
        started = time.monotonic()
        tally.sent += 1
        try:
            async with asyncio.timeout(client_timeout):
                cause, example = await one_request(session, cluster.router_url + path, body, stream, abandon, state)
        except TimeoutError:
            cause = LOST_AFTER_200 if "status" in state else LOST_NO_STATUS
            example = f"{path} stream={stream} max_tokens={body['max_tokens']} sent at +{started - log.started:.1f}s"
            tally.lost.append(example)
            log("traffic", f"{cause}: {example}", kind="lost")
        except aiohttp.ClientPayloadError as error:
            cause, example = "incomplete body after 200", f"{type(error).__name__}: {error}"[:160]
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            if isinstance(error, aiohttp.ClientConnectorError):
                cause = "could not connect to mvtui"
            else:
                cause = RESET + (" after 200" if "status" in state else " before any status")
            example = f"{path} stream={stream} at +{started - log.started:.1f}s: {type(error).__name__}: {error}"[:200]
            log("traffic", f"{cause}: {example}", kind="reset")
        except aiohttp.ClientError as error:
            cause, example = f"client error {type(error).__name__}", str(error)[:160]
        except ValueError as error:  # a 200 whose JSON does not parse
            cause, example = "200 with a body that is not JSON", str(error)[:160]
        tally.add(cause, example)
        if cause == OK:
            tally.latencies.append(time.monotonic() - started)
        elif cause != ABANDONED:  # as real clients do: a pause before the next try, not a tight loop of 503s
            await asyncio.sleep(max(0.0, min(rng.uniform(*ERROR_PAUSE_S), deadline - time.monotonic())))


# -- measuring mvtui -----------------------------------------------------------------------
@dataclass
class Readings:
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (seconds in, RSS MiB, open fds)

    def peak_rss(self) -> float:
        return max((rss for _, rss, _ in self.samples), default=0.0)

    def peak_fds(self) -> int:
        return max((fds for _, _, fds in self.samples), default=0)

    def window(self, start: float, end: float) -> tuple[float, int]:
        inside = [(rss, fds) for t, rss, fds in self.samples if start <= t < end]
        return max((rss for rss, _ in inside), default=0.0), max((fds for _, fds in inside), default=0)


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def sample_mvtui(pid: int, readings: Readings, started: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        rss, fds = resident_mib(pid), open_fds(pid)
        if rss is not None and fds is not None:
            readings.samples.append((time.monotonic() - started, rss, fds))
        await asyncio.sleep(SAMPLE_EVERY_S)


def proc_state(pid: int) -> str:
    """`R` running, `S` sleeping...: the kernel's view of the process now."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


async def watch_mvtui(session: aiohttp.ClientSession, cluster: Cluster, deadline: float, log: EventLog) -> None:
    """Does mvtui still answer /health? When it stops: its CPU use and, with py-spy installed,
    a dump of its threads' stacks in soak-logs/, so a freeze can be told from slowness."""
    assert cluster.mvtui is not None
    pid, dumps, stalled = cluster.mvtui.proc.pid, 0, False
    while time.monotonic() < deadline:
        cpu_before, asked = cpu_seconds_or_none(pid), time.monotonic()
        try:
            async with session.get(cluster.router_url + "/health", timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as response:
                await response.read()
            if stalled:
                log("watch", "mvtui answers /health again", kind="health recovered")
            stalled = False
        except (TimeoutError, aiohttp.ClientError) as error:
            cpu_after = cpu_seconds_or_none(pid)
            used = f"{cpu_after - cpu_before:.1f} CPU s" if cpu_before is not None and cpu_after is not None else "CPU unknown"
            took = time.monotonic() - asked
            log(
                "watch",
                f"mvtui did not answer /health ({type(error).__name__} after {took:.1f} s; state {proc_state(pid)}, {used} meanwhile)",
                kind="health stall",
            )
            if not stalled and dumps < MAX_STACK_DUMPS:
                dumps += 1
                log("watch", f"stacks: {await dump_stacks(pid, dumps)}")
            stalled = True
        await pause(WATCH_EVERY_S, deadline)


def cpu_seconds_or_none(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except OSError:
        return None


async def dump_stacks(pid: int, number: int) -> str:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        return "py-spy is not installed (pip install py-spy), no dump"
    out = RESULTS / "soak-logs" / f"mvtui-stacks-{number}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        py_spy, "dump", "--pid", str(pid), "--locals", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        text, _ = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return "py-spy dump timed out"
    out.write_bytes(text)
    return f"{out.relative_to(REPO)}"


# -- chaos ----------------------------------------------------------------------------------
async def pause(seconds: float, deadline: float) -> None:
    await asyncio.sleep(max(0.0, min(seconds, deadline - time.monotonic())))


async def run_cli(cluster: Cluster, *words: str) -> tuple[int, str]:
    """`mvtui WORDS --admin ROUTER_PORT`, in its own process group, bounded in time."""
    argv = [sys.executable, "-m", "mvtui", *words, "--admin", str(cluster.router_port)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=REPO,
        env=cluster.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    text = " ".join(out.decode(errors="replace").split())
    return proc.returncode or 0, text[:200]


def admin_details(cluster: Cluster) -> dict[str, Any]:
    assert cluster.mvtui is not None
    path = cluster.procs.logs / "xdg" / "xdg_state_home" / "mvtui" / "admin" / f"{cluster.mvtui.proc.pid}.json"
    return json.loads(path.read_text())


async def admin_call(session: aiohttp.ClientSession, cluster: Cluster, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    details = admin_details(cluster)
    headers = {"Authorization": f"Bearer {details['token']}"}
    async with session.request(
        method, details["url"].rstrip("/") + path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S * 4)
    ) as response:
        return response.status, " ".join((await response.text()).split())[:200]


async def set_faults(session: aiohttp.ClientSession, sim: Sim, faults: dict[str, Any]) -> str:
    try:
        async with session.post(sim.url + "/sim/faults", json=faults, timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)) as response:
            return f"{response.status}"
    except (TimeoutError, aiohttp.ClientError) as error:
        return f"failed: {type(error).__name__}"


async def restart_sim(session: aiohttp.ClientSession, cluster: Cluster, sim: Sim, log: EventLog) -> None:
    assert sim.entry is not None
    cluster.procs.stop(sim.entry, timeout=5)  # reaps it (and kills what is left of its group)
    sim.restarts += 1
    cluster.start_sim(sim)
    try:
        await wait_ready(session, sim.entry, sim.url)
        log("fault", f"{sim.name}: restarted on port {sim.port} (PID {sim.entry.proc.pid})")
    except RuntimeError as error:
        log("fault", f"{sim.name}: restart failed: {str(error).splitlines()[0]}", kind="restart failed")


async def hold_fault(
    session: aiohttp.ClientSession, cluster: Cluster, sim: Sim, fault: str, rng: random.Random, deadline: float, log: EventLog
) -> None:
    """Inject one fault into one simulator, hold it a few seconds, undo it."""
    hold = rng.uniform(3, 15)
    assert sim.entry is not None
    try:
        if fault in PROCESS_FAULTS:
            if fault == "exit":
                result = await set_faults(session, sim, {"exit": True})
                log("fault", f"{sim.name}: exit fault ({result}); down for {hold:.0f} s", kind=fault)
            else:
                signum = signal.SIGKILL if fault == "kill" else signal.SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sim.entry.proc.pid, signum)
                log("fault", f"{sim.name}: {signum.name} to PID {sim.entry.proc.pid}; down for {hold:.0f} s", kind=fault)
            await pause(hold, deadline)
            if time.monotonic() < deadline:
                await restart_sim(session, cluster, sim, log)
        elif fault == "sleep":
            level = rng.choice((1, 2))
            code, text = await run_cli(cluster, "sleep", sim.name, "--level", str(level), "--json")
            log("fault", f"{sim.name}: `mvtui sleep --level {level}` exit {code}: {text}", kind="sleep")
            await pause(hold, deadline)
            if rng.random() < 0.5:
                code, text = await run_cli(cluster, "wake", sim.name, "--json")
                log("fault", f"{sim.name}: `mvtui wake` exit {code}: {text}", kind="wake")
            else:
                status, text = await admin_call(session, cluster, "POST", f"/servers/{sim.name}/wake")
                log("fault", f"{sim.name}: admin API POST /servers/{sim.name}/wake: {status} {text}", kind="wake")
        else:
            faults = (
                SIM_FAULTS[fault]
                or {
                    "fail_rate": {"fail_rate": rng.choice((0.3, 0.7, 1.0))},
                    "slow": {"slow": rng.choice((3.0, 10.0))},
                    "cut_after_tokens": {"cut_after_tokens": rng.randint(0, 6)},
                }[fault]
            )
            result = await set_faults(session, sim, faults)
            log("fault", f"{sim.name}: {json.dumps(faults)} ({result}) for {hold:.0f} s", kind=fault)
            await pause(hold, deadline)
            result = await set_faults(session, sim, CLEAR_FAULTS)
            log("fault", f"{sim.name}: faults cleared ({result})")
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError) as error:
        log("fault", f"{sim.name}: {fault} went wrong on the injecting side: {type(error).__name__}: {error}", kind="injector error")
    finally:
        sim.busy = False


def fault_choices(sim: Sim, allowed: set[str]) -> list[str]:
    """The faults this simulator may get; sleep weighs three times on the one with sleep mode."""
    choices = [*PROCESS_FAULTS, *SIM_FAULTS] + (["sleep"] * 3 if sim.sleep_mode else [])
    return [fault for fault in choices if fault in allowed]


async def fault_lane(
    session: aiohttp.ClientSession, cluster: Cluster, rng: random.Random, deadline: float, log: EventLog, allowed: set[str]
) -> None:
    held: set[asyncio.Task[None]] = set()
    try:
        while time.monotonic() < deadline:
            await pause(rng.uniform(2, 6), deadline)
            busy = sum(sim.busy for sim in cluster.sims.values())
            free = [sim for sim in cluster.sims.values() if not sim.busy and fault_choices(sim, allowed)]
            if time.monotonic() >= deadline or busy >= MAX_FAULTED_SIMS or not free:
                continue
            sim = rng.choice(free)
            choices = fault_choices(sim, allowed)
            sim.busy = True
            task = asyncio.create_task(hold_fault(session, cluster, sim, rng.choice(choices), rng, deadline, log))
            held.add(task)
            task.add_done_callback(held.discard)
        if held:
            await asyncio.wait(held)
    finally:
        for task in held:
            task.cancel()


async def operator_lane(session: aiohttp.ClientSession, cluster: Cluster, rng: random.Random, deadline: float, log: EventLog) -> None:
    """One operator change at a time, each undone before the next."""
    while time.monotonic() < deadline:
        await pause(rng.uniform(4, 10), deadline)
        if time.monotonic() >= deadline:
            return
        action = rng.choice(("capacity", "capacity", "remove", "drain", "set-capacity"))
        name = rng.choice(sorted(cluster.in_file))
        try:
            if action == "capacity":
                cluster.capacities[name] = rng.choice((1, 2, 4, 8, 16, 32))
                cluster.write_config()
                log("config", f"file: {name} max_concurrent_requests = {cluster.capacities[name]}", kind="file capacity")
            elif action == "remove" and len(cluster.in_file) > 1:
                cluster.in_file.discard(name)
                cluster.write_config()
                log("config", f"file: {name} removed", kind="file remove")
                await pause(rng.uniform(5, 20), deadline)
                cluster.in_file.add(name)
                cluster.write_config()
                log("config", f"file: {name} added back", kind="file add")
            elif action == "drain":
                code, text = await run_cli(cluster, "drain", name, "--json")
                log("config", f"`mvtui drain {name}` exit {code}: {text}", kind="cli drain")
                await pause(rng.uniform(3, 12), deadline)
                code, text = await run_cli(cluster, "undrain", name, "--json")
                log("config", f"`mvtui undrain {name}` exit {code}: {text}", kind="cli undrain")
            elif action == "set-capacity":
                capacity = rng.choice((2, 4, 8, 16))
                code, text = await run_cli(cluster, "set-capacity", name, str(capacity), "--json")
                log("config", f"`mvtui set-capacity {name} {capacity}` exit {code}: {text}", kind="cli set-capacity")
        except (TimeoutError, OSError) as error:
            log("config", f"{action} {name} went wrong on the operator's side: {type(error).__name__}: {error}", kind="operator error")


# -- the run --------------------------------------------------------------------------------
@dataclass
class Outcome:
    tally: Tally
    readings: Readings
    events: EventLog
    seconds: float
    mvtui_alive: bool
    mvtui_exit: int | None
    tracebacks: list[str]
    sim_tracebacks: int
    final_health: str


async def soak(args: argparse.Namespace, procs: Processes, started: float) -> Outcome:
    rng = random.Random(args.seed)
    shutil.rmtree(RESULTS / "soak-logs", ignore_errors=True)  # the last run's logs and stack dumps
    log = EventLog(RESULTS / "soak-events.log", started)
    sims = {name: Sim(name, free_port(), name == SLEEPER, seed=args.seed * 100 + index * 10) for index, name in enumerate(SIM_NAMES)}
    cluster = Cluster(procs, args, sims, procs.logs / "servers.toml")
    readings, tally = Readings(), Tally()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as control:
        await start_cluster(cluster, control)
        assert cluster.mvtui is not None
        log(
            "setup", f"mvtui PID {cluster.mvtui.proc.pid} on {cluster.router_url}; " + ", ".join(f"{s.name} {s.url}" for s in sims.values())
        )
        begin = time.monotonic()
        deadline = begin + args.duration
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as traffic:
            pid, last = cluster.mvtui.proc.pid, deadline + args.client_timeout + 1
            watchers = [
                asyncio.create_task(sample_mvtui(pid, readings, begin, last)),
                asyncio.create_task(watch_mvtui(control, cluster, last, log)),
            ]
            bounded = [
                asyncio.create_task(
                    traffic_worker(traffic, cluster, tally, random.Random(rng.random()), deadline, args.client_timeout, log)
                )
                for _ in range(args.concurrency)
            ]
            bounded += [asyncio.create_task(fault_lane(control, cluster, random.Random(rng.random()), deadline, log, set(args.faults)))]
            bounded += [asyncio.create_task(operator_lane(control, cluster, random.Random(rng.random()), deadline, log))]
            try:
                await asyncio.gather(*bounded)  # all end by themselves: the deadline, then one client timeout at most
            finally:
                for task in bounded + watchers:
                    task.cancel()
                await asyncio.gather(*bounded, *watchers, return_exceptions=True)
        seconds = time.monotonic() - begin
        log("end", f"traffic stopped after {seconds:.0f} s: {tally.sent} requests")
        health = ""
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with control.get(cluster.router_url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as response:
                health = f"{response.status} {' '.join((await response.text()).split())[:300]}"
    alive = cluster.mvtui.proc.poll() is None
    procs.stop(cluster.mvtui, timeout=15)  # SIGTERM: a clean stop is part of the test
    mvtui_log = cluster.mvtui.log.read_text(errors="replace")
    kept = RESULTS / "soak-logs"  # every process's output, for a look after the scratch folder is gone
    kept.mkdir(exist_ok=True)
    for path in procs.logs.glob("*.log"):
        shutil.copyfile(path, kept / path.name)
    sim_tracebacks = sum(path.read_text(errors="replace").count("Traceback") for path in procs.logs.glob("sim-*.log"))
    return Outcome(
        tally, readings, log, seconds, alive, cluster.mvtui.proc.returncode, traceback_excerpts(mvtui_log), sim_tracebacks, health
    )


def traceback_excerpts(text: str, lines_after: int = 25) -> list[str]:
    lines = text.splitlines()
    return ["\n".join(lines[max(0, i - 2) : i + lines_after]) for i, line in enumerate(lines) if line.startswith("Traceback")]


# -- the report -------------------------------------------------------------------------------
def lost_count(tally: Tally) -> int:
    return tally.causes[LOST_NO_STATUS] + tally.causes[LOST_AFTER_200]


def stalls(events: EventLog) -> str:
    count = events.counts["health stall"]
    return f"{count} (the first {events.first['health stall']:.0f} s after the soak started)" if count else "0"


def end_state(outcome: Outcome) -> str:
    if not outcome.mvtui_alive:
        return f"DIED during the run (exit {outcome.mvtui_exit})"
    if outcome.mvtui_exit == 0:
        return "running; stopped by SIGTERM, exit 0"
    if outcome.mvtui_exit == -signal.SIGKILL:
        return "running, but DID NOT STOP on SIGTERM: killed"
    return f"running; stopped by SIGTERM, exit {outcome.mvtui_exit}"


def report(outcome: Outcome, args: argparse.Namespace, command: str, when: str) -> str:
    tally, readings = outcome.tally, outcome.readings
    ok = tally.causes[OK]
    errors = {
        cause: n
        for cause, n in tally.causes.items()
        if cause not in (OK, ABANDONED, LOST_NO_STATUS, LOST_AFTER_200) and not cause.startswith(RESET)
    }
    resets = {cause: n for cause, n in tally.causes.items() if cause.startswith(RESET)}
    first_rss, first_fds = readings.window(0, 60)
    last_rss, last_fds = readings.window(outcome.seconds - 60, outcome.seconds + 1e9)
    latencies = sorted(tally.latencies)
    p50 = latencies[len(latencies) // 2] if latencies else 0.0
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
    faults = outcome.events.counts
    fault_words = ", ".join(
        f"{kind} {n}" for kind, n in sorted(faults.items()) if kind not in ("lost", "reset", "health stall", "health recovered")
    )
    rows = [
        "| | |",
        "|---|--:|",
        f"| requests sent | {tally.sent} |",
        f"| served OK | {ok} ({100 * ok / max(1, tally.sent):.1f} %; p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms) |",
    ]
    rows += [f"| error: {cause} | {n} |" for cause, n in sorted(errors.items(), key=lambda item: -item[1])]
    rows += [f"| {ABANDONED} | {tally.causes[ABANDONED]} |"]
    rows += [f"| {cause} | {n} |" for cause, n in sorted(resets.items())] or [f"| {RESET} | 0 |"]
    rows += [
        f"| **lost without an answer** (no status, or a 200 gone silent, before the {args.client_timeout:g} s client timeout) | **{lost_count(tally)}** |",
        f"| mvtui peak RSS | {readings.peak_rss():.0f} MiB (first minute {first_rss:.0f}, last minute {last_rss:.0f}) |",
        f"| mvtui peak open file descriptors | {readings.peak_fds()} (first minute {first_fds}, last minute {last_fds}) |",
        f"| mvtui's /health unanswered within {HEALTH_TIMEOUT_S:g} s (checks every {WATCH_EVERY_S:g} s) | {stalls(outcome.events)} |",
        f"| mvtui tracebacks in its log | {len(outcome.tracebacks)} |",
        f"| mvtui at the end | {end_state(outcome)} |",
    ]
    lines = [
        f"## Soak ({when}, {outcome.seconds:.0f} s of traffic)",
        "",
        f"`{command}`",
        "",
        f"- {args.concurrency} clients, closed loop, through `mvtui --no-ui` to 3 `mvtui sim` (--tokens-per-s {args.tokens_per_s:g}, "
        f"--max-num-seqs {args.sim_max_num_seqs}); chat and completions, streamed and not, max_tokens 4-48; client timeout {args.client_timeout:g} s; seed {args.seed}",
        "- mvtui `[config]`: "
        + ", ".join(f"{k} {v}" for k, v in MVTUI_TIMING.items())
        + "; `[router]`: "
        + ", ".join(f"{k} {v}" for k, v in MVTUI_ROUTER.items()),
        f"- events: {fault_words}",
        "",
        *rows,
    ]
    examples = [f"- {cause}: {' | '.join(shown)}" for cause, shown in tally.examples.items() if shown and cause != OK]
    if examples:
        lines += ["", "Examples:", *examples]
    if tally.lost:
        lines += ["", "Lost requests:", *[f"- {item}" for item in tally.lost[:20]]]
    if outcome.tracebacks:
        lines += ["", "First traceback in mvtui's log:", "```", outcome.tracebacks[0], "```"]
    lines += [
        "",
        f"mvtui /health at the end: {outcome.final_health or 'no answer'}",
        f"Tracebacks in the simulators' logs: {outcome.sim_tracebacks}",
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Soak: mixed traffic through mvtui while its simulated backends misbehave.")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic and faults (default 600)")
    parser.add_argument("--concurrency", type=int, default=24, help="clients sending at once")
    parser.add_argument("--client-timeout", type=float, default=90.0, help="seconds a client waits for its answer")
    parser.add_argument("--tokens-per-s", type=float, default=100.0, help="the simulators' decode speed per sequence")
    parser.add_argument("--sim-max-num-seqs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--faults", nargs="+", default=list(ALL_FAULTS), choices=ALL_FAULTS, help="only these faults (default: all)")
    parser.add_argument("--output", type=Path, default=RESULTS / "soak.md")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    command = " ".join([".venv/bin/python", "benchmarks/soak.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    when = time.strftime("%Y-%m-%d %H:%M")

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    with tempfile.TemporaryDirectory(prefix="mvtui-soak-") as scratch:
        procs = Processes(Path(scratch))
        try:
            outcome = asyncio.run(soak(args, procs, started))
        except KeyboardInterrupt:
            print("soak: interrupted; stopping every process it started", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
    text = report(outcome, args, command, when)
    print(text)
    args.output.write_text(text)
    bad = lost_count(outcome.tally) or outcome.tracebacks or outcome.mvtui_exit != 0
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
