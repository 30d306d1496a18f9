"""Local instances under stress: they end with mvtui however mvtui ends (SIGHUP, SIGKILL),
even behind a wrapper command; a squatter on an instance's port is never taken for the
instance; and `mvtui start` never creates an instance by accident.

Real processes on 127.0.0.1 (the simulator as vLLM), ended by pid or process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster
from mvtui.config.schema import InstanceConfig, TimingConfig
from mvtui.errors import CommandError
from mvtui.instances.guard import GroupGuard
from mvtui.instances.idle import IdleKeeper
from mvtui.instances.listeners import check_listener, parse_address
from mvtui.instances.manager import InstanceManager
from mvtui.instances.registry import Registry
from tests.helpers import REPO_ROOT, Proc, admin_files, eventually, free_port, group_members, start_mvtui, start_sim

TIMING = TimingConfig(metrics_interval=0.1, health_check_interval=0.5, drain_timeout=5, wake_timeout=30, shutdown_timeout=3)
SIM = (sys.executable, "-m", "mvtui", "sim", "--port", "{port}", "--model", "{served_name}", "--tokens-per-s", "500", "--ttft-ms", "1")
# As `bash -c "vllm serve ...; ..."`: the simulator is the shell's child, not exec'd in its place.
WRAPPED = ("bash", "-c", '"$0" "$@"; echo "the wrapper is done"', *SIM)
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


# --- processes and groups -----------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def watchdogs_of(pid: int) -> list[int]:
    return [child for child in children(pid) if b"guard.py" in Path(f"/proc/{child}/cmdline").read_bytes()]


@contextlib.contextmanager
def ended_at_the_end(groups: list[int], pids: list[int]) -> Iterator[None]:
    """Whatever the test's outcome, what it started does not outlive it."""
    try:
        yield
    finally:
        for pgid in groups:
            if group_members(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# --- mvtui as a process ---------------------------------------------------------------------


def write_config(path: Path, command: tuple[str, ...], auto_start: bool = True) -> None:
    path.write_text(
        "[config]\nmetrics_interval = 0.1\nhealth_check_interval = 0.5\nshutdown_timeout = 3\n[admin]\nport = 0\n"
        f'[[instances]]\nmodel = "child"\nport = {free_port()}\nauto_start = {str(auto_start).lower()}\n'
        f"command = {json.dumps(list(command))}\nenv = {{ PYTHONPATH = {json.dumps(str(REPO_ROOT))} }}\n"
    )


async def start_headless(tmp_path: Path, command: tuple[str, ...], procs: list[Proc], auto_start: bool = True) -> Proc:
    config = tmp_path / "servers.toml"
    write_config(config, command, auto_start)
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    args = ["--no-ui", "--config", str(config), "--port", str(free_port())]
    mvtui = await asyncio.to_thread(start_mvtui, args, env=env)
    procs.append(mvtui)
    await eventually(lambda: admin_file(tmp_path).exists(), what="the admin API")  # it starts after the router
    return mvtui


def admin_file(tmp_path: Path) -> Path:
    """The admin file of the one mvtui running on this test's state folder, or where none is."""
    found = admin_files(tmp_path / "state")
    return found[0] if found else tmp_path / "state" / "mvtui" / "admin" / "none.json"


async def admin_call(tmp_path: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    details = json.loads(admin_file(tmp_path).read_text())
    headers = {"Authorization": f"Bearer {details['token']}"}
    async with aiohttp.ClientSession() as session, session.request(method, details["url"] + path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def admin_get(tmp_path: Path, path: str) -> Any:
    status, body = await admin_call(tmp_path, "GET", path)
    assert status == 200, body
    return body


async def serving_instance(tmp_path: Path, mvtui: Proc) -> int:
    """Send one request (which starts the instance); the instance's process group id."""
    async with aiohttp.ClientSession() as session:
        async with session.post(mvtui.url + "/v1/chat/completions", json={"model": "child", **CHAT}) as response:
            assert response.status == 200, await response.text()
    (instance,) = (await admin_get(tmp_path, "/instances"))["instances"]
    assert instance["lifecycle"] == "running"
    return int(instance["pid"])


async def wrapped_sim_in_mvtui(tmp_path: Path, procs: list[Proc]) -> tuple[Proc, int]:
    mvtui = await start_headless(tmp_path, WRAPPED, procs)
    group = await serving_instance(tmp_path, mvtui)
    members = group_members(group)
    assert len(members) == 2 and group in members  # bash, and the simulator as its child
    return mvtui, group


# --- item: managed instances must not outlive mvtui --------------------------------------------


async def test_sighup_stops_mvtui_gracefully_and_ends_a_wrapped_instance(tmp_path: Path, procs: list[Proc]) -> None:
    mvtui, group = await wrapped_sim_in_mvtui(tmp_path, procs)
    watchdogs = watchdogs_of(mvtui.pid)
    with ended_at_the_end([group], watchdogs):
        assert admin_file(tmp_path).exists() and len(watchdogs) == 1
        os.kill(mvtui.pid, signal.SIGHUP)  # the terminal closed
        code = await asyncio.to_thread(mvtui.proc.wait, 60)
        assert code == 0, mvtui.log_tail()  # handled like SIGTERM, not killed (129)
        assert group_members(group) == []
        assert not admin_file(tmp_path).exists()
        assert "stopping: no new requests" in mvtui.log_tail(200)
        assert not alive(watchdogs[0])  # told to exit, and reaped


async def test_sigkill_of_mvtui_ends_the_whole_group_of_a_wrapped_instance(tmp_path: Path, procs: list[Proc]) -> None:
    mvtui, group = await wrapped_sim_in_mvtui(tmp_path, procs)
    watchdogs = watchdogs_of(mvtui.pid)
    assert len(watchdogs) == 1
    with ended_at_the_end([group], watchdogs):
        os.kill(mvtui.pid, signal.SIGKILL)  # no code of mvtui runs after this
        await asyncio.to_thread(mvtui.proc.wait, 10)
        await eventually(lambda: group_members(group) == [], timeout=30, what="the wrapper and the simulator to exit")
        await eventually(lambda: not alive(watchdogs[0]), timeout=30, what="the watchdog to exit after its work")


async def test_watchdog_ends_listed_groups_and_spares_forgotten_ones() -> None:
    """The watchdog alone, in process: closing its pipe (as the kernel does when mvtui dies)
    ends every group still listed; a group mvtui has forgotten is left alone."""
    listed = await asyncio.create_subprocess_exec("sh", "-c", "sleep 300 & wait", start_new_session=True)
    forgotten = await asyncio.create_subprocess_exec("sh", "-c", "sleep 300 & wait", start_new_session=True)
    guard = GroupGuard()
    with ended_at_the_end([listed.pid, forgotten.pid], []):
        await eventually(lambda: len(group_members(listed.pid)) == 2 and len(group_members(forgotten.pid)) == 2)
        await guard.watch(listed.pid, 5)
        await guard.watch(forgotten.pid, 5)
        await guard.forget(forgotten.pid)
        watchdog = guard.pid
        assert watchdog is not None and os.getpgid(watchdog) == watchdog  # its own session: no terminal signal reaches it
        await guard.close()
        assert not alive(watchdog)
        assert group_members(listed.pid) == [] and await listed.wait() == -signal.SIGTERM
        assert len(group_members(forgotten.pid)) == 2


async def test_watchdog_that_dies_is_replaced_and_told_every_group() -> None:
    group = await asyncio.create_subprocess_exec("sleep", "300", start_new_session=True)
    guard = GroupGuard()
    with ended_at_the_end([group.pid], []):
        await guard.watch(group.pid, 5)
        first = guard.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: guard.pid is None, what="the first watchdog to be reaped")
        other = await asyncio.create_subprocess_exec("sleep", "300", start_new_session=True)
        with ended_at_the_end([other.pid], []):
            await guard.watch(other.pid, 5)  # a new watchdog, told both groups
            assert guard.pid not in (None, first)
            await guard.close()
            assert group_members(group.pid) == [] and group_members(other.pid) == []


# --- item: a squatter on an instance's port ---------------------------------------------------------


@contextlib.asynccontextmanager
async def instance_manager(tmp_path: Path, *configs: InstanceConfig) -> AsyncIterator[InstanceManager]:
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(TIMING)
        control = Controller(cluster, session, lambda: TIMING)
        manager = InstanceManager(cluster, control, session, tmp_path / "logs", lambda: TIMING)
        for config in configs:
            manager.add(config, origin="config")
        try:
            yield manager
        finally:
            await manager.stop_all()


def sim_instance(name: str, *extra: str, port: int | None = None) -> InstanceConfig:
    env = (("PYTHONPATH", str(REPO_ROOT)),)
    return InstanceConfig(model=name, port=port or free_port(), command=(*SIM, *extra), env=env, startup_timeout=120)


async def test_a_squatter_on_the_port_of_a_loading_instance_is_not_taken_for_it(tmp_path: Path, procs: list[Proc]) -> None:
    config = sim_instance("slow", "--startup-ms", "600000")  # the simulator listens only after 10 minutes
    async with instance_manager(tmp_path, config) as manager:
        instance = manager.find("slow")
        start = asyncio.create_task(manager.start("slow"))
        pid = await eventually(lambda: instance.pid, what="the instance's process")
        assert pid is not None
        with ended_at_the_end([pid], []):
            squatter = await asyncio.to_thread(start_sim, "slow", config.port)  # answers /health 200 on its port
            procs.append(squatter)
            with pytest.raises(CommandError) as failure:
                await start
            message = str(failure.value)
            assert f"port {config.port} answers /health, but not from slow's processes" in message
            assert f"pid {squatter.pid} (" in message and "sim" in message
            assert instance.lifecycle == "error" and instance.server.state == "error" and not instance.server.routable
            assert "another program listens there" in instance.error
            assert group_members(pid) == []  # the instance's own process is ended
            assert squatter.alive()  # and nobody else's


async def test_an_instance_that_owns_its_socket_is_running(tmp_path: Path) -> None:
    async with instance_manager(tmp_path, sim_instance("own")) as manager:
        instance = await manager.start("own")
        assert instance.lifecycle == "running"
        verdict = await asyncio.to_thread(check_listener, instance.port, instance.pid)  # type: ignore[arg-type]
        assert verdict.ours


@pytest.mark.parametrize("family, address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")])
async def test_listener_check_tells_our_group_from_another(family: socket.AddressFamily, address: str) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((address, 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert check_listener(port, os.getpgrp()).ours  # this test process's own group
        other = await asyncio.create_subprocess_exec("sleep", "300", start_new_session=True)
        with ended_at_the_end([other.pid], []):
            verdict = check_listener(port, other.pid)
        assert not verdict.ours and f"pid {os.getpid()} (" in verdict.detail


def test_a_listener_elsewhere_or_nothing_is_no_squatter() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))  # not reached by a connection to 127.0.0.1
        listener.listen()
        port = listener.getsockname()[1]
        other = subprocess.Popen(["sleep", "300"], start_new_session=True)
        try:
            assert check_listener(port, other.pid).ours
            assert check_listener(free_port(), other.pid).ours  # nothing listens: nothing to hold against it
        finally:
            other.kill()
            other.wait()
    if sys.byteorder == "little":
        assert str(parse_address("0100007F")) == "127.0.0.1"
    assert str(parse_address("00000000000000000000000000000000")) == "::"


# --- item: `mvtui start <typo>` creates nothing ----------------------------------------------------


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_STATE_HOME": str(tmp_path / "state")}
    return subprocess.run([sys.executable, "-m", "mvtui", *args], env=env, capture_output=True, text=True, timeout=120)


async def test_start_of_an_unknown_name_creates_nothing_and_lists_the_instances(tmp_path: Path, procs: list[Proc]) -> None:
    await start_headless(tmp_path, SIM, procs, auto_start=False)
    typo = await asyncio.to_thread(run_cli, ["start", "chlid"], tmp_path)
    assert typo.returncode == 1, typo.stderr
    assert "no instance named 'chlid'; instances: child" in typo.stderr and "mvtui start --new chlid" in typo.stderr
    options = await asyncio.to_thread(run_cli, ["start", "chlid", "--port", "9999"], tmp_path)
    assert options.returncode == 1 and "--port describes a new instance: add --new" in options.stderr
    assert [item["name"] for item in (await admin_get(tmp_path, "/instances"))["instances"]] == ["child"]
    started = await asyncio.to_thread(run_cli, ["start", "child"], tmp_path)
    assert started.returncode == 0 and "child running on http://127.0.0.1:" in started.stdout, started.stderr


async def test_the_admin_api_creates_only_when_asked(tmp_path: Path, procs: list[Proc]) -> None:
    """`mvtui start --new` sends "create": true, as API clients do by default."""
    await start_headless(tmp_path, SIM, procs, auto_start=False)
    status, body = await admin_call(tmp_path, "POST", "/instances", {"model": "chlid", "create": False})
    assert status == 404 and body["error"]["message"] == "no instance named 'chlid'; instances: child"
    params = {"command": list(SIM), "env": {"PYTHONPATH": str(REPO_ROOT)}, "port": free_port()}
    status, body = await admin_call(tmp_path, "POST", "/instances", {"model": "extra", "params": params, "create": False})
    assert status == 400 and "create" in body["error"]["message"]
    assert [item["name"] for item in (await admin_get(tmp_path, "/instances"))["instances"]] == ["child"]
    status, body = await admin_call(tmp_path, "POST", "/instances", {"model": "extra", "params": params, "wait": True})
    assert status == 200 and body["lifecycle"] == "running" and body["origin"] == "api"


