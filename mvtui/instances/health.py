"""Waiting for a starting instance: until /health answers 200 from the instance's own
process group, with visible progress, bounded by startup_timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mvtui.cluster.vllm import VllmClient
from mvtui.errors import CONNECTION_ERRORS, CommandError, VllmError
from mvtui.instances.launch import drain_pump
from mvtui.instances.listeners import check_listener
from mvtui.instances.record import Instance

HEALTH_POLL_S = 0.25
HEALTH_CALL_TIMEOUT_S = 2.0
PROGRESS_EVERY_S = 5.0


async def wait_healthy(
    instance: Instance, client: VllmClient, clock: Callable[[], float], report: Callable[[str], None], started: float
) -> None:
    """Return once the instance serves; CommandError when it exits, times out, or when
    something else answers on its port."""
    process = instance.process
    assert process is not None
    deadline = started + instance.config.startup_timeout
    next_report = started + PROGRESS_EVERY_S
    while True:
        if process.returncode is not None:
            await drain_pump(instance)
            raise CommandError(instance.exit_message(process.returncode, "during start-up"))
        status = await health_status(client)
        if status == 200:
            await check_owner(instance, process.pid)
            return
        now = clock()
        instance.progress = progress_line(instance, now - started, status)
        if now >= next_report:
            next_report = now + PROGRESS_EVERY_S
            report(f"starting, {instance.progress}")
        if now >= deadline:
            raise CommandError(
                f"not healthy after {instance.config.startup_timeout:g} s (startup_timeout); "
                f"last lines of {instance.log_path}:\n{instance.log_tail()}"
            )
        await asyncio.sleep(HEALTH_POLL_S)


async def check_owner(instance: Instance, pgid: int) -> None:
    """The socket that answered must be the instance's own: a squatter on its port would
    otherwise receive users' prompts."""
    verdict = await asyncio.to_thread(check_listener, instance.port, pgid)
    if not verdict.ours:
        raise CommandError(
            f"port {instance.port} answers /health, but not from {instance.label}'s processes: "
            f"another program listens there ({verdict.detail}); {instance.label} is not marked running"
        )


def progress_line(instance: Instance, elapsed: float, status: int | None) -> str:
    line = f"{elapsed:.0f} s: {'waiting for /health' if status is None else f'/health answered {status}'}"
    if instance.tail:
        line += f"; log: {instance.tail[-1][:160]}"
    return line


async def health_status(client: VllmClient) -> int | None:
    try:
        return await client.health()
    except (VllmError, *CONNECTION_ERRORS):
        return None
