"""The admin HTTP API (token, loopback) and the `mvtui ps/start/stop/sleep/...` CLI on top of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from mvtui.config.schema import AdminConfig, Config, InstanceConfig, RouterConfig, ServerConfig, TimingConfig
from mvtui.gpu import GpuProbe
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from tests.helpers import REPO_ROOT, Proc, free_port, start_mvtui, start_sim

TIMING = TimingConfig(metrics_interval=0.1, health_check_interval=0.5, drain_timeout=10, wake_timeout=30, shutdown_timeout=3)
SIM = [sys.executable, "-m", "mvtui", "sim", "--port", "{port}", "--model", "{served_name}", "--enable-sleep-mode",
       "--tokens-per-s", "200", "--ttft-ms", "5", "--wake-ms-l1", "50", "--wake-ms-l2", "100"]  # fmt: skip
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@contextlib.asynccontextmanager
async def core(tmp_path: Path, sim: Proc, *instances: InstanceConfig) -> AsyncIterator[Services]:
    config = Config(
        router=RouterConfig(host="127.0.0.1", port=0),
        timing=TIMING,
        admin=AdminConfig(port=0),
        servers=(ServerConfig(url=sim.url, name="s0"),),
        instances=instances,
    )
    paths = AppPaths(tmp_path / "config", tmp_path / "log", tmp_path / "state")
    async with Services(config, paths=paths, gpu=GpuProbe(nvml=None)) as services:
        yield services


def own_admin_file(tmp_path: Path) -> Path:
    """The admin file of the core running in this process (`core()`'s state folder)."""
    return tmp_path / "state" / "admin" / f"{os.getpid()}.json"


class Admin:
    """The admin API with the token from the admin file, as the CLI would read it."""

    def __init__(self, session: aiohttp.ClientSession, admin_file: Path) -> None:
        details = json.loads(admin_file.read_text())
        self.session, self.url, self.token = session, details["url"], details["token"]

    async def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        async with self.session.request(method, self.url + path, json=body, headers=headers) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text


async def until_true(check: Any, timeout: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def sim_process(procs: list[Proc], extra: list[str]) -> Proc:
    sim = await asyncio.to_thread(start_sim, "m", None, ["--tokens-per-s", "200", "--ttft-ms", "5", *extra], {"VLLM_SERVER_DEV_MODE": "1"})
    procs.append(sim)
    return sim


async def test_admin_api_needs_its_token_listens_on_loopback_and_lists_everything(tmp_path: Path, procs: list[Proc]) -> None:
    sim = await sim_process(procs, [])
    child = InstanceConfig(model="child", command=tuple(SIM), port=free_port())
    admin_file = own_admin_file(tmp_path)
    async with core(tmp_path, sim, child) as services, aiohttp.ClientSession() as session:
        assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600
        admin = Admin(session, admin_file)
        assert admin.url.startswith("http://127.0.0.1:") and len(admin.token) >= 24
        assert (await admin.call("GET", "/servers", token=""))[0] == 401
        assert (await admin.call("GET", "/servers", token="wrong"))[0] == 401
        status, body = await admin.call("GET", "/servers")
        assert status == 200
        kinds = {server["name"]: server["kind"] for server in body["servers"]}
        assert kinds == {"s0": "remote", "child": "local"}
        status, body = await admin.call("GET", "/instances")
        assert [(item["name"], item["lifecycle"], item["pid"]) for item in body["instances"]] == [("child", "stopped", None)]
        status, info = await admin.call("GET", "/info")
        assert info["router_url"] == services.router_url and info["pid"] == os.getpid()
    assert not admin_file.exists()


async def test_admin_instances_and_server_actions(tmp_path: Path, procs: list[Proc]) -> None:
    sim = await sim_process(procs, [])  # no sleep mode on this one
    async with core(tmp_path, sim) as services, aiohttp.ClientSession() as session:
        admin = Admin(session, own_admin_file(tmp_path))
        port = free_port()
        params = {"command": SIM, "port": port, "env": {"PYTHONPATH": str(REPO_ROOT)}}
        status, created = await admin.call("POST", "/instances", {"model": "extra", "params": params})
        assert status == 202 and created["lifecycle"] == "starting" and created["url"] == f"http://127.0.0.1:{port}"

        async def running() -> dict | None:
            _, item = await admin.call("GET", "/instances/extra")
            assert item["lifecycle"] in ("starting", "running"), item
            return item if item["lifecycle"] == "running" else None

        item = await until_true(running)
        assert item["pid"] and item["log"].endswith(f"extra_{port}.log")
        status, state = await admin.call("GET", "/proxy/extra/sim/state")
        assert status == 200 and state["requests"] == 0
        status, page = await admin.call("GET", "/proxy/extra/metrics")
        assert status == 200 and "vllm:num_requests_running" in page
        async with session.post(services.router_url + "/v1/chat/completions", json={"model": "extra", **CHAT}) as response:
            assert response.status == 200

        status, server = await admin.call("POST", "/servers/extra/sleep", {"level": 1})
        assert status == 200 and server["state"] == "sleeping L1"
        status, body = await admin.call("POST", "/proxy/extra/v1/chat/completions", {"model": "extra", **CHAT})
        assert status == 409 and "wake it" in body["error"]["message"]  # never forwarded to a sleeper
        status, server = await admin.call("POST", "/servers/extra/wake")
        assert status == 200 and server["state"] == "up"
        status, server = await admin.call("POST", "/servers/s0/drain")
        assert server["state"] == "drained" and server["draining"]
        status, server = await admin.call("POST", "/servers/s0/undrain")
        assert server["state"] == "up"
        status, body = await admin.call("POST", "/servers/s0/sleep?level=1")
        assert status == 409 and "no sleep mode" in body["error"]["message"]

        status, gone = await admin.call("DELETE", "/instances/extra")
        assert status == 200 and gone["lifecycle"] == "stopped"
        assert (await admin.call("GET", "/instances/extra"))[0] == 404  # created by the API: forgotten too


async def test_admin_bad_input_gets_clear_errors(tmp_path: Path, procs: list[Proc]) -> None:
    sim = await sim_process(procs, [])
    async with core(tmp_path, sim), aiohttp.ClientSession() as session:
        admin = Admin(session, own_admin_file(tmp_path))
        status, body = await admin.call("POST", "/instances", {"params": {}})
        assert status == 400 and "`model`" in body["error"]["message"]
        status, body = await admin.call("POST", "/instances", {"model": "x", "params": {"gpu_memory_utilization": "lots", "prot": 1}})
        message = body["error"]["message"]
        assert status == 400 and "expected a number" in message and "did you mean 'port'" in message
        status, body = await admin.call("POST", "/servers/nope/drain")
        assert status == 404 and "no server named 'nope'" in body["error"]["message"]
        status, body = await admin.call("POST", "/servers/s0/sleep?level=3")
        assert status == 400 and "level must be 1 or 2" in body["error"]["message"]
        async with session.post(
            admin.url + "/instances", data=b"{not json", headers={"Authorization": f"Bearer {admin.token}"}
        ) as response:
            assert response.status == 400


def run_cli(args: list[str], state_home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_STATE_HOME": str(state_home)}
    return subprocess.run([sys.executable, "-m", "mvtui", *args], env=env, capture_output=True, text=True, timeout=120)


async def cli(args: list[str], state_home: Path, code: int = 0) -> str:
    done = await asyncio.to_thread(run_cli, args, state_home)
    assert done.returncode == code, f"mvtui {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout if code == 0 else done.stderr


async def test_cli_drives_a_running_mvtui(tmp_path: Path, procs: list[Proc]) -> None:
    sim = await sim_process(procs, ["--enable-sleep-mode", "--wake-ms-l2", "100"])
    config = tmp_path / "servers.toml"
    config.write_text(
        f'[servers]\nservers = [{{ url = "{sim.url}", name = "gpu-a" }}]\n'
        "[config]\nmetrics_interval = 0.1\nhealth_check_interval = 0.5\nshutdown_timeout = 3\n[admin]\nport = 0\n"
        f'[[instances]]\nmodel = "child"\nport = {free_port()}\nauto_start = false\ncommand = {json.dumps(SIM)}\n'
        f"env = {{ PYTHONPATH = {json.dumps(str(REPO_ROOT))} }}\n"
    )
    state = tmp_path / "state"
    port = free_port()
    mvtui = await asyncio.to_thread(
        start_mvtui, ["--no-ui", "--config", str(config), "--port", str(port)], env={"XDG_STATE_HOME": str(state)}
    )
    procs.append(mvtui)

    table = (await cli(["ps"], state)).splitlines()
    assert table[0].split() == ["NAME", "STATE", "MODELS", "IN-FLIGHT", "LOAD", "KIND", "PID", "URL"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["child"][1] == "stopped" and rows["child"][5] == "local" and rows["gpu-a"][5] == "remote"

    started = await cli(["start", "child"], state)
    assert started.splitlines()[-1].startswith("child running on http://127.0.0.1:")
    listing = json.loads(await cli(["ps", "--json"], state))
    pid = next(item["pid"] for item in listing["instances"] if item["name"] == "child")
    assert Path(f"/proc/{pid}").exists()
    assert f"router         {mvtui.url}" in await cli(["info"], state)

    assert (await cli(["drain", "gpu-a"], state)).strip() == "gpu-a: draining, 0 requests in flight (until restart) [drained]"
    async with aiohttp.ClientSession() as session:
        async with session.get(mvtui.url + "/load-stats") as response:
            shown = {server["name"]: server for server in (await response.json())["servers"]}
    assert shown["gpu-a"]["draining"] and shown["gpu-a"]["state"] == "drained"
    assert (await cli(["undrain", "gpu-a"], state)).strip() == "gpu-a: taking requests again (until restart) [up]"
    assert (await cli(["sleep", "gpu-a", "--level", "2"], state)).strip() == "gpu-a sleeping L2"
    assert (await cli(["wake", "gpu-a"], state)).strip() == "gpu-a up"
    assert "no server named 'nope'" in await cli(["sleep", "nope"], state, code=1)
    assert (await cli(["stop", "child"], state)).strip() == "child stopped"
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


async def test_cli_says_clearly_when_no_mvtui_is_running(tmp_path: Path) -> None:
    message = await cli(["ps"], tmp_path / "empty", code=3)
    assert "no mvtui is running (no live admin file in" in message
    stale = tmp_path / "stale" / "mvtui" / "admin" / "1.json"  # as a killed mvtui leaves it: nobody holds its lock
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"url": f"http://127.0.0.1:{free_port()}", "token": "t", "pid": 1, "router_url": "http://127.0.0.1:1"}))
    message = await cli(["wake", "x"], tmp_path / "stale", code=3)
    assert "no mvtui is running" in message and not stale.exists()


async def test_cli_edits_servers_and_the_config_file_keeps_its_comments(tmp_path: Path, procs: list[Proc]) -> None:
    first = await sim_process(procs, [])
    second = await sim_process(procs, [])
    config = tmp_path / "servers.toml"
    original = (
        "# the team's cluster\n[servers]\nservers = [\n"
        f'  {{ url = "{first.url}", name = "gpu-a", max_concurrent_requests = 4 }},  # rack 1\n]\n\n'
        "[config]\nmetrics_interval = 0.1  # fast for tests\nhealth_check_interval = 0.5\nshutdown_timeout = 3\n[admin]\nport = 0\n"
    )
    config.write_text(original)
    state = tmp_path / "state"
    port = free_port()
    mvtui = await asyncio.to_thread(
        start_mvtui, ["--no-ui", "--config", str(config), "--port", str(port)], env={"XDG_STATE_HOME": str(state)}
    )
    procs.append(mvtui)

    assert "added" in await cli(["add-server", second.url, "--capacity", "6", "--name", "gpu-b"], state)
    assert "capacity 4 -> 3 (until restart)" in await cli(["set-capacity", "gpu-a", "3"], state)
    assert "drain" not in config.read_text() and "max_concurrent_requests = 4" in config.read_text()  # live only
    assert "capacity 3 -> 2 (saved to" in await cli(["set-capacity", "gpu-a", "2", "--persist"], state)
    assert "gpu-a: draining" in await cli(["drain", "gpu-a"], state)
    assert "drain" not in config.read_text()
    assert "saved drained" in await cli(["save", "gpu-a"], state)
    assert "drain = true" in config.read_text()
    assert "taking requests again (saved to" in await cli(["undrain", "gpu-a", "--persist"], state)
    text = config.read_text()
    assert text.startswith("# the team's cluster\n") and "# rack 1" in text and "# fast for tests" in text
    assert "max_concurrent_requests = 2" in text and second.url in text and 'name = "gpu-b"' in text

    async def both_up() -> bool:
        listing = json.loads(await cli(["ps", "--json"], state))
        return {server["name"]: server["state"] for server in listing["servers"]} == {"gpu-a": "up", "gpu-b": "up"}

    await until_true(both_up)
    assert "removing gpu-b" in await cli(["remove-server", "gpu-b", "--persist"], state)
    assert second.url not in config.read_text()
    assert config.read_text() == original.replace("max_concurrent_requests = 4", "max_concurrent_requests = 2")
    assert "is already in the cluster" in await cli(["add-server", first.url], state, code=1)
