"""Idle instances: idle_timeout/idle_action (sleep or stop), and sleeping the least recently
used one when another needs its GPU memory (the MemoryPlanner picks which)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster
from mvtui.errors import CommandError
from mvtui.instances.record import Instance

log = logging.getLogger(__name__)

Stop = Callable[[str, str], Awaitable[object]]  # (label, reason)
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 1.0


class IdleKeeper:
    def __init__(
        self, instances: Mapping[str, Instance], cluster: Cluster, control: Controller, stop: Stop, clock: Callable[[], float]
    ) -> None:
        self.instances = instances  # the manager's own mapping, read live
        self.cluster = cluster
        self.control = control
        self.stop = stop
        self.clock = clock

    async def run(self) -> None:
        """Apply idle_timeout/idle_action, checking a few times per shortest timeout. A pass
        that fails is logged and the next one runs: idle handling never stops for good."""
        while True:
            await asyncio.sleep(self.interval())
            try:
                self.check(self.clock())
            except Exception:
                log.exception("checking idle instances failed; checking again at the next pass")

    def check(self, now: float) -> None:
        for instance in list(self.instances.values()):
            if self.due(instance, now):
                instance.idle_tried_at = now
                instance.idle_task = asyncio.create_task(self.act(instance), name=f"idle {instance.label}")

    def interval(self) -> float:
        timeouts = [instance.config.idle_timeout for instance in self.instances.values() if instance.config.idle_timeout > 0]
        return max(MIN_INTERVAL_S, min([MAX_INTERVAL_S, *(timeout / 4 for timeout in timeouts)]))

    def due(self, instance: Instance, now: float) -> bool:
        server, timeout = instance.server, instance.config.idle_timeout
        return (
            timeout > 0
            and instance.lifecycle == "running"
            and not (server.asleep or server.sleep_pending or server.in_flight)
            and not self.control.busy(server)
            and not (instance.idle_task and not instance.idle_task.done())
            and now - server.last_used >= timeout
            and now - instance.idle_tried_at >= timeout
        )

    async def act(self, instance: Instance) -> None:
        action = instance.config.idle_action
        idle_for = f"idle for {instance.config.idle_timeout:g} s"
        try:
            if action == "stop":
                await self.stop(instance.label, idle_for)
            elif await self.control.sleep_if_idle(instance.server, sleep_level(instance)):
                self.cluster.emit("idle", instance.server, f"{idle_for}: asleep at level {instance.server.sleep_level}")
        except CommandError as error:
            self.cluster.emit("idle", instance.server, f"{idle_for}, but {action} failed: {error}")
        except Exception as error:  # the idle loop goes on; the failure is seen, not lost in a task
            log.exception("%s: idle %s failed", instance.label, action)
            self.cluster.emit("idle", instance.server, f"{idle_for}, but {action} failed: {type(error).__name__}: {error}")

    async def cancel(self) -> None:
        """mvtui is exiting: idle actions under way are cancelled and awaited."""
        tasks = [instance.idle_task for instance in self.instances.values() if instance.idle_task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def sleep_for(self, victim: Instance, target: Instance) -> None:
        """The MemoryPlanner's choice: sleep `victim`, least recently used, to fit `target`."""
        level = sleep_level(victim)
        self.cluster.emit("memory", victim.server, f"least recently used: sleeping (level {level}) to make room for {target.label}")
        try:
            await self.control.sleep_if_idle(victim.server, level)
        except CommandError as error:
            self.cluster.emit("memory", victim.server, f"could not sleep to make room: {error}")


def sleep_level(instance: Instance) -> int:
    return 2 if instance.config.idle_action == "sleep2" else 1
