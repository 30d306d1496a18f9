"""One local instance: its config, its Server in the cluster, its process and its log tail,
and the JSON that the admin API and `mvtui ps` show for it.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvtui.cluster.state import Server
from mvtui.config.schema import InstanceConfig, ServerConfig
from mvtui.instances.processes import HOST, instance_command, instance_devices

LOG_TAIL_LINES = 40

# Lifecycles: "stopped", "starting", "running", "stopping" or "error" (in `Server.lifecycle`).
STARTABLE = ("stopped", "error")  # no process: a start may begin


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
        """The process group leader's pid (= its group id) while it runs."""
        process = self.process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def starting(self) -> bool:
        return self.start_task is not None and not self.start_task.done()

    def matches(self, key: str) -> bool:
        return key in (self.label, self.config.served_name, self.config.model, self.server.url)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(list(self.tail)[-lines:])

    def exit_message(self, code: int, when: str) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = self.log_tail()
        return f"{how} {when}; last lines of {self.log_path}:\n{tail}" if tail else f"{how} {when} (its log {self.log_path} is empty)"

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
    """The Server entry through which the router reaches an instance on `port`."""
    return ServerConfig(
        url=f"http://{HOST}:{port}",
        name=config.label,
        models=(config.served_name,),
        max_concurrent_requests=config.max_concurrent_requests,
    )
