"""How long an admin command of the CLI takes, end to end, on 127.0.0.1.

One `mvtui --no-ui` with one simulated vLLM server, on a config file and with XDG folders in
a temporary folder (so its admin file is the one the timed commands read). The script runs
one round that is not counted (it writes __pycache__, as a user's first call does: the timed
calls cache bytecode as an installed mvtui does, even where PYTHONDONTWRITEBYTECODE is set),
then N rounds, each running every command once in rotated order, so a busy moment of the
machine slows every row alike. It prints each command's median and 90th percentile wall
time, and its median CPU time (user + system), which other work on the machine changes far
less than the wall time:

- `python -c pass`: the interpreter's own start, the floor no Python CLI can go under;
- `python -m mvtui ps` and the `mvtui ps` console script;
- `mvtui top`, `mvtui info` and `mvtui --help`.

Every process runs in its own process group and is stopped by that group at the end.

    python benchmarks/cli_latency.py [--runs 30] [--skip script top]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import REPO_ROOT, Proc, free_port, start_mvtui, start_sim, wait_until  # noqa: E402

CONFIG = """# CLI latency benchmark
[servers]
servers = [{{ url = "{url}", name = "bench" }}]

[admin]
port = 0
"""


def console_script() -> str:
    """The `mvtui` entry point installed next to this interpreter (else the one on PATH)."""
    beside = Path(sys.executable).with_name("mvtui")
    found = str(beside) if beside.exists() else shutil.which("mvtui")
    if found is None:
        raise SystemExit("no `mvtui` console script: pip install -e . first")
    return found


def commands(skip: Sequence[str]) -> list[tuple[str, list[str]]]:
    """What to time: the floor first (the table's "above the floor" is measured from it)."""
    python = sys.executable
    script = [python, "-m", "mvtui"] if "script" in skip else [console_script()]
    every = {
        "floor": ("python -c pass (floor)", [python, "-c", "pass"]),
        "ps": ("python -m mvtui ps", [python, "-m", "mvtui", "ps"]),
        "script": ("mvtui ps (console script)", [*script, "ps"]),
        "top": ("mvtui top", [*script, "top"]),
        "info": ("mvtui info", [*script, "info"]),
        "help": ("mvtui --help", [*script, "--help"]),
    }
    return [every["floor"]] + [every[key] for key in every if key != "floor" and key not in skip]


class Timings(NamedTuple):
    wall: list[float]  # seconds from start to exit
    cpu: list[float]  # user + system seconds of the command's process: what load on the machine changes least


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_run(argv: Sequence[str], env: dict[str, str], timings: Timings) -> None:
    """One run's wall and CPU time; a failing command ends the benchmark with its output."""
    cpu, started = children_cpu(), time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    timings.wall.append(time.perf_counter() - started)
    timings.cpu.append(children_cpu() - cpu)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")


def time_rounds(chosen: list[tuple[str, list[str]]], runs: int, env: dict[str, str]) -> list[tuple[str, Timings]]:
    """Each round runs every command once, in rotated order, so a busy moment of the
    machine slows every row alike instead of one."""
    results = [(name, Timings([], [])) for name, _ in chosen]
    for _, argv in chosen:  # a round not counted: writes the bytecode caches
        time_run(argv, env, Timings([], []))
    for round_number in range(runs):
        for index in range(len(chosen)):
            turn = (index + round_number) % len(chosen)
            time_run(chosen[turn][1], env, results[turn][1])
    return results


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def report(results: list[tuple[str, Timings]]) -> str:
    floor = statistics.median(results[0][1].wall)
    lines = ["| command | median ms | p90 ms | above the floor ms | CPU ms (median) |", "|---|--:|--:|--:|--:|"]
    for name, timings in results:
        median = statistics.median(timings.wall)
        cells = [
            f"{median * 1000:.0f}",
            f"{p90(timings.wall) * 1000:.0f}",
            f"{(median - floor) * 1000:+.0f}",
            f"{statistics.median(timings.cpu) * 1000:.0f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scratch_env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    for kind in ("CONFIG", "STATE", "DATA", "CACHE"):
        env[f"XDG_{kind}_HOME"] = str(folder / kind.lower())
    env.pop("MVTUI_CONFIG", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: modules compiled once, not at every call
    return env


def start_cluster(folder: Path, env: dict[str, str]) -> list[Proc]:
    sim = start_sim("bench")
    config = folder / "servers.toml"
    config.write_text(CONFIG.format(url=sim.url))
    port = free_port()
    args = ["--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    router = start_mvtui(args, port=port, env={key: env[key] for key in env if key.startswith("XDG_")})
    ps = [sys.executable, "-m", "mvtui", "ps"]
    wait_until(lambda: subprocess.run(ps, env=env, cwd=REPO_ROOT, capture_output=True, check=False).returncode == 0, what="the admin API")
    return [sim, router]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each command (default %(default)s)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("ps", "script", "top", "info", "help"),
        help="leave these rows out: `--skip script top` times another checkout (copy this file into it), whose "
        "commands the installed console script does not run and which may have no `top`",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mvtui-cli-"))
    env = scratch_env(folder)
    procs: list[Proc] = []
    try:
        procs = start_cluster(folder, env)
        results = time_rounds(commands(args.skip), args.runs, env)
    finally:
        for proc in procs:
            proc.stop()
        shutil.rmtree(folder, ignore_errors=True)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{args.runs} runs each, {time.strftime('%Y-%m-%d %H:%M')}, Python {sys.version.split()[0]}, load average {load}")
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
