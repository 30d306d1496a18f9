"""`mvtui sim`: run one simulated server until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from mvtui.sim.config import SimConfig, config_from_args
from mvtui.sim.server import SimServer


def run_sim_from_args(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"mvtui sim: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
        return runner.run(serve(config))


async def serve(config: SimConfig) -> int:
    """Serve until a signal; the exit fault ends the process on its own (os._exit)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = SimServer(config, hard_exit=True)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # signalled while still "loading weights"
        starting.cancel()
        return 0
    starting.result()
    print(f"mvtui sim: serving {config.model!r} on {server.url}", flush=True)
    await stopping
    await server.stop()
    return 0


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # the optional `fast` extra
    except ImportError:
        return None
    return uvloop.new_event_loop
