"""`mvtui sim`: run one simulated server until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable

from mvtui.sim.config import SimConfig, config_from_args
from mvtui.sim.server import SimServer

EXIT_CANNOT_LISTEN = 1


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
    try:
        starting.result()
    except OSError as error:
        print(f"mvtui sim: {cannot_listen(config, error)}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    print(f"mvtui sim: serving {config.model!r} on {server.url}", flush=True)
    await stopping
    await server.stop()
    return 0


def cannot_listen(config: SimConfig, error: OSError) -> str:
    """`cannot listen on 127.0.0.1:8000: address already in use; choose another port with --port`"""
    where = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    if isinstance(error, socket.gaierror):
        return f"cannot listen on {where}: {str(error.strerror).lower()}; check --host"
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    hint = "choose another port with --port" if error.errno in (errno.EADDRINUSE, errno.EACCES) else "check --host and --port"
    return f"cannot listen on {where}: {reason}; {hint}"


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # the optional `fast` extra
    except ImportError:
        return None
    return uvloop.new_event_loop
