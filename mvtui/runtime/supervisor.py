"""Background parts kept running: a part that crashes is logged with its name, reported to
the cluster (the dashboard's events and `/health` show it), and started again after a
backoff that doubles up to a cap. A part that returns is done; one that is cancelled stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0  # a part that ran this long without crashing starts over at the first backoff


class Report(Protocol):
    """(part, what went wrong or None once it runs again); `lasting`: until it runs again."""

    def __call__(self, part: str, problem: str | None, *, lasting: bool = True) -> None: ...


class Supervisor:
    def __init__(self, report: Report, *, first_backoff: float = FIRST_BACKOFF_S, max_backoff: float = MAX_BACKOFF_S) -> None:
        self.report = report
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.tasks: list[asyncio.Task[None]] = []

    def keep_running(self, start: Callable[[], Awaitable[None]], name: str) -> asyncio.Task[None]:
        """Run `start()` now and again after every crash."""
        return self._track(asyncio.ensure_future(self._supervise(start, name)), name)

    def run_once(self, work: Awaitable[None], name: str) -> asyncio.Task[None]:
        """A one-off task: its crash is logged and reported, not restarted."""
        return self._track(asyncio.ensure_future(self._once(work, name)), name)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _track(self, task: asyncio.Task[None], name: str) -> asyncio.Task[None]:
        task.set_name(name)
        self.tasks = [*(kept for kept in self.tasks if not kept.done()), task]
        return task

    async def _supervise(self, start: Callable[[], Awaitable[None]], name: str) -> None:
        backoff = self.first_backoff
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await start()
                return
            except Exception as error:  # noqa: BLE001 - any crash of a part is reported and restarted
                if loop.time() - began >= HEALTHY_AFTER_S:
                    backoff = self.first_backoff
                log.error("%s crashed: %r; restarting in %.1f s", name, error, backoff, exc_info=error)
                self.report(name, f"crashed: {error!r}; restarting in {backoff:.1f} s")
            await asyncio.sleep(backoff)
            self.report(name, None)
            backoff = min(backoff * 2, self.max_backoff)

    async def _once(self, work: Awaitable[None], name: str) -> None:
        try:
            await work
        except Exception as error:  # noqa: BLE001 - reported, never lost
            log.error("%s failed: %r", name, error, exc_info=error)
            self.report(name, f"failed: {error!r}", lasting=False)
