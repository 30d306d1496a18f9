"""Watches the config file and reloads the live config when it changes.

Watching starts before the first read, so no change between the two goes unseen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from mvtui.config.watch import FileWatcher
from mvtui.control.live_config import LiveConfig

log = logging.getLogger(__name__)

WATCH_START_TIMEOUT_S = 5.0
KeepRunning = Callable[[Callable[[], Awaitable[None]], str], "asyncio.Task[None]"]


class ConfigReloader:
    def __init__(self, live: LiveConfig, keep_running: KeepRunning) -> None:
        assert live.path is not None, "a reloader needs a config file"
        self.live = live
        self.path = live.path
        self.watcher = FileWatcher(live.path, self._file_changed, on_error=self._watch_failed)
        self._keep_running = keep_running
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = self._keep_running(self.watcher.run, "config watcher")
        try:
            await asyncio.wait_for(self.watcher.ready.wait(), WATCH_START_TIMEOUT_S)
        except TimeoutError:
            log.warning("watching %s is slow to start; changes may be seen late", self.path)
        await self.live.load()

    async def stop(self) -> None:
        self.watcher.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _file_changed(self) -> None:
        await self.live.reload()

    def _watch_failed(self, error: BaseException) -> None:
        log.warning("cannot watch %s for changes (will retry): %s", self.path, error)
