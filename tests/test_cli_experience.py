"""The command line as an operator meets it: admin commands that load nothing they do not
use, a help page per command, `mvtui top`, messages that say what is true (paths, what is
bound, why a verb cannot work) and counts written in words.

One `mvtui --no-ui` serves the tests that need a running one: a simulator with sleep mode
(`gpu-a`) and one without, killed after its first poll (`down-one`, down, known to have no
sleep mode), with the config file named by a relative path."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mvtui.admin.client import COMMANDS
from mvtui.admin.top import format_top
from mvtui.admin.wire import WireError, exchange
from mvtui.cli import build_parser, load_startup_config, main
from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster, Health
from mvtui.config.schema import Config, RouterConfig, ServerConfig, TimingConfig
from mvtui.control.live_config import LiveConfig
from mvtui.control.operator import Operator
from mvtui.errors import CommandError
from mvtui.paths import AppPaths
from mvtui.runtime.bind import listening_line
from mvtui.runtime.headless import log_startup, summary_line
from tests.helpers import REPO_ROOT, Proc, free_port, start_mvtui, start_sim, wait_until

DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}
# What an admin command must not load: the core, its HTTP stack, the dashboard, the parser.
HEAVY = ("aiohttp", "textual", "rich", "prometheus_client", "tomlkit", "watchfiles", "yarl", "multidict", "asyncio", "http.client", "ssl")
CORE = ("mvtui.config", "mvtui.cluster", "mvtui.control", "mvtui.router", "mvtui.runtime", "mvtui.instances", "mvtui.ui", "mvtui.sim")


@dataclass
class Running:
    mvtui: Proc
    port: int
    config: Path
    state: Path


def cli(running: Running, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_STATE_HOME": str(running.state)}
    return subprocess.run([sys.executable, "-m", "mvtui", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def servers(running: Running) -> dict[str, dict[str, Any]]:
    """By name, as `mvtui ps --json` lists them; empty until mvtui answers."""
    done = cli(running, "ps", "--json")
    return {server["name"]: server for server in json.loads(done.stdout)["servers"]} if done.returncode == 0 else {}


def down_one_is(running: Running, key: str, value: object) -> bool:
    return servers(running).get("down-one", {}).get(key, "not yet") == value


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("cli")
    started: list[Proc] = []
    try:
        started.append(start_sim("m", extra=["--enable-sleep-mode", "--tokens-per-s", "500", "--ttft-ms", "5"], env=DEV_MODE))
        started.append(plain := start_sim("other"))  # no sleep mode: /is_sleeping answers 404
        config = folder / "servers.toml"
        config.write_text(
            f'[servers]\nservers = [{{ url = "{started[0].url}", name = "gpu-a" }}, {{ url = "{plain.url}", name = "down-one" }}]\n'
            "[config]\nmetrics_interval = 0.1\nhealth_check_interval = 0.2\nshutdown_timeout = 3\n[admin]\nport = 0\n"
        )
        port = free_port()
        args = ["--no-ui", "--config", os.path.relpath(config, REPO_ROOT), "--port", str(port), "--host", "127.0.0.1"]
        started.append(mvtui := start_mvtui(args, env={"XDG_STATE_HOME": str(folder / "state")}))
        ready = Running(mvtui, port, config, folder / "state")
        wait_until(lambda: down_one_is(ready, "sleep_capable", False), what="down-one polled")
        plain.stop()
        wait_until(lambda: down_one_is(ready, "state", "down"), what="down-one down")
        yield ready
    finally:
        for proc in reversed(started):
            proc.stop()


# --- 1. the CLI answers at once: it loads neither the core nor aiohttp -----------------------------

LOADED = """
import json, sys
from mvtui.cli import main
codes = [main(["ps"]), main(["top"]), main(["info"])]
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def test_admin_commands_load_neither_the_core_nor_aiohttp_nor_textual(running: Running) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_STATE_HOME": str(running.state)}
    done = subprocess.run([sys.executable, "-c", LOADED], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["codes"] == [0, 0, 0]
    loaded = [name for name in found["modules"] if name.split(".")[0] in HEAVY or name in HEAVY or name.startswith(CORE)]
    assert loaded == [], f"an admin command imported {loaded[:8]}"


# --- 2. every sub-command's help page says what it does -------------------------------------------


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return list(action.choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_help_page_has_a_description(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    page = capsys.readouterr().out
    paragraphs = page.split("\n\n")
    assert paragraphs[0].startswith(f"usage: mvtui {command}")
    assert not paragraphs[1].startswith(("positional arguments:", "options:")), f"`mvtui {command} --help` has no description:\n{page}"
    assert len(paragraphs[1].split()) >= 5


def test_start_help_names_the_port_option_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["start", "--help"])
    page = capsys.readouterr().out
    assert "--port PORT" in page and "INSTANCE_PORT" not in page


def test_the_command_list_names_top(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "top " in capsys.readouterr().out


# --- 3. messages that say what is true -------------------------------------------------------------


def test_info_edits_and_the_log_name_the_config_file_by_its_absolute_path(running: Running) -> None:
    """mvtui was started with `--config ../../tmp/.../servers.toml`."""
    info = cli(running, "info")
    assert info.returncode == 0 and f"config         {running.config}\n" in info.stdout
    saved = cli(running, "set-capacity", "gpu-a", "8", "--persist")
    assert saved.returncode == 0 and f"(saved to {running.config})" in saved.stdout
    assert f"INFO    config file: {running.config}\n" in running.mvtui.log_path.read_text()


def test_headless_logs_what_is_bound(running: Running) -> None:
    log = running.mvtui.log_path.read_text()
    port = running.port
    assert f"router listening on 127.0.0.1:{port} (this machine only; clients use http://127.0.0.1:{port}/v1)" in log
    assert f"mvtui serving on 127.0.0.1:{port} with 2 servers" in log
    assert "without API keys" not in log  # loopback only


def started_services(host: str, api_keys: tuple[str, ...], port: int = 8888) -> Any:
    return SimpleNamespace(config=Config(router=RouterConfig(host=host, api_keys=api_keys)), router_port=port, cluster=Cluster())


@pytest.mark.parametrize(
    ("host", "api_keys", "warned"),
    [("0.0.0.0", (), True), ("::", (), True), ("10.1.2.3", (), True), ("gpu-box", (), True), ("0.0.0.0", ("key",), False),
     ("127.0.0.1", (), False), ("::1", (), False), ("localhost", (), False)],
)  # fmt: skip
def test_a_router_open_to_the_network_without_keys_is_warned_about(
    host: str, api_keys: tuple[str, ...], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mvtui"):
        log_startup(started_services(host, api_keys))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == (["router open to the network without API keys: set [router] api_keys or --host 127.0.0.1"] if warned else [])


def test_the_listening_line_says_all_interfaces_and_the_url_clients_use() -> None:
    assert listening_line("0.0.0.0", 8888) == "router listening on 0.0.0.0:8888 (all interfaces; clients use http://<this host>:8888/v1)"
    assert listening_line("::1", 9000) == "router listening on [::1]:9000 (this machine only; clients use http://[::1]:9000/v1)"
    assert listening_line("10.1.2.3", 80) == "router listening on 10.1.2.3:80 (clients use http://10.1.2.3:80/v1)"


def test_the_startup_config_is_named_absolute_or_said_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "servers.toml").write_text("[servers]\nservers = []\n")
    paths = AppPaths(tmp_path / "config", tmp_path / "log", tmp_path / "state")
    args = argparse.Namespace(config="servers.toml", port=None, host=None)
    with caplog.at_level(logging.INFO, logger="mvtui"):
        _, path = load_startup_config(args, paths)
        _, missing = load_startup_config(argparse.Namespace(config=None, port=None, host=None), paths)
    assert path == tmp_path / "servers.toml" and missing == paths.default_config
    assert f"config file: {tmp_path / 'servers.toml'}" in caplog.text
    assert f"no config file at {paths.default_config}: starting with no servers" in caplog.text


def test_wake_and_sleep_say_why_they_cannot_work(running: Running) -> None:
    woken = cli(running, "wake", "down-one")
    assert woken.returncode == 1 and "down-one is down" in woken.stderr and "only a sleeping server can be woken" in woken.stderr
    slept = cli(running, "sleep", "down-one")
    assert slept.returncode == 1 and "down-one is down" in slept.stderr and "no sleep mode" not in slept.stderr
    awake = cli(running, "wake", "gpu-a")
    assert awake.returncode == 1 and "gpu-a is not asleep (it is up): nothing to wake" in awake.stderr
    assert cli(running, "sleep", "gpu-a").stdout.strip() == "gpu-a sleeping L1"
    assert cli(running, "wake", "gpu-a").stdout.strip() == "gpu-a up"


def one_server_cluster(url: str = "http://a:1") -> tuple[Cluster, LiveConfig]:
    live = LiveConfig(Config(servers=(ServerConfig(url, 4, name="a"),)))
    cluster = Cluster()
    cluster.apply(live.current.servers)
    return cluster, live


async def test_counts_are_written_in_words() -> None:
    cluster, live = one_server_cluster()
    server = cluster.require("a")
    assert summary_line(SimpleNamespace(cluster=cluster)).startswith("1 server: 1 unknown; 0 in flight")
    server.stats.errors = 1
    assert summary_line(SimpleNamespace(cluster=cluster)).endswith("1 error, 0 retries")
    server.in_flight = 1
    operator = Operator(cluster, live, sleep_wake=None, instances=None)  # type: ignore[arg-type]
    removing = await operator.remove_server("a")
    assert removing.message == "removing a: 1 request in flight finish first (not saved: running without a config file)"
    cluster, _ = one_server_cluster()
    server = cluster.require("a")
    server.health.state, server.in_flight = Health.UP, 1
    control = Controller(cluster, session=None, timing=lambda: TimingConfig(drain_timeout=0.01))  # type: ignore[arg-type]
    with pytest.raises(CommandError, match="still has 1 request in flight after 0.01 s"):
        await control.sleep("a", 1)
    out = io.StringIO()
    info = {"version": "0", "pid": 1, "router_url": "u", "admin_url": "a", "config_path": None, "policy": "p", "servers": 1, "instances": 1,
            "models": [], "in_flight": 0, "log_dir": "l", "instance_logs": "i", "gpus": {}}  # fmt: skip
    COMMANDS["info"](SimpleNamespace(call=lambda method, path: info), argparse.Namespace(json=False), out)  # type: ignore[arg-type]
    assert "1 (1 local instance)\n" in out.getvalue()


# --- 4. mvtui top ------------------------------------------------------------------------------


def traffic(router_url: str, stop: threading.Event) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}).encode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while not stop.is_set():
        request = urllib.request.Request(router_url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=10) as answer:
            answer.read()


def top_rows(running: Running) -> dict[str, dict[str, str]]:
    done = cli(running, "top")
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("\n\n")[1].splitlines()
    header = table[0].split()
    rows = {}
    for line in table[1:]:  # MODELS never has spaces here; STATE may ("sleeping L1")
        cells = line.replace("sleeping L", "sleeping_L").split()
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def busy_row(running: Running, name: str) -> dict[str, str] | None:
    row = top_rows(running)[name]
    return row if row["REQ/S"] != "0.0" else None


def test_top_prints_what_the_dashboard_shows(running: Running) -> None:
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(running.mvtui.url, stop), daemon=True)
    sender.start()
    try:
        row = wait_until(lambda: busy_row(running, "gpu-a"), what="traffic in top")
    finally:
        stop.set()
        sender.join()
    assert row["STATE"] == "up" and row["MODELS"] == "m" and row["RUN/CAP"].endswith("/8") and row["KV"].endswith("%")
    assert row["TTFT-P50"] != "-" and float(row["TOK/S"].rstrip("k")) > 0
    text = cli(running, "top").stdout
    assert text.startswith("mvtui ") and "\n2 servers: 1 up, 1 down; " in text
    assert "GPUs: not available" in text or "\nGPU  NAME" in text
    shown = json.loads(cli(running, "top", "--json").stdout)
    gpu_a = next(server for server in shown["servers"] if server["name"] == "gpu-a")
    assert {"request_rate", "token_rate", "ttft_p50", "kv_cache_usage", "running", "waiting", "capacity"} <= set(gpu_a)
    assert shown["info"]["router_url"] == running.mvtui.url


