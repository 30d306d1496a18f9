"""What the dashboard's keys do, as calls to the core's commands, and when each applies.

The UI never speaks HTTP: every action is a call to the core's `Operator`, the same verbs
the admin API and the CLI use, with the same meaning (live until restart unless saved).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mvtui import keymap
from mvtui.cluster.state import Server
from mvtui.config.entries import EntryError, instance_entry
from mvtui.control.operator import Operator
from mvtui.errors import CommandError
from mvtui.gpu import Gpu
from mvtui.instances.record import STARTABLE, Instance
from mvtui.ui.core import Core

# Keys that need nothing from the core: the keymap says which.
ALWAYS = keymap.ALWAYS
CONFIGURED_ONLY = ("capacity", "remove_server", "save", "drain_save")  # edits of a [servers] entry
ACTIVE_LIFECYCLES = (None, "running")


class CoreActions:
    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def operator(self) -> Operator:
        operator = self.core.operator
        if operator is None:
            raise CommandError("the core has not started")
        return operator

    # --- when a key applies: True enabled, None greyed out, False hidden ------------------

    def applies(self, action: str, server: Server | None) -> bool | None:
        if action in ALWAYS:
            return True
        if action == "reload":
            return True if self.core.config_path is not None else None
        if action == "undrain":
            return server is not None and server.drain
        if action in ("add_server", "models"):
            return True
        if action == "details":
            return True if server is not None else None
        if action in CONFIGURED_ONLY:
            return True if server is not None and server.lifecycle is None and not server.removed else None
        if server is None or server.removed:
            return None
        if action == "drain":
            return not server.drain  # a drained server shows "undrain" in its place
        check = getattr(self, f"_can_{action}", None)
        return (True if check(server) else None) if check is not None else None

    def _can_sleep(self, server: Server) -> bool:
        if self.core.operator is None:
            return False
        control = self.core.operator.sleep_wake
        return (
            server.lifecycle in ACTIVE_LIFECYCLES
            and server.is_up
            and server.sleep_capable is not False
            and not (server.asleep or server.sleep_pending or control.busy(server))
        )

    def _can_wake(self, server: Server) -> bool:
        return self.core.operator is not None and server.lifecycle in ACTIVE_LIFECYCLES and server.sleep_level > 0 and not server.waking

    def _can_start(self, server: Server) -> bool:
        instance = self.instance(server)
        return instance is not None and instance.lifecycle in ("stopped", "error") and not instance.starting

    def _can_stop(self, server: Server) -> bool:
        instance = self.instance(server)
        return instance is not None and instance.lifecycle in ("running", "starting")

    def _can_instance_log(self, server: Server) -> bool:
        return self.log_file(server) is not None

    def _can_chat(self, server: Server) -> bool:
        return self.core.operator is not None and self.chat_model(server) is not None and server.lifecycle != "stopping"

    # --- the commands -------------------------------------------------------------------

    async def drain(self, server: Server) -> str:
        return (await self.operator.drain(server.url)).message

    async def undrain(self, server: Server) -> str:
        return (await self.operator.undrain(server.url)).message

    async def drain_save(self, server: Server) -> str:
        """Drain, or undrain a drained server, and write it to the config file."""
        verb = self.operator.undrain if server.drain else self.operator.drain
        return (await verb(server.url, persist=True)).message

    async def save(self, server: Server) -> str:
        return (await self.operator.save(server.url)).message

    async def change_capacity(self, server: Server, step: int) -> str:
        return (await self.operator.set_capacity(server.url, max(1, server.capacity + step))).message

    async def add_server(self, url: str, capacity: int) -> str:
        return (await self.operator.add_server(url, max_concurrent_requests=capacity)).message

    async def remove_server(self, server: Server, *, persist: bool = False) -> str:
        return (await self.operator.remove_server(server.url, persist=persist)).message

    async def sleep(self, server: Server, level: int) -> str:
        slept = await self.operator.sleep(server.url, level)
        return f"{slept.name}: asleep at level {slept.sleep_level}"

    async def wake(self, server: Server) -> str:
        woken = await self.operator.wake(server.url)
        return f"{woken.name}: awake"

    async def start(self, server: Server) -> str:
        instance = await self.operator.start(self._instance_key(server))
        return f"{instance.label}: running on {instance.server.url}"

    async def stop(self, server: Server) -> str:
        instance = await self.operator.stop(self._instance_key(server))
        return f"{instance.label}: stopped"

    async def add_instance(self, values: Mapping[str, Any]) -> tuple[str, str]:
        """A new [[instances]] entry, written to the config file (not started): its name and what was done."""
        outcome = await self.operator.add_instance(values)
        return outcome.name, outcome.message

    async def start_instance(self, label: str) -> str:
        instance = await self.operator.start(label)
        return f"{instance.label}: running on {instance.server.url}"

    async def reload(self) -> str:
        notes = await self.operator.reload()
        return "; ".join(notes) or "config reloaded: nothing changed"

    # --- what the panes show beside the cluster ---------------------------------------------

    def instance(self, server: Server) -> Instance | None:
        operator = self.core.operator
        return operator.instances.for_server(server) if operator is not None else None

    def log_file(self, server: Server | None) -> Path | None:
        instance = self.instance(server) if server is not None else None
        return instance.log_path if instance is not None else None

    def gpu_owners(self, gpu: Gpu) -> Sequence[str]:
        """The local instances whose processes use this GPU: vLLM's workers are children
        in the instance's own process group, so a process belongs to the instance whose
        leader's pid is its group id."""
        if self.core.operator is None or not gpu.processes:
            return ()
        leaders = {instance.pid: instance.label for instance in self.core.operator.instances if instance.pid is not None}
        owners: dict[str, None] = {}
        for process in gpu.processes:
            group = _group_of(process.pid)
            label = leaders.get(group) if group is not None else None
            if label is not None:
                owners[label] = None
        return list(owners)

    # --- models and chat ------------------------------------------------------------------

    def instance_problem(self, values: Mapping[str, Any]) -> str | None:
        """Why a new [[instances]] entry would be refused (the config's own checks), or None."""
        try:
            config = instance_entry(dict(values))
        except EntryError as error:
            return str(error)
        operator = self.core.operator
        if operator is not None and any(instance.label == config.label for instance in operator.instances):
            return f"an instance named {config.label!r} exists already; choose another name"
        return None

    def chat_model(self, server: Server) -> str | None:
        """The model name a chat with `server` asks the router for: a managed instance's
        served name, else the first model the server lists."""
        instance = self.instance(server)
        if instance is not None:
            return instance.config.served_name
        return server.models[0] if server.models else None

    def preparation(self, server: Server) -> str | None:
        """What a chat does before its first question: "start" a stopped (or starting)
        instance, "wake" a sleeping (or waking) server, else None."""
        instance = self.instance(server)
        if instance is not None and (instance.lifecycle in STARTABLE or instance.starting):
            return "start"
        if server.sleep_level > 0 or server.waking:
            return "wake"
        return None

    def router_api_key(self) -> str:
        """A key the router takes: the first of `[router] api_keys`; any text when it has none."""
        keys = self.core.config.router.api_keys
        return keys[0] if keys else "none"

    # --- helpers ------------------------------------------------------------------------

    def _instance_key(self, server: Server) -> str:
        instance = self.instance(server)
        if instance is None:
            raise CommandError(f"{server.name} is not a local instance mvtui manages")
        return instance.label


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
