"""`preload = true` (started at mvtui's start, one after another, holding nobody up) and
restart (the operator verb, the admin API): simulators as the launched processes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import aiohttp

from mvtui.config.schema import parse_config
from tests.helpers import Proc, eventually, free_port
from tests.test_admin import Admin, own_admin_file, sim_process, until_true
from tests.test_admin import core as admin_core
from tests.test_instances import SIM, chat, core, sim_instance


def gated(gate: Path) -> tuple[str, ...]:
    """The simulator, launched only once `gate` exists: a start that lasts until the test says."""
    return ("sh", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.05; done; exec "$@"', "sh", *SIM)


def test_preload_is_a_boolean_of_instances() -> None:
    (entry,) = parse_config('[[instances]]\nmodel = "m"\npreload = true\n').instances
    assert entry.preload
    assert not parse_config('[[instances]]\nmodel = "m"\n').instances[0].preload


async def test_preload_starts_entries_in_turn_and_holds_no_request_up(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first = sim_instance("first", preload=True, command=gated(gate))
    second = sim_instance("second", preload=True)
    other = sim_instance("other")  # no preload: started by its first request
    async with core(tmp_path, first, second, other) as services:
        manager = services.instances
        assert manager is not None
        await eventually(lambda: manager.find("first").lifecycle == "starting", what="first preloading")
        assert manager.find("second").lifecycle == "stopped"  # its turn comes after first's
        assert await chat(services, "other")  # another model: not held up by the preload under way
        assert await chat(services, "second")  # one waiting its turn: its request starts it now
        assert manager.find("first").lifecycle == "starting"
        gate.touch()
        await eventually(lambda: manager.find("first").lifecycle == "running", what="first running")
        assert await chat(services, "first")
        assert manager.find("second").pid is not None and manager.find("second").lifecycle == "running"


async def test_a_failed_preload_does_not_stop_the_next(tmp_path: Path) -> None:
    broken = sim_instance("broken", preload=True, command=("sh", "-c", "exit 3"))
    after = sim_instance("after", preload=True)
    async with core(tmp_path, broken, after) as services:
        manager = services.instances
        assert manager is not None
        await eventually(lambda: manager.find("after").lifecycle == "running", what="after running")
        assert manager.find("broken").lifecycle == "error"


async def test_mvtui_stops_while_a_preload_is_still_starting(tmp_path: Path) -> None:
    gate = tmp_path / "never"
    slow = sim_instance("slow", preload=True, command=gated(gate))
    async with core(tmp_path, slow) as services:
        manager = services.instances
        assert manager is not None
        process = await eventually(lambda: manager.find("slow").process, what="slow preloading")
        assert manager.find("slow").lifecycle == "starting"
    assert manager.find("slow").lifecycle == "stopped" and process.returncode is not None


async def test_restart_starts_a_new_process_with_the_settings_changed_since(tmp_path: Path) -> None:
    entry = sim_instance("again", auto_start=False)
    async with core(tmp_path, entry) as services:
        manager, operator = services.instances, services.operator
        assert manager is not None and operator is not None
        await operator.start("again")
        old_pid = manager.find("again").pid
        changed = dataclasses.replace(entry, max_concurrent_requests=3)
        manager.apply([changed])  # running: it waits for the next start
        assert manager.find("again").pending_config == changed
        restarted = await operator.restart("again")
        assert restarted.lifecycle == "running" and restarted.pid not in (None, old_pid)
        assert restarted.config == changed and restarted.pending_config is None
        assert restarted.server.capacity == 3
        assert old_pid is not None and not _alive(old_pid)
        assert await chat(services, "again")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[1].startswith(" Z")


async def test_restart_through_the_admin_api(tmp_path: Path, procs: list[Proc]) -> None:
    sim = await sim_process(procs, [])
    params = {"command": SIM, "port": free_port(), "env": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}}
    async with admin_core(tmp_path, sim), aiohttp.ClientSession() as session:
        admin = Admin(session, own_admin_file(tmp_path))
        status, _ = await admin.call("POST", "/instances", {"model": "api-made", "params": params, "wait": True})
        assert status == 200
        _, before = await admin.call("GET", "/instances/api-made")
        status, begun = await admin.call("POST", "/instances/api-made/restart", {"wait": False})
        assert status == 202 and begun["lifecycle"] == "stopping"

        async def running() -> dict | None:
            _, item = await admin.call("GET", "/instances/api-made")
            return item if item["lifecycle"] == "running" and item["pid"] != before["pid"] else None

        assert await until_true(running)
        status, waited = await admin.call("POST", "/instances/api-made/restart")
        assert status == 200 and waited["lifecycle"] == "running"
        status, body = await admin.call("POST", "/instances/nope/restart")
        assert status == 404 and "no instance named 'nope'" in body["error"]["message"]
        status, body = await admin.call("POST", "/instances/api-made/restart", {"wait": "later"})
        assert status == 400 and "`wait` must be true or false" in body["error"]["message"]
