"""Local vLLM processes (`[[instances]]`): start, stop, and their lifecycle in the cluster.

Each instance is a Server in the cluster (lifecycle "stopped", "starting", "running",
"stopping" or "error") so the router, poller and dashboard treat it like any other. It runs
in its own process group (launch.py), and has its own lock: a cold start of one model never
blocks another, and a failed start leaves an "error" state that a later start retries.
Before a start or a wake the MemoryPlanner makes room on its GPUs; idle instances sleep or
stop (idle.py). The wiring connects the sleep/wake Controller's hooks to `before_wake` and
`demand`. Entries with `preload = true` start when the manager first runs, one after another
in the background (`preload`), so no request waits on them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster, EngineMetrics, Server
from mvtui.cluster.vllm import VllmClient
from mvtui.config.schema import InstanceConfig, TimingConfig
from mvtui.errors import CommandError
from mvtui.gpu import GpuProbe
from mvtui.instances.guard import GroupGuard
from mvtui.instances.health import HEALTH_CALL_TIMEOUT_S, wait_healthy
from mvtui.instances.idle import IdleKeeper
from mvtui.instances.launch import drain_pump, end_group, kill_group, launch
from mvtui.instances.memory import MemoryPlanner
from mvtui.instances.processes import LOG_MAX_BYTES, instance_command, instance_env, load_prctl, log_file_name
from mvtui.instances.record import STARTABLE, Instance
from mvtui.instances.registry import Registry

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 30.0
DRAIN_POLL_S = 0.05


class InstanceManager:
    """Every local instance; a lock each, never one for all."""

    def __init__(
        self,
        cluster: Cluster,
        control: Controller,
        session: aiohttp.ClientSession,
        log_dir: Path,
        timing: Callable[[], TimingConfig],
        gpu: GpuProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_max_bytes: int = LOG_MAX_BYTES,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.control = control
        self.session = session
        self.log_dir = log_dir
        self.timing = timing
        self.gpu = gpu
        self.clock = clock
        self.log_max_bytes = log_max_bytes
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.registry = Registry(cluster)
        self.instances = self.registry.instances
        self.idle = IdleKeeper(self.instances, cluster, control, self._stop_for, clock)
        self.memory = MemoryPlanner(gpu, self.instances, control.busy, self.idle.sleep_for)
        self.guard = GroupGuard()
        self._prctl = load_prctl()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._preload: asyncio.Task[None] | None = None

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.registry)

    # --- registry -------------------------------------------------------------------------

    def apply(self, configs: Iterable[InstanceConfig]) -> list[str]:
        """Bring `[[instances]]` in line with the config; returns notes for the operator.
        Running instances keep their process; a changed config waits for their next start."""
        notes: list[str] = []
        wanted = {config.label: config for config in configs}
        for config in wanted.values():
            note = self._apply_one(config)
            if note:
                notes.append(note)
        for instance in self:
            if instance.origin == "config" and instance.label not in wanted:
                notes.append(f"instance {instance.label} left the config: stopping it")
                self._background(self.remove(instance.label), f"remove {instance.label}")
        return notes

    def _apply_one(self, config: InstanceConfig) -> str:
        instance = self.instances.get(config.label)
        if instance is None:
            try:
                self.add(config, origin="config")
            except CommandError as error:
                log.error("%s", error)
                return str(error)
            return f"added instance {config.label}"
        return self._reconfigure(instance, config) if instance.config != config else ""

    def _background(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)

    def add(self, config: InstanceConfig, origin: str = "api") -> Instance:
        return self.registry.add(config, origin)

    def find(self, key: str) -> Instance:
        return self.registry.find(key)

    def for_server(self, server: Server) -> Instance | None:
        return self.registry.for_server(server)

    def _reconfigure(self, instance: Instance, config: InstanceConfig) -> str:
        if instance.lifecycle in STARTABLE and not instance.starting:
            try:
                self.registry.use_config(instance, config)
            except CommandError as error:
                return str(error)
            return f"instance {instance.label}: new settings apply at its next start"
        instance.pending_config = config
        return f"instance {instance.label} is {instance.lifecycle}: new settings apply after it stops (mvtui stop, then start)"

    # --- start ----------------------------------------------------------------------------

    async def start(self, key: str) -> Instance:
        """Start (or join a start under way); raises CommandError with the log's last lines."""
        instance = self.find(key)
        if instance.lifecycle == "running":
            return instance
        if instance.lifecycle == "stopping":
            raise CommandError(f"{instance.label} is stopping; start it again once it has stopped")
        await asyncio.shield(self.start_task(instance))
        return instance

    def start_task(self, instance: Instance) -> asyncio.Task[None]:
        """The one start of this instance: every caller waits on the same task."""
        if instance.start_task is None or instance.start_task.done():
            if instance.lifecycle in STARTABLE:  # at once, so every reader sees it
                instance.error = ""
                self._set_lifecycle(instance, "starting", f"starting {instance.config.model}")
            instance.start_task = asyncio.ensure_future(self._start_locked(instance))
            instance.start_task.set_name(f"start {instance.label}")
            instance.start_task.add_done_callback(_retrieve)
        return instance.start_task

    async def restart(self, key: str) -> Instance:
        """Stop (drain, then SIGTERM the group), then start again: settings changed in the
        config since the last start apply now."""
        instance = self.find(key)
        await self.stop(instance.label, reason="restart")
        return await self.start(instance.label)

    def preload(self) -> None:
        """Start every `preload = true` entry, once, one after another in the background.
        Each start takes only its own instance's lock: requests for other models (or for a
        model still waiting its turn, through `demand`) are never held up by it."""
        if self._preload is not None:
            return
        labels = [instance.label for instance in self if instance.config.preload]
        self._preload = asyncio.ensure_future(self._preload_in_turn(labels))
        self._preload.set_name("preload")
        self._preload.add_done_callback(_retrieve)

    async def _preload_in_turn(self, labels: list[str]) -> None:
        for label in labels:
            if self._closing:
                return
            try:
                await self.start(label)
            except CommandError as error:  # its "error" state (dashboard, ps) says why; go on with the next
                log.warning("preload of %s failed: %s", label, str(error).splitlines()[0] if str(error) else "")

    def demand(self, model: str) -> asyncio.Task[None] | None:
        """The Controller's `on_demand` hook, for a request nobody can serve: a start to wait
        on, or None when no instance serves `model`."""
        mine = [instance for instance in self.instances.values() if instance.server.serves(model) and not instance.server.drain]
        for instance in mine:
            if instance.starting:
                return instance.start_task
        startable = [instance for instance in mine if instance.lifecycle in STARTABLE]
        automatic = [instance for instance in startable if instance.config.auto_start]
        if not automatic:
            if startable:
                label = startable[0].label
                raise CommandError(f"{label} is stopped and has auto_start off; start it with `mvtui start {label}`")
            return None
        ready = [instance for instance in automatic if not self._backing_off(instance)]
        if not ready:
            raise CommandError(self._backoff_message(automatic[0]))
        return self.start_task(ready[0])

    def _backing_off(self, instance: Instance) -> bool:
        return instance.lifecycle == "error" and instance.failed_at is not None and self.clock() - instance.failed_at < RESTART_BACKOFF_S

    def _backoff_message(self, failed: Instance) -> str:
        wait = RESTART_BACKOFF_S - (self.clock() - (failed.failed_at or 0.0))
        return (
            f"{failed.label} failed: {failed.error.splitlines()[0] if failed.error else 'unknown error'}; "
            f"it is started again on demand in {wait:.0f} s, or now with `mvtui start {failed.label}`"
        )

    async def _start_locked(self, instance: Instance) -> None:
        async with instance.lock:
            if instance.lifecycle == "running":
                return
            if self._closing:
                instance.server.lifecycle = "stopped"
                raise CommandError("mvtui is shutting down")
            await self._start(instance)

    async def _start(self, instance: Instance) -> None:
        started = self.clock()
        instance.server.lifecycle = "starting"
        instance.error = ""
        instance.tail.clear()
        try:
            await self._prepare(instance)
            await self._spawn(instance)
            await wait_healthy(instance, self._health_client(instance), self.clock, self._reporter(instance), started)
        except asyncio.CancelledError:
            await self._terminate(instance)
            self._set_lifecycle(instance, "stopped", "start cancelled")
            raise
        except CommandError as error:
            await self._fail(instance, str(error))
            raise
        except Exception as error:  # an unexpected failure must still end in "error", not "starting"
            log.exception("starting %s", instance.label)
            await self._fail(instance, f"{type(error).__name__}: {error}")
            raise CommandError(f"{instance.label} failed to start: {error}") from error
        finally:
            self.memory.release(instance.label)
        self._mark_running(instance, started)

    async def _prepare(self, instance: Instance) -> None:
        """Settings waiting for this start, a free port, and room on the GPUs."""
        if instance.pending_config is not None:
            self.registry.use_config(instance, instance.pending_config)
            instance.server.lifecycle = "starting"
        self.registry.choose_port(instance)
        await self.memory.ensure_memory(instance)

    async def _spawn(self, instance: Instance) -> None:
        command = instance_command(instance.config, instance.port)
        log_path = self.log_dir / log_file_name(instance.config.model, instance.port)
        env = instance_env(instance.config, self.base_env)
        process = await launch(instance, command, env, log_path, self.log_max_bytes, self._prctl)
        await self.guard.watch(process.pid, self.timing().shutdown_timeout)
        instance.watcher = asyncio.create_task(self._watch_exit(instance, process), name=f"watch {instance.label}")

    def _health_client(self, instance: Instance) -> VllmClient:
        return VllmClient(self.session, instance.server.url, None, HEALTH_CALL_TIMEOUT_S)

    def _reporter(self, instance: Instance) -> Callable[[str], None]:
        return lambda message: self.cluster.emit("starting", instance.server, message)

    def _mark_running(self, instance: Instance, started: float) -> None:
        server = instance.server
        server.sleep_level = 0
        server.waking = server.sleep_pending = False
        server.sleep_capable = None  # the poller asks /is_sleeping again
        server.health.failures = 0
        for _ in range(max(1, server.health.recover_threshold)):
            server.health.success()
        instance.started_at = server.last_used = self.clock()
        instance.progress = ""
        instance.failed_at = None
        self._set_lifecycle(instance, "running", f"running on port {instance.port} after {self.clock() - started:.1f} s")

    async def _fail(self, instance: Instance, message: str) -> None:
        await self._terminate(instance)
        self._record_failure(instance, message)
        self._set_lifecycle(instance, "error", f"failed to start: {message}")

    def _record_failure(self, instance: Instance, message: str) -> None:
        instance.error = message
        instance.failed_at = self.clock()
        instance.progress = ""
        instance.server.last_error = message.splitlines()[0] if message else ""

    def _set_lifecycle(self, instance: Instance, lifecycle: str, message: str) -> None:
        instance.server.lifecycle = lifecycle
        self.cluster.emit(lifecycle, instance.server, message)

    # --- exit -----------------------------------------------------------------------------

    async def _watch_exit(self, instance: Instance, process: asyncio.subprocess.Process) -> None:
        """A running instance whose leader exits: the rest of its group is killed, and the
        instance shows "error" with the log's last lines."""
        code = await process.wait()
        if instance.stopping or instance.process is not process or instance.lifecycle != "running":
            return
        if await kill_group(instance.label, process):  # workers it leaves behind must not outlive it
            await self.guard.forget(process.pid)
        await drain_pump(instance)
        message = instance.exit_message(code, "while running")
        self._record_failure(instance, message)
        self._reset_server(instance.server)
        self._set_lifecycle(instance, "error", message)

    async def _terminate(self, instance: Instance) -> None:
        """SIGTERM to the group, SIGKILL after shutdown_timeout; waits for every member."""
        process = instance.process
        if process is None:
            return
        instance.stopping = True
        if await end_group(instance.label, process, self.timing().shutdown_timeout):
            await self.guard.forget(process.pid)
        await drain_pump(instance)
        if instance.watcher is not None:
            instance.watcher.cancel()
        instance.process = None

    # --- stop -----------------------------------------------------------------------------

    async def stop(self, key: str, *, reason: str = "") -> Instance:
        """Stop taking requests, let those in flight finish (drain_timeout), then SIGTERM
        the group and SIGKILL it after shutdown_timeout. A start under way is cancelled."""
        instance = self.find(key)
        start = instance.start_task
        if start is not None and not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        async with instance.lock, self.control.lock(instance.server):
            await self._stop_locked(instance, reason)
        return instance

    async def _stop_for(self, label: str, reason: str) -> Instance:
        return await self.stop(label, reason=reason)

    async def _stop_locked(self, instance: Instance, reason: str) -> None:
        if instance.process is None and instance.lifecycle in STARTABLE:
            return
        server = instance.server
        self._set_lifecycle(instance, "stopping", f"stopping{' (' + reason + ')' if reason else ''}, {server.in_flight} in flight")
        deadline = self.clock() + self.timing().drain_timeout
        while server.in_flight and self.clock() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await self._terminate(instance)
        self._reset_server(server)
        instance.started_at = None
        self._set_lifecycle(instance, "stopped", "stopped")

    def _reset_server(self, server: Server) -> None:
        server.sleep_level = 0
        server.waking = server.sleep_pending = False
        server.sleep_capable = None
        server.sleep_epoch += 1
        server.metrics = EngineMetrics()

    async def remove(self, key: str) -> Instance:
        """Stop, then forget the instance (API-created ones, or those gone from the config)."""
        instance = await self.stop(key, reason="removed")
        self.registry.forget(instance)
        return instance

    async def stop_all(self) -> None:
        """mvtui is exiting: cancel starts, stop every process group; nothing outlives us."""
        self._closing = True
        if self._preload is not None:
            self._preload.cancel()  # the start it waits on is cancelled below
            await asyncio.gather(self._preload, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        starts = [instance.start_task for instance in self if instance.start_task is not None and instance.starting]
        for task in starts:
            task.cancel()
        await asyncio.gather(*starts, return_exceptions=True)
        await self.idle.cancel()
        running = [instance for instance in self if instance.process is not None]
        await asyncio.gather(*(self._terminate(instance) for instance in running), return_exceptions=True)
        for instance in self:
            if instance.lifecycle not in STARTABLE:
                self._reset_server(instance.server)
                self._set_lifecycle(instance, "stopped", "stopped (mvtui exits)")
        await self.guard.close()

    # --- the idle loop and the Controller's hooks ------------------------------------------

    async def run(self) -> None:
        """Preload (the first time only), then idle timeouts: sleep or stop instances nobody
        has used for idle_timeout."""
        self.preload()
        await self.idle.run()

    async def before_wake(self, server: Server) -> None:
        """The Controller's `before_wake` hook: make room on the GPUs of a local instance."""
        instance = self.for_server(server)
        if instance is not None:
            await self.memory.ensure_memory(instance)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
