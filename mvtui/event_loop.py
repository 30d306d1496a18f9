"""Which event loop mvtui runs on, for the dashboard and `--no-ui` alike."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

LOOP_ENV = "MVTUI_LOOP"  # "asyncio" or "uvloop"; unset: uvloop when installed
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str | None = None) -> LoopFactory | None:
    """uvloop (the optional `fast` extra) when it is installed, unless $MVTUI_LOOP=asyncio.

    uvloop cuts the router's CPU time per request by about a tenth (benchmarks/router_bench.py).
    None means asyncio's own loop.
    """
    choice = (choice if choice is not None else os.environ.get(LOOP_ENV, "")).strip().lower()
    if choice not in ("", "asyncio", "uvloop"):
        log.warning("%s=%s is not asyncio or uvloop: ignored", LOOP_ENV, choice)
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            log.warning("%s=uvloop but uvloop is not installed (pip install 'mvtui[fast]'): using asyncio", LOOP_ENV)
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory
