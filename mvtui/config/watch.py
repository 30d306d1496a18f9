"""Watch one file for changes, the way editors save it.

Editors write a temporary file and rename it over the original, so watching the file's
inode would miss the second save. We watch its folder with watchfiles and keep only the
events that name the file. A burst of changes (write, rename, chmod) reaches the callback
once; changes that arrive while the callback runs are gathered into one more call.

The watcher knows nothing of what the file means: it calls `on_change` and reports its own
failures to `on_error`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Awaitable, Callable

from watchfiles import Change, awatch

log = logging.getLogger(__name__)

OnChange = Callable[[], Awaitable[None]]
OnError = Callable[[BaseException], None]

DEBOUNCE_MS = 400  # longest a stream of changes is gathered before the callback runs
STEP_MS = 50  # quiet time that ends a burst
RETRY_AFTER_S = 1.0  # when the folder cannot be watched (gone, unreadable)


class FileWatcher:
    def __init__(
        self,
        path: Path,
        on_change: OnChange,
        *,
        on_error: OnError | None = None,
        debounce_ms: int = DEBOUNCE_MS,
        step_ms: int = STEP_MS,
    ) -> None:
        self.path = Path(os.path.abspath(path))
        self.on_change = on_change
        self.on_error = on_error
        self.debounce_ms = debounce_ms
        self.step_ms = step_ms
        self._stop = asyncio.Event()
        # set once changes are being recorded (or the folder is known to be missing):
        # a reader that starts after it will not miss a change
        self.ready = asyncio.Event()
        self.changes_seen = 0

    @property
    def targets(self) -> set[Path]:
        """The file, and what it links to when it is a symlink."""
        return {self.path, Path(os.path.realpath(self.path))}

    def folders(self) -> list[Path]:
        return sorted({target.parent for target in self.targets if target.parent.is_dir()})

    def wants(self, change: Change, changed_path: str) -> bool:
        return Path(changed_path) in self.targets

    async def run(self) -> None:
        """Watch until `stop()`; a folder that cannot be watched is retried, not fatal."""
        while not self._stop.is_set():
            folders = self.folders()
            if not folders:
                self.ready.set()
                await self._pause(RETRY_AFTER_S)
                continue
            try:
                await self._watch(folders)
            except Exception as error:  # inotify limits, a folder removed under us
                self.ready.set()
                self._report(error)
                await self._pause(RETRY_AFTER_S)

    async def _watch(self, folders: list[Path]) -> None:
        batches = awatch(
            *folders,
            watch_filter=self.wants,
            debounce=self.debounce_ms,
            step=self.step_ms,
            stop_event=self._stop,
            recursive=False,
        )
        # awatch starts recording when the loop below first steps into it, before it
        # suspends; this callback runs after that suspension.
        asyncio.get_running_loop().call_soon(self.ready.set)
        async for _changes in batches:
            self.changes_seen += 1
            try:
                await self.on_change()
            except Exception as error:  # the callback's failure must not end the watching
                self._report(error)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _report(self, error: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(error)
        else:
            log.error("watching %s: %r", self.path, error)

    def stop(self) -> None:
        """The watch thread sees this within `step_ms`; `run()` then returns."""
        self._stop.set()
