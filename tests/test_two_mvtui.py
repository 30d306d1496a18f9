"""Two mvtui on one machine: one admin file each, the CLI never talks to the wrong one, and a
port that is taken gives one clear line (router, admin API, simulator). Real processes on
127.0.0.1, real files on disk."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mvtui.admin.client import EXIT_FAILED, EXIT_NOT_RUNNING, run_admin_command
from mvtui.admin.running import AdminFile, running_mvtuis
from mvtui.config.schema import AdminConfig, Config, RouterConfig, TimingConfig
from mvtui.errors import ListenError
from mvtui.gpu import GpuProbe
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from tests.helpers import REPO_ROOT, Proc, free_port, start_mvtui, wait_until

QUICK_STOP = "[config]\nshutdown_timeout = 1\n"


def run_cli(args: list[str], state_home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_STATE_HOME": str(state_home)}
    environment.pop("MVTUI_ADMIN", None)
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "mvtui", *args], env=environment, capture_output=True, text=True, timeout=60)


def admin_folder(state_home: Path) -> Path:
    return state_home / "mvtui" / "admin"


def headless(tmp_path: Path, name: str, admin_port: int, router_port: int | None = None) -> Proc:
    config = tmp_path / f"{name}.toml"
    config.write_text(f"{QUICK_STOP}[admin]\nport = {admin_port}\n")
    port = router_port or free_port()
    args = ["--no-ui", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    mvtui = start_mvtui(args, env={"XDG_STATE_HOME": str(tmp_path / "state")})
    wait_until(lambda: (admin_folder(tmp_path / "state") / f"{mvtui.pid}.json").exists(), what=f"{name}'s admin file")
    return mvtui


def router_of(info: subprocess.CompletedProcess[str]) -> str:
    assert info.returncode == 0, info.stderr
    return next(line.split()[1] for line in info.stdout.splitlines() if line.startswith("router"))


def test_two_mvtui_run_side_by_side_and_the_cli_is_never_wrong(tmp_path: Path, procs: list[Proc]) -> None:
    state, admin_port = tmp_path / "state", free_port()
    first = headless(tmp_path, "first", admin_port)
    procs.append(first)
    second = headless(tmp_path, "second", admin_port)  # the same admin port: taken
    procs.append(second)
    assert f"admin port {admin_port} is taken by mvtui PID {first.pid}" in second.log_tail()

    several = run_cli(["ps"], state)
    assert several.returncode == EXIT_FAILED
    assert "2 mvtui are running; choose one with --admin PID" in several.stderr
    assert f"PID {first.pid}  router {first.url}" in several.stderr and f"PID {second.pid}  router {second.url}" in several.stderr
    assert router_of(run_cli(["info", "--admin", str(second.pid)], state)) == second.url
    assert router_of(run_cli(["info"], state, MVTUI_ADMIN=str(first.port))) == first.url  # a router port names it too
    assert router_of(run_cli(["info", "--admin", f"http://127.0.0.1:{admin_port}"], state)) == first.url
    unknown = run_cli(["info", "--admin", "1"], state)
    assert unknown.returncode == EXIT_NOT_RUNNING and "no running mvtui is '1'; running now:" in unknown.stderr

    second.stop()  # the first one's admin file is untouched: the CLI finds it alone
    assert router_of(run_cli(["info"], state)) == first.url

    first.kill()  # no goodbye: its file stays, but nobody holds its lock
    assert (admin_folder(state) / f"{first.pid}.json").exists()
    gone = run_cli(["ps"], state)
    assert gone.returncode == EXIT_NOT_RUNNING and "no mvtui is running" in gone.stderr
    assert not (admin_folder(state) / f"{first.pid}.json").exists()  # the stale file is cleaned up


def test_a_busy_router_port_is_one_line_naming_the_mvtui_that_has_it(tmp_path: Path, procs: list[Proc]) -> None:
    first = headless(tmp_path, "first", free_port())
    procs.append(first)
    config = tmp_path / "second.toml"
    config.write_text(f"{QUICK_STOP}[admin]\nport = {free_port()}\n")
    args = ["--no-ui", "--config", str(config), "--host", "127.0.0.1", "--port", str(first.port)]
    second = start_mvtui(args, env={"XDG_STATE_HOME": str(tmp_path / "state")}, wait=False)
    procs.append(second)
    assert second.proc.wait(30) == 1
    output = second.log_tail(200)
    expected = (
        f"mvtui cannot start: the router cannot listen on 127.0.0.1:{first.port}: address already in use "
        f"(mvtui PID {first.pid} has its router there); choose another port with --port or [router] port"
    )
    assert expected in output
    assert "Traceback" not in output and "Unclosed" not in output, output
    assert [line for line in output.splitlines() if "ERROR" in line] == [line for line in output.splitlines() if expected in line]


def test_a_busy_port_stops_the_simulator_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "mvtui", "sim", "--port", str(port)],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr == f"mvtui sim: cannot listen on 127.0.0.1:{port}: address already in use; choose another port with --port\n"


# --- in this process -------------------------------------------------------------------------


def scratch(tmp_path: Path) -> AppPaths:
    return AppPaths(config_dir=tmp_path / "config", log_dir=tmp_path / "log", state_dir=tmp_path / "state")


def core_config(router_port: int = 0, admin: AdminConfig | None = None) -> Config:
    return Config(
        router=RouterConfig(host="127.0.0.1", port=router_port),
        timing=TimingConfig(shutdown_timeout=1),
        admin=admin or AdminConfig(port=0),
    )


async def cli_in_process(args: list[str], paths: AppPaths) -> tuple[int, str]:
    from mvtui.cli import build_parser

    parsed = build_parser().parse_args(args)
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(run_admin_command, parsed, paths, out, err)
    return code, out.getvalue() + err.getvalue()


async def test_a_busy_router_port_leaves_nothing_open(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        services = Services(core_config(holder.getsockname()[1]), paths=scratch(tmp_path), gpu=GpuProbe(nvml=None))
        with pytest.raises(ListenError, match="address already in use; choose another port with --port"):
            async with services:
                pass
    assert services.session is not None and services.session.closed  # no "Unclosed client session"
    assert services.poller is not None and all(task.done() for task in services.supervisor.tasks)


async def test_when_the_admin_api_cannot_start_the_router_serves_and_both_say_why(tmp_path: Path) -> None:
    paths = scratch(tmp_path)
    unassigned = AdminConfig(host="192.0.2.1", port=free_port())  # TEST-NET-1: no interface has it
    async with Services(core_config(admin=unassigned), paths=paths, gpu=GpuProbe(nvml=None)) as services:
        assert services.admin is not None and services.admin.url is None
        assert services.admin.problem == f"cannot listen on 192.0.2.1:{unassigned.port}: cannot assign requested address"
        with socket.create_connection(("127.0.0.1", services.router_port or 0)):
            pass  # the router serves all the same
        code, said = await cli_in_process(["ps"], paths)
        assert code == EXIT_FAILED
        assert f"mvtui PID {os.getpid()} is running, but its admin API is off: {services.admin.problem}" in said


async def test_an_admin_api_turned_off_is_reported_as_off_not_as_no_mvtui(tmp_path: Path) -> None:
    paths = scratch(tmp_path)
    async with Services(core_config(admin=AdminConfig(enabled=False)), paths=paths, gpu=GpuProbe(nvml=None)) as services:
        assert services.admin is not None and services.admin.problem is None  # nothing went wrong
        code, said = await cli_in_process(["info"], paths)
        assert code == EXIT_FAILED and "its admin API is off: [admin] enabled = false" in said
    assert await cli_in_process(["info"], paths) == (EXIT_NOT_RUNNING, said_not_running(paths))


def said_not_running(paths: AppPaths) -> str:
    return f"mvtui info: no mvtui is running (no live admin file in {paths.admin_dir}); start one with `mvtui` or `mvtui --no-ui`\n"


# --- the admin file itself -------------------------------------------------------------------


def test_an_admin_file_is_live_while_its_lock_is_held(tmp_path: Path) -> None:
    folder = tmp_path / "admin"
    own = AdminFile(folder)
    own.publish({"pid": os.getpid(), "router_url": "http://127.0.0.1:1", "url": "http://127.0.0.1:2", "token": "t"})
    assert oct(own.path.stat().st_mode & 0o777) == "0o600"
    assert [entry.pid for entry in running_mvtuis(folder)] == [os.getpid()]
    own.withdraw()
    assert not own.path.exists() and running_mvtuis(folder) == []


def test_a_file_nobody_holds_is_stale_and_removed(tmp_path: Path) -> None:
    folder = tmp_path / "admin"
    folder.mkdir()
    stale = folder / "4242.json"  # as a mvtui killed with SIGKILL leaves it
    stale.write_text(json.dumps({"pid": 4242, "router_url": "http://127.0.0.1:1", "url": "http://127.0.0.1:2", "token": "t"}))
    (folder / "notes.txt").write_text("not an admin file")
    assert running_mvtuis(folder) == []
    assert not stale.exists() and (folder / "notes.txt").exists()


def test_a_live_file_of_another_process_is_seen_until_it_ends(tmp_path: Path) -> None:
    folder = tmp_path / "admin"
    holder = (
        "import os, sys, time\nfrom pathlib import Path\nfrom mvtui.admin.running import AdminFile\n"
        "AdminFile(Path(sys.argv[1])).publish({'pid': os.getpid(), 'router_url': 'http://127.0.0.1:1', 'url': None})\n"
        "print('published', flush=True)\ntime.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder, str(folder)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(process.wait)
        cleanup.callback(process.kill)
        assert process.stdout is not None and process.stdout.readline() == "published\n"
        assert [(entry.pid, entry.admin_url) for entry in running_mvtuis(folder)] == [(process.pid, None)]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert running_mvtuis(folder) == []
