"""GPU memory for local instances: before a start or a wake, check free memory (NVML) and sleep
least recently used idle instances on the same GPUs until the target fits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from mvtui.cluster.state import Server
from mvtui.errors import CommandError
from mvtui.gpu import GpuProbe, GpuSnapshot
from mvtui.instances.processes import instance_devices
from mvtui.instances.record import Instance

log = logging.getLogger(__name__)

GIB = 1024**3

SleepVictim = Callable[[Instance, Instance], Awaitable[None]]  # (victim, target): sleep victim to make room for target


class MemoryPlanner:
    """Decides who sleeps so an instance fits on its GPUs; the manager owns one and calls it."""

    def __init__(
        self,
        gpu: GpuProbe | None,
        instances: Mapping[str, Instance],
        busy: Callable[[Server], bool],
        sleep: SleepVictim,
    ) -> None:
        self.gpu = gpu
        self.instances = instances  # the manager's own mapping, read live
        self.busy = busy
        self.sleep = sleep
        # Held only while deciding who sleeps for GPU memory, never across a cold start.
        self._memory_lock = asyncio.Lock()
        self._reserved: dict[str, dict[int, int]] = {}

    def release(self, label: str) -> None:
        """The instance's start is over: its reservation no longer counts against others."""
        self._reserved.pop(label, None)

    async def ensure_memory(self, target: Instance) -> None:
        """Make room on the target's GPUs: sleep least recently used idle instances there
        until it fits; CommandError when it cannot. Skipped without NVML."""
        if self.gpu is None:
            return
        async with self._memory_lock:
            tried: set[str] = set()
            while True:
                snapshot = await self.gpu.sample()
                if not snapshot.available:
                    log.debug("no GPU memory check for %s: %s", target.label, snapshot.unavailable)
                    return
                needs = self._needs(target, snapshot)
                short = self._short(target, needs, snapshot)
                if not short:
                    self._reserved[target.label] = needs
                    return
                self._check_can_fit(target, needs, snapshot)
                victim = self._lru_victim(target, set(short), tried)
                if victim is None:
                    raise CommandError(self._no_room_message(target, short))
                tried.add(victim.label)
                await self.sleep(victim, target)

    def _needs(self, instance: Instance, snapshot: GpuSnapshot) -> dict[int, int]:
        """Bytes per GPU: vLLM takes gpu_memory_utilization of each card it runs on."""
        gpus = {gpu.index: gpu for gpu in snapshot.gpus}
        devices = instance_devices(instance.config)
        missing = [device for device in devices if device not in gpus]
        if missing:
            raise CommandError(f"{instance.label}: GPU {', '.join(map(str, missing))} not found; NVML sees {len(gpus)} GPU(s)")
        fraction = instance.config.gpu_memory_utilization
        totals = {device: gpus[device].memory_total for device in devices}
        return {device: int(fraction * total) for device, total in totals.items() if total}

    def _loading(self, instance: Instance) -> bool:
        return instance.lifecycle == "starting" or instance.server.waking

    def _reserved_on(self, device: int, target: Instance) -> int:
        """Memory promised to other instances that are starting or waking right now."""
        total = 0
        for label, needs in self._reserved.items():
            other = self.instances.get(label)
            if other is not None and other is not target and self._loading(other):
                total += needs.get(device, 0)
        return total

    def _short(self, target: Instance, needs: dict[int, int], snapshot: GpuSnapshot) -> dict[int, tuple[int, int]]:
        """GPUs without room: device -> (needed, free)."""
        gpus = {gpu.index: gpu for gpu in snapshot.gpus}
        short = {}
        for device, need in needs.items():
            free = gpus[device].memory_free
            if free is None:
                continue
            free -= self._reserved_on(device, target)
            if free < need:
                short[device] = (need, free)
        return short

    def _holds(self, instance: Instance, device: int, snapshot: GpuSnapshot) -> int:
        """What an awake instance holds on a GPU, by its share of the card."""
        awake = instance.lifecycle == "running" and instance.server.sleep_level == 0
        if not awake or device not in instance_devices(instance.config):
            return 0
        return self._needs(instance, snapshot).get(device, 0)

    def _check_can_fit(self, target: Instance, needs: dict[int, int], snapshot: GpuSnapshot) -> None:
        """Raise when even every other instance asleep would not make room."""
        gpus = {gpu.index: gpu for gpu in snapshot.gpus}
        for device, need in needs.items():
            gpu = gpus[device]
            if gpu.memory_total is None or gpu.memory_free is None:
                continue
            if need > gpu.memory_total:
                raise CommandError(f"{target.label} can never fit: it needs {_gib(need)} of GPU {device}'s {_gib(gpu.memory_total)}")
            ours = sum(self._holds(other, device, snapshot) for other in self.instances.values() if other is not target)
            if gpu.memory_free + ours - self._reserved_on(device, target) < need:
                others = gpu.memory_total - gpu.memory_free - ours
                raise CommandError(
                    f"{target.label} cannot fit on GPU {device} even with every other instance asleep: "
                    f"it needs {_gib(need)}, the card has {_gib(gpu.memory_total)} and other programs use {_gib(max(0, others))}"
                )

    def _lru_victim(self, target: Instance, devices: set[int], tried: set[str]) -> Instance | None:
        candidates = [
            instance
            for instance in self.instances.values()
            if instance is not target
            and instance.label not in tried
            and self._idle_awake(instance)
            and devices & set(instance_devices(instance.config))
        ]
        return min(candidates, key=lambda instance: instance.server.last_used, default=None)

    def _idle_awake(self, instance: Instance) -> bool:
        server = instance.server
        return (
            instance.lifecycle == "running"
            and server.sleep_level == 0
            and not (server.waking or server.sleep_pending or server.in_flight)
            and server.sleep_capable is not False
            and not self.busy(server)
        )

    def _no_room_message(self, target: Instance, short: dict[int, tuple[int, int]]) -> str:
        device, (need, free) = next(iter(short.items()))
        busy = [
            instance.label
            for instance in self.instances.values()
            if instance is not target
            and instance.lifecycle == "running"
            and instance.server.sleep_level == 0
            and device in instance_devices(instance.config)
        ]
        why = f"; awake there and busy or unable to sleep: {', '.join(busy)}" if busy else ""
        return f"not enough GPU memory for {target.label} on GPU {device}: needs {_gib(need)}, {_gib(max(0, free))} free{why}"


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"
