"""Watch one file for changes, the way editors and Kubernetes change it.

Editors write a temporary file and rename it over the original, so watching the file's
inode would miss the second save. We watch folders with watchfiles and keep only the events
that name a path that decides what the file reads:
- the path itself (an editor's rename, a deletion);
- every symlink met while resolving it, including a link in one of its folders: a
  Kubernetes ConfigMap mounts `servers.toml -> ..data/servers.toml` and updates it by
  renaming a new `..data` link over the old one, pointing at a new timestamped folder;
- the file it resolves to (an edit behind the link);
- for any of these whose folder does not exist yet, the first missing folder on the way.

After each change the path is resolved again; when that moves the file to other folders,
the watch moves with it, and a change made while it moved is reported once it is in place.

A burst of changes (write, rename, chmod) reaches the callback once; changes that arrive
while the callback runs are gathered into one more call.

The watcher knows nothing of what the file means: it calls `on_change` and reports its own
failures to `on_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from watchfiles import Change, awatch

log = logging.getLogger(__name__)

OnChange = Callable[[], Awaitable[None]]
OnError = Callable[[BaseException], None]

DEBOUNCE_MS = 400  # longest a stream of changes is gathered before the callback runs
STEP_MS = 50  # quiet time that ends a burst
RETRY_AFTER_S = 1.0  # when no folder can be watched (gone, unreadable)
MAX_LINKS = 40  # as the kernel's limit on symlinks in one lookup: beyond it, a loop

# What a reader of the file would get: the file the path resolves to and a digest of its
# bytes; None while it cannot be read.
Signature = tuple[str, bytes] | None


@dataclass(frozen=True)
class Resolution:
    """Where the file is now: the paths whose change may change what it reads, and the
    existing folders that hold them."""

    names: frozenset[Path]
    folders: tuple[Path, ...]


def resolve(path: Path) -> Resolution:
    names = {path, *links_on_the_way(path), Path(os.path.realpath(path))}
    anchored = [nearest_existing(name) for name in names]
    return Resolution(
        names=frozenset(names | {name for _, name in anchored}),
        folders=tuple(sorted({folder for folder, _ in anchored if folder is not None})),
    )


def links_on_the_way(path: Path) -> list[Path]:
    """Each symlink the kernel follows to open `path` (absolute), in order."""
    links: list[Path] = []
    current = Path(path.anchor)
    pending = list(path.parts[1:])
    while pending and len(links) < MAX_LINKS:
        part = pending.pop(0)
        candidate = current.parent if part == ".." else current / part
        if not _is_link(candidate):
            current = candidate
            continue
        links.append(candidate)
        target = Path(os.readlink(candidate))
        if target.is_absolute():
            current = Path(target.anchor)
        pending[:0] = target.parts[1:] if target.is_absolute() else target.parts
    return links


def _is_link(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:  # a folder on the way we may not look into
        return False


def nearest_existing(name: Path) -> tuple[Path | None, Path]:
    """The closest existing folder above `name`, and the path in it that leads to `name`
    (`name` itself when its folder exists): its creation is the change to look for."""
    child = name
    while not child.parent.is_dir():
        if child.parent == child:
            return None, name
        child = child.parent
    return child.parent, child


def signature(path: Path) -> Signature:
    try:
        real = os.path.realpath(path)
        with open(real, "rb") as file:
            return real, hashlib.blake2b(file.read(), digest_size=16).digest()
    except OSError:
        return None


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
        self.resolution = resolve(self.path)
        self._seen: Signature = None  # what the file read when on_change was last called
        self._calling = asyncio.Lock()  # one on_change at a time
        self._catch_up: asyncio.Task[None] | None = None

    def wants(self, change: Change, changed_path: str) -> bool:
        return Path(changed_path) in self.resolution.names

    async def run(self) -> None:
        """Watch until `stop()`; a folder that cannot be watched is retried, not fatal."""
        self._seen = signature(self.path)
        while not self._stop.is_set():
            self.resolution = resolve(self.path)
            if not self.resolution.folders:
                self.ready.set()
                await self._pause(RETRY_AFTER_S)
                continue
            try:
                await self._watch(self.resolution)
            except Exception as error:  # inotify limits, a folder removed under us
                self.ready.set()
                self._report(error)
                await self._pause(RETRY_AFTER_S)
        if self._catch_up is not None:
            await asyncio.gather(self._catch_up, return_exceptions=True)

    async def _watch(self, watched: Resolution) -> None:
        """Until stopped, or until a change moves the file out of the folders watched."""
        batches = awatch(
            *watched.folders,
            watch_filter=self.wants,
            debounce=self.debounce_ms,
            step=self.step_ms,
            stop_event=self._stop,
            recursive=False,
        )
        # awatch starts recording when the loop below first steps into it, before it
        # suspends; this callback runs after that suspension.
        asyncio.get_running_loop().call_soon(self._recording)
        async with contextlib.aclosing(batches):
            async for _changes in batches:
                self.changes_seen += 1
                await self._changed()
                if self.resolution.folders != watched.folders:
                    return

    def _recording(self) -> None:
        """The watch is in place: report a change it may have missed while it moved."""
        self.ready.set()
        pending = self._catch_up is not None and not self._catch_up.done()
        if signature(self.path) != self._seen and not pending and not self._stop.is_set():
            self._catch_up = asyncio.get_running_loop().create_task(self._changed())

    async def _changed(self) -> None:
        async with self._calling:
            self.resolution = resolve(self.path)  # events from here on are judged by the new one
            self._seen = signature(self.path)
            try:
                await self.on_change()
            except Exception as error:  # the callback's failure must not end the watching
                self._report(error)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    def _report(self, error: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(error)
        else:
            log.error("watching %s: %r", self.path, error)

    def stop(self) -> None:
        """The watch thread sees this within `step_ms`; `run()` then returns."""
        self._stop.set()
