"""`mvtui --no-ui`: the core with a plain log line per state change and a periodic summary."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from mvtui.cluster.state import Cluster, ClusterEvent
from mvtui.errors import MvtuiError
from mvtui.event_loop import loop_factory
from mvtui.runtime.bind import OPEN_WITHOUT_KEYS, host_port, open_without_keys
from mvtui.runtime.wiring import Services

log = logging.getLogger("mvtui")

SUMMARY_EVERY_S = 30.0
EXIT_CANNOT_START = 1


def log_event(event: ClusterEvent) -> None:
    if event.kind == "config-error":
        return  # the reloader logs it as a warning already, with every problem
    log.info("%s: %s", event.server, event.message)


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`1 server`, `2 servers`, `1 retry`, `0 retries`."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def servers_phrase(cluster: Cluster) -> str:
    """`3 servers: 2 up, 1 sleeping L1`: awake, asleep and down counted apart."""
    states = Counter(server.state for server in cluster)
    shown = ", ".join(f"{number} {state}" for state, number in states.items())
    return counted(len(cluster), "server") + (f": {shown}" if shown else "")


def summary_line(services: Services) -> str:
    summary = services.cluster.summary()
    return (
        f"{servers_phrase(services.cluster)}; {summary.in_flight} in flight, "
        f"{summary.request_rate:.1f} req/s, {summary.token_rate:.0f} tok/s, "
        f"{counted(summary.errors, 'error')}, {counted(summary.retries, 'retry', 'retries')}"
    )


def log_startup(services: Services) -> None:
    """What is bound, a warning when anyone on the network may use it, and the servers."""
    router = services.config.router
    if open_without_keys(router.host, router.api_keys):
        log.warning("%s", OPEN_WITHOUT_KEYS)
    bound = host_port(router.host, services.router_port or router.port)
    log.info("mvtui serving on %s with %s", bound, servers_phrase(services.cluster))


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
    async with contextlib.AsyncExitStack() as stack:
        try:
            services = await stack.enter_async_context(open_core())
        except (MvtuiError, OSError) as error:  # a busy port, a folder it may not write...
            log.error("mvtui cannot start: %s", error)
            return EXIT_CANNOT_START
        for event in list(services.cluster.events):  # what happened while the core started
            log_event(event)
        services.cluster.subscribe(log_event)
        log_startup(services)
        services.keep_running(lambda: _summaries(services, summary_every), "summary")
        await stop.wait()
        in_flight = services.cluster.summary().in_flight
        log.info("stopping: no new requests; waiting for %s in flight", counted(in_flight, "request"))
    log.info("stopped")
    return 0


def serve_headless(open_core: Callable[[], AbstractAsyncContextManager[Services]]) -> int:
    """`mvtui --no-ui` from synchronous code: the core on uvloop when available."""
    factory = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        log.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
        return runner.run(run_headless(open_core))
