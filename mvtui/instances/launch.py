"""An instance's process group: launch it with its log, copy its output, end it.

The command runs in its own session, so it leads a new process group: its workers (tensor
parallel, or a wrapper's children) are members, and every signal goes to the whole group.
The leader also gets SIGTERM from the kernel if mvtui dies (PR_SET_PDEATHSIG); the
GroupGuard watchdog ends the rest of the group then.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from mvtui.errors import CommandError
from mvtui.instances.processes import RotatingLog, die_with_parent, group_alive, signal_group
from mvtui.instances.record import Instance

log = logging.getLogger(__name__)

LOG_LINE_MAX = 4096
KILL_WAIT_S = 5.0
PUMP_DRAIN_S = 2.0
GROUP_POLL_S = 0.05

Prctl = Callable[..., int]


async def launch(
    instance: Instance, command: list[str], env: Mapping[str, str], log_path: Path, log_max_bytes: int, prctl: Prctl | None
) -> asyncio.subprocess.Process:
    """Start `command` as a new process group whose output goes to `log_path` (and the
    instance's tail); the instance records the process and its log copier."""
    instance.log_path = log_path
    writer = await asyncio.to_thread(RotatingLog, log_path, log_max_bytes)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    await asyncio.to_thread(writer.write, f"\n=== {stamp} mvtui starts: {' '.join(command)}\n".encode())
    try:
        process = await _exec(command, env, prctl)
    except OSError as error:
        await asyncio.to_thread(writer.close)
        hint = " (is vLLM installed here? or set `command`)" if isinstance(error, FileNotFoundError) else ""
        raise CommandError(f"cannot run {command[0]!r}: {error.strerror or error}{hint}") from None
    instance.process = process
    instance.stopping = False
    instance.pump = asyncio.create_task(pump(instance, process, writer), name=f"log {instance.label}")
    log.info("%s: started pid %d: %s (log %s)", instance.label, process.pid, " ".join(command), log_path)
    return process


async def _exec(command: list[str], env: Mapping[str, str], prctl: Prctl | None) -> asyncio.subprocess.Process:
    preexec = functools.partial(die_with_parent, prctl, os.getpid()) if prctl else None
    return await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,  # its own process group: signals reach every worker
        preexec_fn=preexec,
    )


async def pump(instance: Instance, process: asyncio.subprocess.Process, writer: RotatingLog) -> None:
    """Copy the process's output to its log file and keep the last lines in memory."""
    stream = process.stdout
    assert stream is not None
    partial = b""
    try:
        while chunk := await stream.read(65536):
            await _write_log(instance, writer, chunk)
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


async def _write_log(instance: Instance, writer: RotatingLog, chunk: bytes) -> None:
    try:
        await asyncio.to_thread(writer.write, chunk)
    except OSError as error:  # keep reading: a child blocked on a full pipe would hang
        if not instance.log_error:
            log.error("%s: cannot write its log %s: %s", instance.label, instance.log_path, error)
        instance.log_error = str(error)


async def drain_pump(instance: Instance) -> None:
    """Let the log copier read what the process wrote before it exited (bounded)."""
    if instance.pump is not None:
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(instance.pump), PUMP_DRAIN_S)


async def end_group(label: str, process: asyncio.subprocess.Process, timeout: float) -> bool:
    """SIGTERM to the whole group, SIGKILL after `timeout`; True once every member is gone."""
    pgid = process.pid
    signal_group(pgid, signal.SIGTERM)
    if await group_exits(process, pgid, timeout):
        return True
    log.warning("%s: group %d still alive %g s after SIGTERM; sending SIGKILL", label, pgid, timeout)
    return await kill_group(label, process)


async def kill_group(label: str, process: asyncio.subprocess.Process) -> bool:
    """SIGKILL to the whole group (members a dead leader left behind); True once all are gone."""
    signal_group(process.pid, signal.SIGKILL)
    if await group_exits(process, process.pid, KILL_WAIT_S):
        return True
    log.error("%s: process group %d survived SIGKILL", label, process.pid)
    return False


async def group_exits(process: asyncio.subprocess.Process, pgid: int, timeout: float) -> bool:
    """Until the leader is reaped and no member of its group is left, at most `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(process.wait(), timeout)
    while group_alive(pgid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(GROUP_POLL_S)
    return process.returncode is not None
