"""Local instances: the simulator as the launched process, a fake pynvml for GPU memory."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import types
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from mvtui.config.schema import AdminConfig, Config, InstanceConfig, RouterConfig, TimingConfig, parse_config
from mvtui.errors import CommandError
from mvtui.gpu import GpuProbe
from mvtui.instances.manager import InstanceManager
from mvtui.instances.processes import RotatingLog, instance_command, instance_env, log_file_name
from mvtui.instances.record import Instance
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from tests.helpers import REPO_ROOT, Proc, eventually, free_port, group_members, start_mvtui

GIB = 1024**3
TIMING = TimingConfig(metrics_interval=0.1, health_check_interval=0.5, drain_timeout=10, wake_timeout=30, shutdown_timeout=3)
CHAT = [{"role": "user", "content": "Hello there."}]
SIM = (sys.executable, "-m", "mvtui", "sim", "--port", "{port}", "--model", "{served_name}", "--enable-sleep-mode",
       "--tokens-per-s", "200", "--ttft-ms", "5", "--wake-ms-l1", "50", "--wake-ms-l2", "100", "--sleep-requests", "hang")  # fmt: skip
SIM_ENV = (("PYTHONPATH", str(REPO_ROOT)),)


def sim_instance(name: str, **options: Any) -> InstanceConfig:
    options = {"port": free_port(), "command": SIM, "env": SIM_ENV, "startup_timeout": 60, **options}
    return InstanceConfig(model=name, **options)


def fake_nvml(totals: list[int], used: Callable[[int], int]) -> types.ModuleType:
    """pynvml's surface as GpuProbe uses it; memory used comes from the test's callback."""
    module = types.ModuleType("pynvml")
    module.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    module.nvmlInit = lambda: None  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(totals)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda handle: b"Fake GPU"  # type: ignore[attr-defined]
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=0, memory=0)  # type: ignore[attr-defined]
    module.nvmlDeviceGetTemperature = lambda handle, sensor: 40  # type: ignore[attr-defined]
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: []  # type: ignore[attr-defined]

    def memory(handle: int) -> types.SimpleNamespace:
        taken = used(handle)
        return types.SimpleNamespace(total=totals[handle], used=taken, free=totals[handle] - taken)

    module.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    return module


def memory_of_awake_instances(services: list[Services], totals: list[int], other_programs: int = 0) -> Callable[[int], int]:
    """Used memory as vLLM would leave it: an awake instance holds its share of the card, one
    asleep at level 1 a little, at level 2 or stopped nothing."""

    def used(device: int) -> int:
        total = other_programs
        manager = services[0].instances if services else None
        for instance in manager or ():
            process = instance.process
            if process is None or process.returncode is not None or device not in (instance.config.devices or (0,)):
                continue
            share = int(instance.config.gpu_memory_utilization * totals[device])
            level = instance.server.sleep_level if not instance.server.waking else 0
            total += share if level == 0 else (share // 20 if level == 1 else 0)
        return total

    return used


@contextlib.asynccontextmanager
async def core(
    tmp_path: Path, *instances: InstanceConfig, gpu: GpuProbe | None = None, holder: list | None = None
) -> AsyncIterator[Services]:
    config = Config(router=RouterConfig(host="127.0.0.1", port=0), timing=TIMING, admin=AdminConfig(enabled=False), instances=instances)
    paths = AppPaths(tmp_path / "config", tmp_path / "log", tmp_path / "state")
    services = Services(config, paths=paths, gpu=gpu or GpuProbe(nvml=None))
    if holder is not None:
        holder.append(services)
    async with services:
        yield services


def client(services: Services) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=services.router_url + "/v1", api_key="none", max_retries=0, timeout=60)


async def chat(services: Services, model: str, max_tokens: int = 3) -> str:
    async with client(services) as openai_client:
        answer = await openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens)
    assert answer.usage.completion_tokens == max_tokens
    return answer.choices[0].message.content


async def sim_state(instance: Instance) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(instance.server.url + "/sim/state") as response:
            return await response.json()


def manager(services: Services) -> InstanceManager:
    assert services.instances is not None
    return services.instances


# --- pure parts -----------------------------------------------------------------------------


def test_default_command_is_vllm_serve_with_sleep_mode_on_loopback() -> None:
    config = InstanceConfig(
        model="meta-llama/Llama-3.1-8B", served_model_name="llama", devices=(2, 3), tensor_parallel_size=2,
        max_model_len=8192, gpu_memory_utilization=0.9, extra_args=("--override", '{"a": 1}'), env=(("HF_HOME", "/models"),),
    )  # fmt: skip
    assert instance_command(config, 8123) == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B", "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "llama", "--gpu-memory-utilization", "0.9", "--enable-sleep-mode",
        "--max-model-len", "8192", "--tensor-parallel-size", "2", "--override", '{"a": 1}',
    ]  # fmt: skip
    env = instance_env(config, {"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["HF_HOME"] == "/models" and env["PATH"] == "/bin"
    assert log_file_name("meta-llama/Llama-3.1-8B", 8123) == "meta-llama-Llama-3.1-8B_8123.log"


def test_instances_config_keys_parse() -> None:
    config = parse_config(
        '[[instances]]\nmodel = "qwen"\nport_range = [9000, 9010]\ndevices = "0,1"\nidle_timeout = 300\n'
        'idle_action = "sleep2"\nauto_start = false\ncommand = ["vllm", "serve", "{model}"]\n'
    )
    instance = config.instances[0]
    assert instance.devices == (0, 1) and instance.port_range == (9000, 9010) and instance.idle_action == "sleep2"


def test_instance_log_is_size_bounded(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "m_1.log", max_bytes=1000)
    for index in range(50):
        log.write(f"line {index:03d} ".encode() * 10)
    log.close()
    assert (tmp_path / "m_1.log").stat().st_size <= 1000
    assert (tmp_path / "m_1.log.1").stat().st_size <= 1000
    assert b"line 049" in (tmp_path / "m_1.log").read_bytes()


# --- processes ------------------------------------------------------------------------------


async def test_first_request_starts_the_instance_once_in_its_own_group_with_a_log(tmp_path: Path) -> None:
    config = sim_instance("tiny")
    async with core(tmp_path, config) as services:
        instance = manager(services).find("tiny")
        assert instance.lifecycle == "stopped"
        answers = await asyncio.gather(*(chat(services, "tiny") for _ in range(5)))
        assert len(answers) == 5 and instance.lifecycle == "running"
        pid = instance.pid
        assert pid is not None and os.getpgid(pid) == pid  # its own process group
        log_path = tmp_path / "log" / "instances" / f"tiny_{config.port}.log"
        assert instance.log_path == log_path
        text = log_path.read_text()
        assert text.count("mvtui starts:") == 1  # five waiting requests, one start
        await eventually(lambda: "serving 'tiny'" in log_path.read_text(), what="the sim's banner in the log")
    assert group_members(pid) == []  # stopped with mvtui


async def test_idle_timeout_sleeps_or_stops_and_a_request_wakes_it(tmp_path: Path) -> None:
    sleeper = sim_instance("sleeper", idle_timeout=1.0, idle_action="sleep2")
    stopper = sim_instance("stopper", idle_timeout=1.0, idle_action="stop")
    async with core(tmp_path, sleeper, stopper) as services:
        first, second = manager(services).find("sleeper"), manager(services).find("stopper")
        await chat(services, "stopper")
        pid = second.pid
        await chat(services, "sleeper")
        await eventually(lambda: first.server.sleep_level == 2, what="idle sleep")
        state = await sim_state(first)
        assert state["sleeping"] and state["sleep_level"] == 2
        await eventually(lambda: second.lifecycle == "stopped", what="idle stop")
        assert pid is not None and group_members(pid) == []
        await chat(services, "stopper")  # started again
        assert second.lifecycle == "running" and second.pid != pid
        await chat(services, "sleeper")  # woken, weights reloaded
        state = await sim_state(first)
        assert state["wake_count"] == 1 and state["sleep_count"] == 1 and state["weights_loaded"]
        assert state["requests_while_sleeping"] == 0 and state["requests_without_weights"] == 0


async def test_memory_pressure_sleeps_the_least_recently_used_idle_instance(tmp_path: Path) -> None:
    totals = [10 * GIB]
    holder: list[Services] = []
    gpu = GpuProbe(nvml=fake_nvml(totals, memory_of_awake_instances(holder, totals)))
    configs = [sim_instance(name, devices=(0,), gpu_memory_utilization=0.4) for name in ("a", "b", "c")]
    async with core(tmp_path, *configs, gpu=gpu, holder=holder) as services:
        a, b, c = (manager(services).find(name) for name in "abc")
        await chat(services, "a")
        await chat(services, "b")
        await chat(services, "a")  # b is now the least recently used
        await chat(services, "c")  # 2 x 4 GiB awake, 4 GiB more needed: b sleeps
        assert (b.server.sleep_level, a.server.sleep_level, c.lifecycle) == (1, 0, "running")
        assert (await sim_state(b))["sleeping"] and not (await sim_state(a))["sleeping"]
        await chat(services, "b")  # waking b needs room again: a is now the least recently used
        assert (a.server.sleep_level, b.server.sleep_level, c.server.sleep_level) == (1, 0, 0)
        assert (await sim_state(a))["sleeping"] and (await sim_state(b))["wake_count"] == 1


async def test_memory_pressure_never_sleeps_an_instance_with_requests_in_flight(tmp_path: Path) -> None:
    totals = [10 * GIB]
    holder: list[Services] = []
    gpu = GpuProbe(nvml=fake_nvml(totals, memory_of_awake_instances(holder, totals)))
    configs = [sim_instance(name, devices=(0,), gpu_memory_utilization=0.4) for name in ("a", "b", "c")]
    async with core(tmp_path, *configs, gpu=gpu, holder=holder) as services:
        a, b = manager(services).find("a"), manager(services).find("b")
        await chat(services, "a")
        await chat(services, "b")
        long_request = asyncio.create_task(chat(services, "a", max_tokens=300))  # ~1.5 s of streaming on a
        await eventually(lambda: a.server.in_flight == 1, what="a request in flight on a")
        await chat(services, "b")  # a's request began before this: a is least recently used, but busy
        await chat(services, "c")
        assert b.server.sleep_level == 1 and a.server.sleep_level == 0
        await long_request  # finished whole on the awake instance
        assert (await sim_state(a))["sleep_count"] == 0


async def test_an_instance_that_can_never_fit_says_so(tmp_path: Path) -> None:
    totals = [10 * GIB]
    holder: list[Services] = []
    gpu = GpuProbe(nvml=fake_nvml(totals, memory_of_awake_instances(holder, totals, other_programs=7 * GIB)))
    crowded = sim_instance("crowded", devices=(0,), gpu_memory_utilization=0.4)
    huge = sim_instance("huge", devices=(0,), gpu_memory_utilization=1.5)
    async with core(tmp_path, crowded, huge, gpu=gpu, holder=holder) as services:
        async with aiohttp.ClientSession() as session:
            body = {"model": "crowded", "messages": CHAT, "max_tokens": 3}
            async with session.post(services.router_url + "/v1/chat/completions", json=body) as response:
                assert response.status == 503
                message = (await response.json())["error"]["message"]
        assert "cannot fit on GPU 0 even with every other instance asleep" in message and "7.0 GiB" in message
        assert manager(services).find("crowded").lifecycle == "error"
        with pytest.raises(CommandError, match="can never fit: it needs 15.0 GiB of GPU 0's 10.0 GiB"):
            await manager(services).start("huge")
        assert manager(services).find("huge").process is None  # nothing was launched


async def test_failed_start_is_an_error_with_the_log_tail_then_recovers(tmp_path: Path) -> None:
    broken = sim_instance("flaky", command=(*SIM, "--max-num-seqs", "0"))
    async with core(tmp_path, broken) as services:
        instances = manager(services)
        with pytest.raises(CommandError, match="max_num_seqs must be >= 1"):
            await instances.start("flaky")
        flaky = instances.find("flaky")
        assert flaky.lifecycle == "error" and "exited with code 2 during start-up" in flaky.error
        assert flaky.server.state == "error" and not flaky.server.routable
        async with aiohttp.ClientSession() as session:
            body = {"model": "flaky", "messages": CHAT, "max_tokens": 3}
            async with session.post(services.router_url + "/v1/chat/completions", json=body) as response:
                assert response.status == 503  # failed moments ago: not restarted by every request
                assert "flaky failed: exited with code 2 during start-up" in (await response.json())["error"]["message"]
        fixed = dataclasses.replace(services.config, instances=(dataclasses.replace(broken, command=SIM),))
        services.live.adopt(fixed)
        await instances.start("flaky")  # the operator retries
        assert flaky.lifecycle == "running" and flaky.error == ""
        await chat(services, "flaky")


async def test_config_reload_adds_removes_and_defers_changes_to_instances(tmp_path: Path) -> None:
    old, kept = sim_instance("old"), sim_instance("kept")
    async with core(tmp_path, old, kept) as services:
        instances = manager(services)
        await asyncio.gather(chat(services, "old"), chat(services, "kept"))
        old_pid, kept_pid = instances.find("old").pid, instances.find("kept").pid
        changed = dataclasses.replace(kept, max_concurrent_requests=3)
        notes = services.live.adopt(dataclasses.replace(services.config, instances=(changed, sim_instance("new"))))
        assert "instance old left the config: stopping it" in notes and "added instance new" in notes
        assert any(note.startswith("instance kept is running: new settings apply after it stops") for note in notes)
        await eventually(lambda: "old" not in instances.instances, what="old to be removed")
        assert group_members(old_pid) == [] and services.cluster.find("old") is None  # type: ignore[arg-type]
        assert instances.find("new").lifecycle == "stopped"
        kept_now = instances.find("kept")
        assert kept_now.pid == kept_pid and kept_now.server.capacity == 8  # still the running process's settings
        await instances.stop("kept")
        await instances.start("kept")
        assert kept_now.server.capacity == 3 and kept_now.pid != kept_pid


async def test_one_slow_start_does_not_block_another_instance(tmp_path: Path) -> None:
    slow = sim_instance("slow", command=(*SIM, "--startup-ms", "30000"))
    quick = sim_instance("quick")
    async with core(tmp_path, slow, quick) as services:
        instances = manager(services)
        slow_start = asyncio.create_task(instances.start("slow"))
        await eventually(lambda: instances.find("slow").pid is not None, what="the slow start to launch")
        await instances.start("quick")
        assert instances.find("slow").lifecycle == "starting" and instances.find("quick").lifecycle == "running"
        pid = instances.find("slow").pid
        await instances.stop("slow")  # cancels the start, kills its group
        with pytest.raises(asyncio.CancelledError):
            await slow_start
        assert instances.find("slow").lifecycle == "stopped" and group_members(pid) == []  # type: ignore[arg-type]


async def test_stop_sends_sigterm_to_the_whole_process_group(tmp_path: Path) -> None:
    """A worker started by the instance (like a tensor-parallel worker) gets SIGTERM too."""
    marker = tmp_path / "worker-got"
    worker = (
        "import signal, sys, time; "
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').write('SIGTERM'), sys.exit(0))); "
        f"open({str(marker)!r}, 'w').write('ready'); time.sleep(300)"
    )
    wrapped = ("sh", "-c", f'"{sys.executable}" -c "{worker}" & exec "$0" "$@"', *SIM)
    config = sim_instance("workers", command=wrapped)
    async with core(tmp_path, config) as services:
        instance = await manager(services).start("workers")
        pid = instance.pid
        assert pid is not None
        await eventually(lambda: marker.exists() and marker.read_text() == "ready", what="the worker's signal handler")
        assert len(group_members(pid)) == 2
        await manager(services).stop("workers")
        assert instance.lifecycle == "stopped" and group_members(pid) == []
        assert marker.read_text() == "SIGTERM"  # asked to stop, not killed


async def test_port_comes_from_the_range_when_one_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        first = taken.getsockname()[1]
        config = dataclasses.replace(sim_instance("ranged"), port=0, port_range=(first, first + 20))
        async with core(tmp_path, config) as services:
            instance = await manager(services).start("ranged")
            assert first < instance.port <= first + 20
            await chat(services, "ranged")


# --- mvtui as a process ---------------------------------------------------------------------


def write_config(path: Path, command: tuple[str, ...]) -> None:
    path.write_text(
        "[config]\nmetrics_interval = 0.1\nhealth_check_interval = 0.5\nshutdown_timeout = 3\n[admin]\nport = 0\n"
        f'[[instances]]\nmodel = "child"\nport = {free_port()}\ncommand = {json.dumps(list(command))}\n'
        f"env = {{ PYTHONPATH = {json.dumps(str(REPO_ROOT))} }}\n"
    )


async def start_instance_in_mvtui(tmp_path: Path, command: tuple[str, ...], procs: list[Proc]) -> tuple[Proc, int]:
    config = tmp_path / "servers.toml"
    write_config(config, command)
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    port = free_port()
    mvtui = await asyncio.to_thread(start_mvtui, ["--no-ui", "--config", str(config), "--port", str(port)], env=env)
    procs.append(mvtui)
    async with openai.AsyncOpenAI(base_url=mvtui.url + "/v1", api_key="none", max_retries=0) as openai_client:
        answer = await openai_client.chat.completions.create(model="child", messages=CHAT, max_tokens=2)
    assert answer.usage.completion_tokens == 2
    async with aiohttp.ClientSession() as session:
        async with session.get(mvtui.url + "/health") as response:
            assert (await response.json())["servers"][0]["state"] == "up"
    children = [pid for pid in os.listdir("/proc") if pid.isdigit() and _parent(int(pid)) == mvtui.pid]
    sims = [int(pid) for pid in children if b"sim" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(sims) == 1
    return mvtui, sims[0]


@contextlib.contextmanager
def killed_at_the_end(pgid: int) -> Iterator[None]:
    """If the test fails with the instance still alive, it must not outlive the test."""
    try:
        yield
    finally:
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


async def test_no_orphans_after_sigterm_to_mvtui(tmp_path: Path, procs: list[Proc]) -> None:
    wrapped = ("sh", "-c", 'sleep 300 & exec "$0" "$@"', *SIM)
    mvtui, group = await start_instance_in_mvtui(tmp_path, wrapped, procs)
    with killed_at_the_end(group):
        assert len(group_members(group)) == 2  # the simulator and its own child
        admin_file = tmp_path / "state" / "mvtui" / "admin" / f"{mvtui.pid}.json"
        assert admin_file.exists()
        os.kill(mvtui.pid, signal.SIGTERM)  # mvtui alone, not its group: the instance has its own
        await asyncio.to_thread(mvtui.proc.wait, 20)
        assert group_members(group) == []
        assert not admin_file.exists()


async def test_instance_dies_with_mvtui_even_after_sigkill(tmp_path: Path, procs: list[Proc]) -> None:
    mvtui, group = await start_instance_in_mvtui(tmp_path, SIM, procs)
    with killed_at_the_end(group):
        os.kill(mvtui.pid, signal.SIGKILL)  # no cleanup code runs: the kernel's parent-death signal does it
        await asyncio.to_thread(mvtui.proc.wait, 10)
        await eventually(lambda: group_members(group) == [], timeout=10, what="the instance to exit")
