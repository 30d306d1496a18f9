"""Frozen dashboard state for UI tests: a cluster with fixed numbers (no network, no clock
that moves) and a fake pynvml module, the only thing mocked (at the library boundary)."""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster, ClusterEvent, EngineMetrics, RequestRecord
from mvtui.config.schema import Config, RouterConfig, ServerConfig, UiConfig, parse_config
from mvtui.control.live_config import LiveConfig
from mvtui.control.operator import Operator
from mvtui.errors import ConfigError
from mvtui.gpu import GpuProbe
from mvtui.instances.manager import InstanceManager
from mvtui.paths import AppPaths
from mvtui.ui.history import MetricsHistory, Sample

FROZEN_AT = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
GIB = 1024**3


def tmp_paths(root: Path) -> AppPaths:
    return AppPaths(config_dir=root / "config", log_dir=root / "log", state_dir=root / "state")


# name, capacity, running, waiting, kv, in flight, req/s history, tok/s history, ttft samples
FROZEN_EVENTS = (
    ClusterEvent("up", "small", "up, serving llama-3.1-8b", at=FROZEN_AT),
    ClusterEvent("up", "medium", "up, serving llama-3.1-8b", at=FROZEN_AT + 1),
    ClusterEvent("down", "big", "down: cannot connect: Connection refused", at=FROZEN_AT + 2),
    ClusterEvent("drain", "medium", "draining, 2 in flight", at=FROZEN_AT + 3),
)
FROZEN_SERVERS = {
    "small": (
        4,
        3,
        1,
        0.62,
        3,
        [1.0, 1.5, 2.0, 2.2, 1.8, 2.5, 2.8, 3.0, 2.6, 2.4] * 6,
        [40, 55, 70, 80, 65, 90, 100, 110, 95, 88] * 6,
        [0.21, 0.18, 0.25],
    ),
    "medium": (
        8,
        2,
        0,
        0.31,
        2,
        [3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1] * 6,
        [200, 180, 150, 120, 90, 60, 50, 30, 20, 10] * 6,
        [0.09, 0.11],
    ),
    "big": (16, 0, 0, None, 0, [4.0, 4.2, 4.1, 0.0, 0.0], [600, 640, 610, 0, 0], [0.05]),
    "spare": (16, 0, 0, 0.0, 0, [], [], []),
}

# What the router learned of each server's speed: TTFT and time per output token, in seconds.
FROZEN_SPEEDS = {"small": (0.12, 1 / 48), "medium": (0.35, 1 / 95)}


@dataclass
class FrozenCore:
    """What the dashboard reads of a running core (mvtui.ui.core.Core), never started: no
    network, no tasks. The operator's verbs work on the cluster and the live config."""

    cluster: Cluster
    live: LiveConfig
    gpu: GpuProbe
    operator: Operator
    router_port: int | None = 8888
    admin: Any = None  # an AdminState (url, problem, notice) where a test sets one

    @property
    def config(self) -> Config:
        return self.live.current

    @property
    def config_path(self) -> Path | None:
        return self.live.path

    @property
    def config_error(self) -> ConfigError | None:
        return self.live.error

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"


def frozen_core(config: Config, paths: AppPaths, gpu: GpuProbe) -> FrozenCore:
    cluster = Cluster(config.timing, lambda: 1000.0)
    live = LiveConfig(config, emit=lambda kind, message: cluster.emit(kind, "config", message))
    live.on_change(lambda old, new: [f"added {server.url}" for server in cluster.apply(new.servers, new.timing)])
    no_network: Any = None  # nothing here ever calls a server
    control = Controller(cluster, no_network, lambda: live.current.timing, cluster.clock)
    instances = InstanceManager(cluster, control, no_network, paths.instance_logs, lambda: live.current.timing, gpu, cluster.clock)
    return FrozenCore(cluster, live, gpu, Operator(cluster, live, control, instances))


def frozen_services(
    paths: AppPaths, names: tuple[str, ...] = ("small", "medium", "big"), nvml: FakeNvml | None = None, ui: UiConfig | None = None
) -> FrozenCore:
    """A core that is never started: its cluster holds fixed, hand-set state."""
    configs = tuple(
        ServerConfig(url=f"http://10.0.0.{11 + index}:8000", name=name, max_concurrent_requests=FROZEN_SERVERS[name][0])
        for index, name in enumerate(names)
    )
    config = Config(router=RouterConfig(host="127.0.0.1", port=8888), servers=configs, ui=ui or UiConfig())
    services = frozen_core(config, paths, GpuProbe(nvml if nvml is not None else two_gpus()))
    services.cluster.apply(config.servers, config.timing)
    for name in names:
        _freeze(services, name)
    services.cluster.events.clear()  # apply() told of each server added, at the real time
    services.cluster.events.extend(event for event in FROZEN_EVENTS if event.server in names)
    for index in range(12):
        server = names[index % 2]
        services.cluster.record(
            RequestRecord(
                FROZEN_AT + 10 + index,
                "POST",
                "/v1/chat/completions",
                "llama-3.1-8b",
                server,
                200 if index != 7 else 503,
                1.2 + index / 10,
                0.1 + index / 100,
                40 + index,
                0,
            )
        )
    return services


