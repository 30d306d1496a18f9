"""GPU readings through NVML (nvidia-ml-py), taken in a thread and never fatal.

No library, no driver, no GPU, or a query a card does not support: the probe answers with
an honest "not available (why)" or N/A fields instead of raising. The `nvml` module is
passed in so tests can hand it a fake at the library boundary.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_used: int | None
    memory_total: int | None
    utilization: int | None
    temperature: int | None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def memory_free(self) -> int | None:
        if self.memory_total is None or self.memory_used is None:
            return None
        return self.memory_total - self.memory_used

    @property
    def memory_fraction(self) -> float | None:
        if not self.memory_total or self.memory_used is None:
            return None
        return self.memory_used / self.memory_total


@dataclass(frozen=True)
class GpuSnapshot:
    """One reading of every GPU, or why there is none."""

    gpus: tuple[Gpu, ...] = ()
    unavailable: str | None = None
    taken_at: float = field(default=0.0)

    @property
    def available(self) -> bool:
        return self.unavailable is None

    def free_bytes(self, devices: tuple[int, ...]) -> int | None:
        """Free memory of the least free of these devices (all GPUs when empty)."""
        chosen = [gpu for gpu in self.gpus if not devices or gpu.index in devices]
        free = [gpu.memory_free for gpu in chosen]
        if not chosen or any(value is None for value in free):
            return None
        return min(free)  # type: ignore[type-var]


def load_nvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


class GpuProbe:
    """Reads NVML. `snapshot()` blocks (NVML calls do): use `sample()` on the event loop."""

    def __init__(
        self, nvml: ModuleType | None | Callable[[], ModuleType | None] = load_nvml, clock: Callable[[], float] = time.time
    ) -> None:
        self._nvml_source = nvml
        self._nvml: ModuleType | None = None
        self._initialised = False
        self._failure: str | None = None
        self.clock = clock

    def _init(self) -> ModuleType | None:
        if self._initialised:
            return self._nvml
        source = self._nvml_source
        nvml = source() if callable(source) and not isinstance(source, ModuleType) else source
        self._initialised = True
        if nvml is None:
            self._failure = "nvidia-ml-py is not installed"
            return None
        try:
            nvml.nvmlInit()
        except Exception as error:  # NVMLError subclasses differ by cause; all mean "no GPU here"
            self._failure = _nvml_reason(error)
            return None
        self._nvml = nvml
        return nvml

    def snapshot(self) -> GpuSnapshot:
        nvml = self._init()
        now = self.clock()
        if nvml is None:
            return GpuSnapshot(unavailable=self._failure, taken_at=now)
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as error:
            return GpuSnapshot(unavailable=_nvml_reason(error), taken_at=now)
        if count == 0:
            return GpuSnapshot(unavailable="no GPU found", taken_at=now)
        return GpuSnapshot(gpus=tuple(self._read(nvml, index) for index in range(count)), taken_at=now)

    async def sample(self) -> GpuSnapshot:
        return await asyncio.to_thread(self.snapshot)

    def close(self) -> None:
        if self._nvml is not None:
            _optional(self._nvml.nvmlShutdown)
            self._nvml = None
            self._initialised = False

    def _read(self, nvml: ModuleType, index: int) -> Gpu:
        handle = _optional(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            return Gpu(index, "N/A", None, None, None, None)
        memory = _optional(nvml.nvmlDeviceGetMemoryInfo, handle)
        utilization = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        name = _optional(nvml.nvmlDeviceGetName, handle)
        return Gpu(
            index=index,
            name=name.decode() if isinstance(name, bytes) else (name or "N/A"),
            memory_used=getattr(memory, "used", None),
            memory_total=getattr(memory, "total", None),
            utilization=getattr(utilization, "gpu", None),
            temperature=_optional(nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)),
            processes=_processes(nvml, handle),
        )


def _processes(nvml: ModuleType, handle: Any) -> tuple[GpuProcess, ...]:
    found: dict[int, GpuProcess] = {}
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        function = getattr(nvml, query, None)
        for process in (_optional(function, handle) if function else None) or ():
            used = getattr(process, "usedGpuMemory", None)
            found[process.pid] = GpuProcess(process.pid, used if isinstance(used, int) else None)
    return tuple(found.values())


def _optional(function: Callable[..., Any], *args: Any) -> Any:
    """A query's value, or None when the card or driver does not support it."""
    try:
        return function(*args)
    except Exception:
        return None


def _nvml_reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    lowered = text.lower()
    if "driver" in lowered or "shared library" in lowered or "libnvidia-ml" in lowered:
        return f"no NVIDIA driver ({text})"
    return f"NVML error: {text}"


class GpuSampler:
    """The latest snapshot of a probe, read in a thread at most once per `interval` seconds,
    so that readers (the dashboard's tick) never call NVML themselves."""

    MIN_INTERVAL_S = 1.0

    def __init__(self, probe: GpuProbe, interval: float = MIN_INTERVAL_S) -> None:
        self.probe = probe
        self.interval = max(self.MIN_INTERVAL_S, interval)
        self.latest: GpuSnapshot | None = None

    async def run(self) -> None:
        while True:
            self.latest = await self.probe.sample()
            await asyncio.sleep(self.interval)