# --- the idle loop survives failures ---------------------------------------------------------


class FlakyControl:
    """A sleep/wake controller with bugs: `busy` fails once, `sleep_if_idle` always."""

    def __init__(self) -> None:
        self.busy_calls = 0

    def busy(self, server: Any) -> bool:
        self.busy_calls += 1
        if self.busy_calls == 1:
            raise RuntimeError("a bug in busy")
        return False

    async def sleep_if_idle(self, server: Any, level: int) -> bool:
        raise RuntimeError("a bug in sleep")


async def test_the_idle_loop_logs_failures_and_goes_on() -> None:
    cluster = Cluster(TIMING, clock=lambda: 100.0)
    registry = Registry(cluster)
    instance = registry.add(InstanceConfig(model="idle", port=free_port(), idle_timeout=1.0, idle_action="sleep1"), "config")
    instance.server.lifecycle = "running"
    instance.server.last_used = 0.0
    keeper = IdleKeeper(registry.instances, cluster, FlakyControl(), lambda label, reason: asyncio.sleep(0), lambda: 100.0)  # type: ignore[arg-type]
    loop = asyncio.create_task(keeper.run())
    try:
        failure = "idle for 1 s, but sleep1 failed: RuntimeError: a bug in sleep"
        await eventually(lambda: any(event.message == failure for event in cluster.events), what="the failed idle sleep to be reported")
        assert not loop.done()  # the first pass failed in `busy`; the loop went on
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await keeper.cancel()
