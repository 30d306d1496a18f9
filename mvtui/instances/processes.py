"""What an instance's process is: its argv and environment, its log file, and the process
group signals, including dying with mvtui (Linux PR_SET_PDEATHSIG on the group leader).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from mvtui.config.schema import InstanceConfig

HOST = "127.0.0.1"  # dev-mode endpoints are unauthenticated: managed instances stay on loopback
LOG_MAX_BYTES = 16 * 1024 * 1024
PR_SET_PDEATHSIG = 1

DEFAULT_COMMAND = (
    "vllm", "serve", "{model}", "--host", "{host}", "--port", "{port}",
    "--served-model-name", "{served_name}", "--gpu-memory-utilization", "{gpu_memory_utilization}",
    "--enable-sleep-mode",
)  # fmt: skip
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def instance_command(config: InstanceConfig, port: int) -> list[str]:
    """The argv of an instance: `command` (default `vllm serve ...`) plus `extra_args`, with
    {model} {served_name} {port} {host} ... filled in; other braces (JSON) are left alone."""
    template = list(config.command) or default_command(config)
    values = {
        "model": config.model,
        "served_name": config.served_name,
        "name": config.label,
        "port": str(port),
        "host": HOST,
        "gpu_memory_utilization": f"{config.gpu_memory_utilization:g}",
        "max_model_len": str(config.max_model_len),
        "tensor_parallel_size": str(config.tensor_parallel_size),
        "devices": ",".join(map(str, config.devices)),
    }
    fill = functools.partial(_PLACEHOLDER.sub, lambda match: values.get(match.group(1), match.group(0)))
    return [fill(arg) for arg in (*template, *config.extra_args)]


def default_command(config: InstanceConfig) -> list[str]:
    command = list(DEFAULT_COMMAND)
    if config.max_model_len:
        command += ["--max-model-len", "{max_model_len}"]
    if config.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", "{tensor_parallel_size}"]
    return command


def instance_env(config: InstanceConfig, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # the sleep API
    env["PYTHONUNBUFFERED"] = "1"  # log lines as they happen
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's numbering = NVML's, which the memory check reads
    if config.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, config.devices))
    env.update(dict(config.env))
    return env


def log_file_name(model: str, port: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', model).strip('-') or 'model'}_{port}.log"


def instance_devices(config: InstanceConfig) -> tuple[int, ...]:
    """The GPUs an instance uses: `devices`, else the first tensor_parallel_size ones."""
    return config.devices or tuple(range(config.tensor_parallel_size))


def load_prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded in the parent: loading a library after fork can deadlock."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(prctl: Callable[..., int], parent_pid: int) -> None:
    """In the child before exec: SIGTERM when mvtui dies, even by SIGKILL (Linux only)."""
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent_pid:  # mvtui died between fork and prctl
        os._exit(1)


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RotatingLog:
    """An instance's output file, kept under `max_bytes` by moving it to NAME.1 when full.
    Blocking: call it from a thread."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self.size = path.stat().st_size if path.exists() else 0
        if self.size >= max_bytes:
            self._rotate()
        self._file = open(path, "ab")

    @property
    def backup(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def write(self, data: bytes) -> None:
        if self.size and self.size + len(data) > self.max_bytes:
            self._file.close()
            self._rotate()
            self._file = open(self.path, "ab")
        self._file.write(data)
        self._file.flush()
        self.size += len(data)

    def _rotate(self) -> None:
        os.replace(self.path, self.backup)
        self.size = 0

    def close(self) -> None:
        self._file.close()