def test_top_shows_gpus_when_known() -> None:
    info = {"version": "0.1.0", "router_url": "http://h:1", "policy": "balanced", "in_flight": 0, "config_error": None,
            "gpus": {"devices": [{"index": 0, "name": "NVIDIA H200", "memory_used": 70 * 1024**3, "memory_total": 141 * 1024**3,
                                  "utilization": 93, "temperature": 61}]}}  # fmt: skip
    text = format_top(info, [])
    assert text.splitlines()[1] == "0 servers; 0 in flight, 0.0 req/s, 0.0 tok/s, 0 errors, 0 retries"
    assert text.endswith("GPU  NAME       MEMORY  UTIL  TEMP\n  0  H200  70.0/141GiB   93%   61C")


# --- the admin client's HTTP ------------------------------------------------------------------


def answering(raw: bytes) -> tuple[str, threading.Thread]:
    """A one-shot server on 127.0.0.1 that reads a request and answers `raw`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener, listener.accept()[0] as connection:
            connection.recv(65536)
            connection.sendall(raw)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/x", thread


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", b"{}"),
        (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", b"abcde"),
        (b"HTTP/1.0 200 OK\r\n\r\nto the end", b"to the end"),
    ],
)
def test_the_admin_client_reads_each_kind_of_body(raw: bytes, body: bytes) -> None:
    url, thread = answering(raw)
    assert exchange(url, "GET", {}, None, timeout=10).body == body
    thread.join()


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_the_admin_client_refuses_garbled_answers(raw: bytes) -> None:
    url, thread = answering(raw)
    with pytest.raises(WireError):
        exchange(url, "GET", {}, None, timeout=10)
    thread.join()
