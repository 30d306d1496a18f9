"""`mvtui --no-ui`: the core with a plain log line per state change and a periodic summary."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AbstractAsyncContextManager
from typing import Callable

from mvtui.cluster.state import ClusterEvent
from mvtui.event_loop import loop_factory
from mvtui.runtime.wiring import Services

log = logging.getLogger("mvtui")

SUMMARY_EVERY_S = 30.0


def log_event(event: ClusterEvent) -> None:
    if event.kind == "config-error":
        return  # the reloader logs it as a warning already, with every problem
    log.info("%s: %s", event.server, event.message)


def summary_line(services: Services) -> str:
    summary = services.cluster.summary()
    return (
        f"{summary.up}/{summary.total} servers up, {summary.in_flight} in flight, "
        f"{summary.request_rate:.1f} req/s, {summary.token_rate:.0f} tok/s, "
        f"{summary.errors} errors, {summary.retries} retries"
    )


async def _summaries(services: Services, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        log.info("%s", summary_line(services))


# A closed terminal or session (SIGHUP) stops mvtui as gracefully as SIGTERM: no new
# requests, those in flight finish, instances stop, the admin file is removed.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for number in STOP_SIGNALS:
        loop.add_signal_handler(number, stop.set)


async def run_headless(open_core: Callable[[], AbstractAsyncContextManager[Services]], *, summary_every: float = SUMMARY_EVERY_S) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    async with open_core() as services:
        for event in list(services.cluster.events):  # what happened while the core started
            log_event(event)
        services.cluster.subscribe(log_event)
        log.info("mvtui serving on %s with %d servers", services.router_url, len(services.cluster))
        services.keep_running(lambda: _summaries(services, summary_every), "summary")
        await stop.wait()
        log.info("stopping: no new requests; waiting for %d in flight", services.cluster.summary().in_flight)
    log.info("stopped")
    return 0


def serve_headless(open_core: Callable[[], AbstractAsyncContextManager[Services]]) -> int:
    """`mvtui --no-ui` from synchronous code: the core on uvloop when available."""
    factory = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        log.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
        return runner.run(run_headless(open_core))
