"""Local vLLM processes (`[[instances]]`): start, stop, logs, idle actions and GPU memory.

Each instance is a Server in the cluster (lifecycle "stopped", "starting", "running",
"stopping" or "error") so the router, poller and dashboard treat it like any other. It runs
in its own process group (tensor-parallel workers are its children), writes to a size-bounded
log, and has its own lock: a cold start of one model never blocks another, and a failed start
leaves an "error" state that a later start retries. Before a start or a wake the manager
checks free GPU memory (NVML) and sleeps least recently used idle instances until it fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import aiohttp

from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster, EngineMetrics, Server
from mvtui.cluster.vllm import VllmClient
from mvtui.config.schema import InstanceConfig, ServerConfig, TimingConfig
from mvtui.errors import CONNECTION_ERRORS, CommandError, VllmError
from mvtui.gpu import GpuProbe
from mvtui.instances.memory import MemoryPlanner
from mvtui.instances.processes import (
    HOST,
    LOG_MAX_BYTES,
    RotatingLog,
    die_with_parent,
    group_alive,
    instance_command,
    instance_devices,
    instance_env,
    load_prctl,
    log_file_name,
    port_is_free,
    signal_group,
)
from mvtui.paths import AppPaths

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
LOG_LINE_MAX = 4096
HEALTH_POLL_S = 0.25
HEALTH_CALL_TIMEOUT_S = 2.0
PROGRESS_EVERY_S = 5.0
RESTART_BACKOFF_S = 30.0
KILL_WAIT_S = 5.0


# --- one instance -------------------------------------------------------------------------


@dataclass(eq=False)
class Instance:
    config: InstanceConfig
    server: Server
    origin: str  # "config" ([[instances]]) or "api" (POST /instances)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    process: asyncio.subprocess.Process | None = None
    start_task: asyncio.Task[None] | None = None
    pending_config: InstanceConfig | None = None
    log_path: Path | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    progress: str = ""
    error: str = ""
    log_error: str = ""
    failed_at: float | None = None
    started_at: float | None = None
    stopping: bool = False
    idle_tried_at: float = -math.inf
    idle_task: asyncio.Task[None] | None = None
    pump: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def lifecycle(self) -> str:
        return self.server.lifecycle or "stopped"

    @property
    def port(self) -> int:
        return int(self.server.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def starting(self) -> bool:
        return self.start_task is not None and not self.start_task.done()

    def matches(self, key: str) -> bool:
        return key in (self.label, self.config.served_name, self.config.model, self.server.url)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(list(self.tail)[-lines:])

    def info(self, clock: Callable[[], float]) -> dict[str, Any]:
        """What the admin API and `mvtui ps` show."""
        config, server = self.config, self.server
        return {
            "id": self.label,
            "name": self.label,
            "model": config.model,
            "served_model_name": config.served_name,
            "origin": self.origin,
            "lifecycle": self.lifecycle,
            "state": server.state,
            "url": server.url,
            "port": self.port,
            "pid": self.pid,
            "devices": list(instance_devices(config)),
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "auto_start": config.auto_start,
            "idle_timeout": config.idle_timeout,
            "idle_action": config.idle_action,
            "sleep_level": server.sleep_level,
            "in_flight": server.in_flight,
            "uptime_s": round(clock() - self.started_at, 1) if self.started_at and self.lifecycle == "running" else None,
            "idle_s": round(clock() - server.last_used, 1),
            "progress": self.progress or None,
            "error": self.error or None,
            "log": str(self.log_path) if self.log_path else None,
            "log_error": self.log_error or None,
            "log_tail": list(self.tail)[-20:],
            "command": instance_command(config, self.port),
            "restart_needed": self.pending_config is not None,
        }


def server_config_for(config: InstanceConfig, port: int) -> ServerConfig:
    return ServerConfig(
        url=f"http://{HOST}:{port}",
        name=config.label,
        models=(config.served_name,),
        max_concurrent_requests=config.max_concurrent_requests,
    )


# --- the manager --------------------------------------------------------------------------


class InstanceManager:
    """Every local instance; a lock each, never one for all."""

    def __init__(
        self,
        cluster: Cluster,
        control: Controller,
        session: aiohttp.ClientSession,
        paths: AppPaths,
        timing: Callable[[], TimingConfig],
        gpu: GpuProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_max_bytes: int = LOG_MAX_BYTES,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.control = control
        self.session = session
        self.paths = paths
        self.timing = timing
        self.gpu = gpu
        self.clock = clock
        self.log_max_bytes = log_max_bytes
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.instances: dict[str, Instance] = {}
        self.memory = MemoryPlanner(gpu, self.instances, control.busy, self._sleep_for)
        self._prctl = load_prctl()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        control.before_wake = self.before_wake
        control.on_demand = self.demand

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self.instances.values()))

    # --- registry -------------------------------------------------------------------------

    def apply(self, configs: Iterable[InstanceConfig]) -> list[str]:
        """Bring `[[instances]]` in line with the config; returns notes for the operator.
        Running instances keep their process; a changed config waits for their next start."""
        notes: list[str] = []
        wanted = {config.label: config for config in configs}
        for label, config in wanted.items():
            instance = self.instances.get(label)
            if instance is None:
                try:
                    self.add(config, origin="config")
                except CommandError as error:
                    log.error("%s", error)
                    notes.append(str(error))
                    continue
                notes.append(f"added instance {label}")
            elif instance.config != config:
                notes.append(self._reconfigure(instance, config))
        for instance in list(self.instances.values()):
            if instance.origin == "config" and instance.label not in wanted:
                notes.append(f"instance {instance.label} left the config: stopping it")
                self._background(self.remove(instance.label), f"remove {instance.label}")
        return notes

    def _background(self, coroutine: Any, name: str) -> None:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)

    def add(self, config: InstanceConfig, origin: str = "api") -> Instance:
        if config.label in self.instances:
            raise CommandError(f"an instance named {config.label!r} exists already")
        wanted = server_config_for(config, self._initial_port(config))
        if wanted.url in self.cluster.servers:
            raise CommandError(f"instance {config.label}: {wanted.url} is already {self.cluster.servers[wanted.url].name}'s; choose another port")
        server = self.cluster.add(wanted)
        server.lifecycle = "stopped"
        instance = Instance(config, server, origin)
        self.instances[config.label] = instance
        return instance

    def _reconfigure(self, instance: Instance, config: InstanceConfig) -> str:
        if instance.lifecycle in ("stopped", "error") and not instance.starting:
            try:
                self._use_config(instance, config)
            except CommandError as error:
                return str(error)
            return f"instance {instance.label}: new settings apply at its next start"
        instance.pending_config = config
        return f"instance {instance.label} is {instance.lifecycle}: new settings apply after it stops (mvtui stop, then start)"

    def _use_config(self, instance: Instance, config: InstanceConfig) -> None:
        instance.config = config
        instance.pending_config = None
        port = config.port or (instance.port if _in_range(instance.port, config.port_range) else self._initial_port(config))
        self._move(instance, port)

    def _move(self, instance: Instance, port: int) -> None:
        """Point the instance's Server at `port` (a new URL is a new Server)."""
        wanted = server_config_for(instance.config, port)
        old = instance.server
        if wanted.url == old.url:
            old.config = wanted
            return
        if wanted.url in self.cluster.servers:
            raise CommandError(f"instance {instance.label}: {wanted.url} is already {self.cluster.servers[wanted.url].name}'s")
        self.cluster.forget(old)
        server = self.cluster.add(wanted)
        server.lifecycle = old.lifecycle
        instance.server = server

    def _initial_port(self, config: InstanceConfig) -> int:
        if config.port:
            return config.port
        taken = {instance.port for instance in self.instances.values() if instance.config.label != config.label}
        first, last = config.port_range
        for port in range(first, last + 1):
            if port not in taken and port_is_free(port):
                return port
        return next((port for port in range(first, last + 1) if port not in taken), first)

    def _free_port(self, instance: Instance) -> int:
        """The instance's port if nothing else listens there, else another one from its range."""
        if port_is_free(instance.port):
            return instance.port
        if instance.config.port:
            raise CommandError(f"port {instance.port} on {HOST} is already in use; choose another `port`")
        taken = {other.port for other in self.instances.values() if other is not instance}
        first, last = instance.config.port_range
        for port in range(first, last + 1):
            if port not in taken and port_is_free(port):
                return port
        raise CommandError(f"no free port in port_range {first}-{last}")

    def find(self, key: str) -> Instance:
        if key in self.instances:
            return self.instances[key]
        matches = [instance for instance in self.instances.values() if instance.matches(key) or instance.server.name == key]
        if len(matches) == 1:
            return matches[0]
        names = ", ".join(self.instances) or "none"
        if matches:
            raise CommandError(f"{key!r} matches several instances ({', '.join(i.label for i in matches)}); use a name")
        raise CommandError(f"no instance named {key!r}; instances: {names}")

    def for_server(self, server: Server) -> Instance | None:
        return next((instance for instance in self.instances.values() if instance.server is server), None)

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
            if instance.lifecycle in ("stopped", "error"):  # at once, so every reader sees it
                instance.error = ""
                self._set_lifecycle(instance, "starting", f"starting {instance.config.model}")
            instance.start_task = asyncio.ensure_future(self._start_locked(instance))
            instance.start_task.set_name(f"start {instance.label}")
            instance.start_task.add_done_callback(_retrieve)
        return instance.start_task

    def demand(self, model: str) -> asyncio.Task[None] | None:
        """The controller's hook for a request nobody can serve: a start to wait on, or None."""
        mine = [instance for instance in self.instances.values() if instance.server.serves(model) and not instance.server.drain]
        for instance in mine:
            if instance.starting:
                return instance.start_task
        startable = [instance for instance in mine if instance.lifecycle in ("stopped", "error")]
        automatic = [instance for instance in startable if instance.config.auto_start]
        if not automatic:
            if startable:
                label = startable[0].label
                raise CommandError(f"{label} is stopped and has auto_start off; start it with `mvtui start {label}`")
            return None
        ready = [instance for instance in automatic if not self._backing_off(instance)]
        if not ready:
            failed = automatic[0]
            wait = RESTART_BACKOFF_S - (self.clock() - (failed.failed_at or 0.0))
            raise CommandError(
                f"{failed.label} failed: {failed.error.splitlines()[0] if failed.error else 'unknown error'}; "
                f"it is started again on demand in {wait:.0f} s, or now with `mvtui start {failed.label}`"
            )
        return self.start_task(ready[0])

    def _backing_off(self, instance: Instance) -> bool:
        return instance.lifecycle == "error" and instance.failed_at is not None and self.clock() - instance.failed_at < RESTART_BACKOFF_S

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
            if instance.pending_config is not None:
                self._use_config(instance, instance.pending_config)
                instance.server.lifecycle = "starting"
            port = self._free_port(instance)
            if port != instance.port:
                self._move(instance, port)
            await self.memory.ensure_memory(instance)
            await self._spawn(instance)
            await self._wait_healthy(instance, started)
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

    async def _spawn(self, instance: Instance) -> None:
        command = instance_command(instance.config, instance.port)
        instance.log_path = self.paths.instance_logs / log_file_name(instance.config.model, instance.port)
        writer = await asyncio.to_thread(RotatingLog, instance.log_path, self.log_max_bytes)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        await asyncio.to_thread(writer.write, f"\n=== {stamp} mvtui starts: {' '.join(command)}\n".encode())
        preexec = functools.partial(die_with_parent, self._prctl, os.getpid()) if self._prctl else None
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=instance_env(instance.config, self.base_env),
                start_new_session=True,  # its own process group: signals reach every worker
                preexec_fn=preexec,
            )
        except OSError as error:
            await asyncio.to_thread(writer.close)
            hint = " (is vLLM installed here? or set `command`)" if isinstance(error, FileNotFoundError) else ""
            raise CommandError(f"cannot run {command[0]!r}: {error.strerror or error}{hint}") from None
        instance.process = process
        instance.stopping = False
        instance.pump = asyncio.create_task(self._pump(instance, process, writer), name=f"log {instance.label}")
        instance.watcher = asyncio.create_task(self._watch_exit(instance, process), name=f"watch {instance.label}")
        log.info("%s: started pid %d: %s (log %s)", instance.label, process.pid, " ".join(command), instance.log_path)

    async def _wait_healthy(self, instance: Instance, started: float) -> None:
        """Until /health answers 200; visible progress meanwhile; bounded by startup_timeout."""
        process = instance.process
        assert process is not None
        client = VllmClient(self.session, instance.server.url, None, HEALTH_CALL_TIMEOUT_S)
        deadline = started + instance.config.startup_timeout
        next_report = started + PROGRESS_EVERY_S
        while True:
            if process.returncode is not None:
                await self._drain_pump(instance)
                raise CommandError(self._exit_message(instance, process.returncode, "during start-up"))
            status = await _health_status(client)
            now = self.clock()
            if status == 200:
                return
            instance.progress = f"{now - started:.0f} s: {'waiting for /health' if status is None else f'/health answered {status}'}"
            if instance.tail:
                instance.progress += f"; log: {instance.tail[-1][:160]}"
            if now >= next_report:
                next_report = now + PROGRESS_EVERY_S
                self.cluster.emit("starting", instance.server, f"starting, {instance.progress}")
            if now >= deadline:
                raise CommandError(
                    f"not healthy after {instance.config.startup_timeout:g} s (startup_timeout); "
                    f"last lines of {instance.log_path}:\n{instance.log_tail()}"
                )
            await asyncio.sleep(HEALTH_POLL_S)

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
        instance.error = message
        instance.failed_at = self.clock()
        instance.progress = ""
        instance.server.last_error = message.splitlines()[0] if message else ""
        self._set_lifecycle(instance, "error", f"failed to start: {message}")

    def _exit_message(self, instance: Instance, code: int, when: str) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = instance.log_tail()
        return f"{how} {when}; last lines of {instance.log_path}:\n{tail}" if tail else f"{how} {when} (its log {instance.log_path} is empty)"

    def _set_lifecycle(self, instance: Instance, lifecycle: str, message: str) -> None:
        instance.server.lifecycle = lifecycle
        self.cluster.emit(lifecycle, instance.server, message)

    # --- output and exit ------------------------------------------------------------------

    async def _pump(self, instance: Instance, process: asyncio.subprocess.Process, writer: RotatingLog) -> None:
        """Copy the process's output to its log file and keep the last lines in memory."""
        stream = process.stdout
        assert stream is not None
        partial = b""
        try:
            while chunk := await stream.read(65536):
                try:
                    await asyncio.to_thread(writer.write, chunk)
                except OSError as error:  # keep reading: a child blocked on a full pipe would hang
                    if not instance.log_error:
                        log.error("%s: cannot write its log %s: %s", instance.label, instance.log_path, error)
                    instance.log_error = str(error)
                lines = re.split(rb"\r?\n|\r", partial + chunk)
                partial = lines.pop()
                if len(partial) > LOG_LINE_MAX:
                    lines.append(partial)
                    partial = b""
                instance.tail.extend(line.decode("utf-8", "replace")[:LOG_LINE_MAX] for line in lines if line.strip())
        finally:
            if partial.strip():
                instance.tail.append(partial.decode("utf-8", "replace"))
            await asyncio.to_thread(writer.close)

    async def _drain_pump(self, instance: Instance) -> None:
        """Let the log copier read what the process wrote before it exited (bounded)."""
        if instance.pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(instance.pump), 2.0)

    async def _watch_exit(self, instance: Instance, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if instance.stopping or instance.process is not process or instance.lifecycle != "running":
            return
        signal_group(process.pid, signal.SIGKILL)  # workers it leaves behind must not outlive it
        await self._drain_pump(instance)
        message = self._exit_message(instance, code, "while running")
        instance.error = message
        instance.failed_at = self.clock()
        instance.server.last_error = message.splitlines()[0]
        self._reset_server(instance.server)
        self._set_lifecycle(instance, "error", message)

    async def _terminate(self, instance: Instance) -> None:
        """SIGTERM to the group, SIGKILL after shutdown_timeout; waits for every member."""
        process = instance.process
        if process is None:
            return
        instance.stopping = True
        pgid = process.pid
        timeout = self.timing().shutdown_timeout
        signal_group(pgid, signal.SIGTERM)
        if not await _group_exits(process, pgid, timeout):
            log.warning("%s: group %d still alive %g s after SIGTERM; sending SIGKILL", instance.label, pgid, timeout)
            signal_group(pgid, signal.SIGKILL)
            if not await _group_exits(process, pgid, KILL_WAIT_S):
                log.error("%s: process group %d survived SIGKILL", instance.label, pgid)
        await self._drain_pump(instance)
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
        async with instance.lock:
            async with self.control.lock(instance.server):
                await self._stop_locked(instance, reason)
        return instance

    async def _stop_locked(self, instance: Instance, reason: str) -> None:
        if instance.process is None and instance.lifecycle in ("stopped", "error"):
            return
        server = instance.server
        self._set_lifecycle(instance, "stopping", f"stopping{' (' + reason + ')' if reason else ''}, {server.in_flight} in flight")
        deadline = self.clock() + self.timing().drain_timeout
        while server.in_flight and self.clock() < deadline:
            await asyncio.sleep(0.05)
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
        if self.instances.get(instance.label) is instance:
            del self.instances[instance.label]
            self.cluster.forget(instance.server)
        return instance

    async def stop_all(self) -> None:
        """mvtui is exiting: cancel starts, stop every process group; nothing outlives us."""
        self._closing = True
        await asyncio.gather(*self._tasks, return_exceptions=True)
        starts = [instance.start_task for instance in self.instances.values() if instance.starting]
        for task in starts:
            task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*starts, return_exceptions=True)  # type: ignore[arg-type]
        idle = [instance.idle_task for instance in self.instances.values() if instance.idle_task and not instance.idle_task.done()]
        for task in idle:
            task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*idle, return_exceptions=True)  # type: ignore[arg-type]
        running = [instance for instance in self.instances.values() if instance.process is not None]
        await asyncio.gather(*(self._terminate(instance) for instance in running), return_exceptions=True)
        for instance in self.instances.values():
            if instance.lifecycle not in ("stopped", "error"):
                self._reset_server(instance.server)
                self._set_lifecycle(instance, "stopped", "stopped (mvtui exits)")

    # --- idle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply idle_timeout/idle_action, checking a few times per shortest timeout."""
        while True:
            await asyncio.sleep(self._idle_interval())
            now = self.clock()
            for instance in list(self.instances.values()):
                if self._idle_due(instance, now):
                    instance.idle_tried_at = now
                    instance.idle_task = asyncio.create_task(self._idle_action(instance), name=f"idle {instance.label}")

    def _idle_interval(self) -> float:
        timeouts = [instance.config.idle_timeout for instance in self.instances.values() if instance.config.idle_timeout > 0]
        return max(0.05, min([1.0, *(timeout / 4 for timeout in timeouts)]))

    def _idle_due(self, instance: Instance, now: float) -> bool:
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

    async def _idle_action(self, instance: Instance) -> None:
        action = instance.config.idle_action
        idle_for = f"idle for {instance.config.idle_timeout:g} s"
        try:
            if action == "stop":
                await self.stop(instance.label, reason=idle_for)
            elif await self.control.sleep_if_idle(instance.server, 2 if action == "sleep2" else 1):
                self.cluster.emit("idle", instance.server, f"{idle_for}: asleep at level {instance.server.sleep_level}")
        except CommandError as error:
            self.cluster.emit("idle", instance.server, f"{idle_for}, but {action} failed: {error}")

    # --- GPU memory -----------------------------------------------------------------------

    async def before_wake(self, server: Server) -> None:
        instance = self.for_server(server)
        if instance is not None:
            await self.memory.ensure_memory(instance)

    async def _sleep_for(self, victim: Instance, target: Instance) -> None:
        level = 2 if victim.config.idle_action == "sleep2" else 1
        self.cluster.emit("memory", victim.server, f"least recently used: sleeping (level {level}) to make room for {target.label}")
        try:
            await self.control.sleep_if_idle(victim.server, level)
        except CommandError as error:
            self.cluster.emit("memory", victim.server, f"could not sleep to make room: {error}")


async def _health_status(client: VllmClient) -> int | None:
    try:
        return await client.health()
    except (VllmError, *CONNECTION_ERRORS):
        return None


async def _group_exits(process: asyncio.subprocess.Process, pgid: int, timeout: float) -> bool:
    """Until the leader is reaped and no member of its group is left, at most `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(process.wait(), timeout)
    while group_alive(pgid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return process.returncode is not None


def _in_range(port: int, port_range: tuple[int, int]) -> bool:
    return port_range[0] <= port <= port_range[1]


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
