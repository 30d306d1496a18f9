"""What the dashboard's keys do, as calls to the core's commands, and when each applies.

The UI never speaks HTTP: every action goes through `mvtui.control.commands` (drain, sleep, wake,
start and stop of local instances) or `Services.reload_config`, the same entry points as
the admin API and the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Server
from mvtui.control import commands, config_commands
from mvtui.gpu import Gpu
from mvtui.instances.manager import Instance, InstanceManager
from mvtui.runtime.wiring import Services

# Keys that need nothing from the core.
ALWAYS = frozenset({"quit", "help", "cycle_theme", "filter", "select", "toggle_requests"})
CONFIGURED_ONLY = ("capacity", "remove_server")  # edits of a [servers] entry
ACTIVE_LIFECYCLES = (None, "running")


class CoreActions:
    def __init__(self, services: Services) -> None:
        self.services = services

    # --- when a key applies: True enabled, None greyed out, False hidden ------------------

    def applies(self, action: str, server: Server | None) -> bool | None:
        if action in ALWAYS:
            return True
        if action == "reload":
            return True if self.services.config_path is not None else None
        if action == "undrain":
            return server is not None and server.drain
        if action == "add_server":
            return True
        if action in CONFIGURED_ONLY:
            return True if server is not None and server.lifecycle is None and not server.removed else None
        if server is None or server.removed:
            return None
        if action == "drain":
            return not server.drain  # a drained server shows "undrain" in its place
        check = getattr(self, f"_can_{action}", None)
        return (True if check(server) else None) if check is not None else None

    def _can_sleep(self, server: Server) -> bool:
        control = self.services.control
        return (
            control is not None
            and server.lifecycle in ACTIVE_LIFECYCLES
            and server.is_up
            and server.sleep_capable is not False
            and not (server.asleep or server.sleep_pending or control.busy(server))
        )

    def _can_wake(self, server: Server) -> bool:
        return self.services.control is not None and server.lifecycle in ACTIVE_LIFECYCLES and server.sleep_level > 0 and not server.waking

    def _can_start(self, server: Server) -> bool:
        instance = self.instance(server)
        return instance is not None and instance.lifecycle in ("stopped", "error") and not instance.starting

    def _can_stop(self, server: Server) -> bool:
        instance = self.instance(server)
        return instance is not None and instance.lifecycle in ("running", "starting")

    def _can_instance_log(self, server: Server) -> bool:
        return self.log_file(server) is not None

    # --- the commands -------------------------------------------------------------------

    async def drain(self, server: Server) -> str:
        """A configured server's drain is written to the config file, so it survives a restart."""
        if server.lifecycle is None:
            return (await config_commands.set_drain(self.services, server.url, True)).message
        drained = commands.drain(self.services.cluster, server.url)
        return f"{drained.name}: draining, {drained.in_flight} in flight"

    async def undrain(self, server: Server) -> str:
        if server.lifecycle is None:
            return (await config_commands.set_drain(self.services, server.url, False)).message
        return f"{commands.undrain(self.services.cluster, server.url).name}: taking requests again"

    async def change_capacity(self, server: Server, step: int) -> str:
        return (await config_commands.set_capacity(self.services, server.url, max(1, server.capacity + step))).message

    async def add_server(self, url: str, capacity: int) -> str:
        return (await config_commands.add_server(self.services, url, max_concurrent_requests=capacity)).message

    async def remove_server(self, server: Server) -> str:
        return (await config_commands.remove_server(self.services, server.url)).message

    async def sleep(self, server: Server, level: int) -> str:
        control = self._control()
        slept = await commands.sleep(control, server.url, level)
        return f"{slept.name}: asleep at level {slept.sleep_level}"

    async def wake(self, server: Server) -> str:
        woken = await commands.wake(self._control(), server.url)
        return f"{woken.name}: awake"

    async def start(self, server: Server) -> str:
        instance = await commands.start_instance(self._instances(), self._instance_key(server))
        return f"{instance.label}: running on {instance.server.url}"

    async def stop(self, server: Server) -> str:
        instance = await commands.stop_instance(self._instances(), self._instance_key(server))
        return f"{instance.label}: stopped"

    async def reload(self) -> str:
        notes = await self.services.reload_config()
        return "; ".join(notes) or "config reloaded: nothing changed"

    # --- what the panes show beside the cluster ---------------------------------------------

    def instance(self, server: Server) -> Instance | None:
        manager = self.services.instances
        return manager.for_server(server) if manager is not None else None

    def log_file(self, server: Server | None) -> Path | None:
        instance = self.instance(server) if server is not None else None
        return instance.log_path if instance is not None else None

    def gpu_owners(self, gpu: Gpu) -> Sequence[str]:
        """The local instances whose processes use this GPU: vLLM's workers are children
        in the instance's own process group, so a process belongs to the instance whose
        leader's pid is its group id."""
        manager = self.services.instances
        if manager is None or not gpu.processes:
            return ()
        leaders = {instance.pid: instance.label for instance in manager if instance.pid is not None}
        owners: dict[str, None] = {}
        for process in gpu.processes:
            label = leaders.get(_group_of(process.pid))
            if label is not None:
                owners[label] = None
        return list(owners)

    # --- helpers ------------------------------------------------------------------------

    def _control(self) -> Controller:
        if self.services.control is None:
            raise commands.CommandError("sleep and wake are not running")
        return self.services.control

    def _instances(self) -> InstanceManager:
        if self.services.instances is None:
            raise commands.CommandError("the instance manager is not running")
        return self.services.instances

    def _instance_key(self, server: Server) -> str:
        instance = self.instance(server)
        if instance is None:
            raise commands.CommandError(f"{server.name} is not a local instance mvtui manages")
        return instance.label


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