def _freeze(services: FrozenCore, name: str) -> None:
    server = services.cluster.find(name)
    assert server is not None
    capacity, running, waiting, kv, in_flight, requests, tokens, ttft = FROZEN_SERVERS[name]
    server.discovered_models = ("llama-3.1-8b",)
    server.metrics = EngineMetrics(running=running, waiting=waiting, kv_cache_usage=kv)
    server.in_flight = in_flight
    server.stats.request_rate.values = deque(requests, maxlen=60)
    server.stats.token_rate.values = deque(tokens, maxlen=60)
    server.stats.ttft.extend(ttft)
    server.stats.requests = 100 + capacity
    if name in FROZEN_SPEEDS:
        speed = server.learned_speed("llama-3.1-8b")
        assert speed is not None
        speed.observe(*FROZEN_SPEEDS[name])
    if name == "big":
        server.health.failure("cannot connect: Connection refused", at_once=True)
        server.last_error = "cannot connect: Connection refused"
        server.stats.errors = 3
    else:
        server.health.success()
    if name == "medium":
        server.drain = True
    if name == "spare":
        server.sleep_capable = True
        server.sleep_level = 1


def frozen_factory(services: FrozenCore) -> Callable[[], contextlib.AbstractAsyncContextManager[FrozenCore]]:
    """A core factory that hands out the frozen core, never started."""

    @contextlib.asynccontextmanager
    async def open_core() -> AsyncIterator[FrozenCore]:
        yield services

    return open_core


# --- a fake pynvml --------------------------------------------------------------------


class NVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    name: str
    used: int
    total: int
    utilization: int
    temperature: int
    pids: tuple[int, ...] = ()


@dataclass
class FakeNvml:
    """Just the pynvml functions GpuProbe calls, over a list of fake GPUs."""

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: str | None = None
    count_error: str | None = None
    NVML_TEMPERATURE_GPU: int = 0
    calls: int = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        self.calls += 1
        if self.count_error:
            raise NVMLError(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(used=gpu.used, total=gpu.total, free=gpu.total - gpu.used)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return gpu.name

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        return gpu.temperature

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=GIB) for pid in gpu.pids]


def two_gpus() -> FakeNvml:
    return FakeNvml(
        gpus=[
            FakeGpu("NVIDIA H100 80GB HBM3", int(61.5 * GIB), 80 * GIB, 87, 64, (4242,)),
            FakeGpu("NVIDIA H100 80GB HBM3", int(3.2 * GIB), 80 * GIB, 0, 38),
        ]
    )


# --- what the dashboard would have seen over ten minutes, and a broken config file ----------------


def fill_history(history: MetricsHistory, services: FrozenCore, minutes: float = 10.0) -> None:
    """Ten minutes of samples for each server, in waves from its frozen numbers (a fixed
    sequence, no clock), as the dashboard's tick would have taken them."""
    count = int(minutes * 60 / history.period_s)
    end = time.monotonic()  # the clock the dashboard samples on: the newest sample is now
    for server in services.cluster:
        capacity, running, waiting, kv, _, _, tokens, ttft = FROZEN_SERVERS[server.name]
        for index in range(count):
            wave = (1 + math.sin(index / 9) * math.cos(index / 23)) / 2
            history.record(
                server.url,
                Sample(
                    at=end - (count - 1 - index) * history.period_s,
                    running=round(running * (0.4 + 0.6 * wave) + (1 if index % 17 == 0 else 0)),
                    waiting=float(waiting if index % 40 < 8 else 0),
                    kv_percent=(kv or 0.0) * 100 * (0.5 + 0.5 * wave),
                    ttft_ms=(ttft[0] if ttft else 0.0) * 1000 * (0.8 + 0.4 * wave),
                    tokens_per_s=(max(tokens) if tokens else 0.0) * wave,
                ),
            )


BROKEN_TEXT = """[router]
prot = 8888

[servers]
servers = [
  { url = "http://10.0.0.11:8000", name = "small" },
  { url = "htp://gpu-2:8000" },
  { url = "http://10.0.0.13:8000", max_concurrent_requests = "eight" },
]
"""
BROKEN_PATH = Path("/home/ops/.config/mvtui/servers.toml")


def broken_config() -> ConfigError:
    """The errors of a real broken file, as the parser reports them."""
    try:
        parse_config(BROKEN_TEXT)
    except ConfigError as error:
        return ConfigError(BROKEN_PATH, error.problems)
    raise AssertionError("BROKEN_TEXT parsed")


def break_config(services: FrozenCore) -> ConfigError:
    """The config file turned out broken, as LiveConfig reports it (the last good config stays)."""
    services.live.error = error = broken_config()
    message = f"{error}\nkeeping the last good config in force until the file is fixed"
    services.cluster.events.append(ClusterEvent("config-error", "config", message, at=FROZEN_AT + 30))
    return error


@dataclass
class FrozenAdmin:
    """An admin API's state as the dashboard sees it (mvtui.ui.core.AdminState)."""

    url: str | None = None
    problem: str | None = None
    notice: str | None = None
