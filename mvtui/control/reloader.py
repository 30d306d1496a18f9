"""Keeps the running config in step with the config file.

When the file changes, it is read and checked in a thread. A valid file is applied at once
(servers matched by URL keep their state); a broken one is reported with every problem and
its line and column, and the last good config stays in force until the file is fixed.

Our own edits go through `edit()`, which writes the file and applies the result in one
step; the watcher then sees a file whose content we already applied, and does nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvtui.config.edit import Change, EditResult, edit_file
from mvtui.config.schema import Config, parse_config
from mvtui.config.watch import FileWatcher
from mvtui.errors import ConfigError, Problem

if TYPE_CHECKING:
    from mvtui.runtime.wiring import Services

log = logging.getLogger(__name__)

SOURCE = "config"  # the `server` field of the cluster events we emit
WATCH_START_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class FileState:
    """One read of the config file: its digest (None when absent) and what it says."""

    digest: str | None
    config: Config | None = None
    error: ConfigError | None = None


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_state(path: Path) -> FileState:
    """Blocking: read and check the file, from one read so the digest matches the config."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return FileState(None, error=ConfigError(path, [Problem("file", "no such file (deleted, renamed, or not created yet)")]))
    except OSError as error:
        problem = Problem("file", f"cannot read it: {error.strerror or error}")
        return FileState(f"unreadable: {error}", error=ConfigError(path, [problem]))
    digest = digest_of(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return FileState(digest, error=ConfigError(path, [Problem("file", f"not UTF-8 text: {error.reason} at byte {error.start}")]))
    try:
        return FileState(digest, config=parse_config(text, path))
    except ConfigError as error:
        return FileState(digest, error=error)


class ConfigReloader:
    def __init__(self, services: "Services", path: Path) -> None:
        self.services = services
        self.path = path
        self.watcher = FileWatcher(path, self._file_changed, on_error=self._watch_failed)
        self.reloads = 0  # applied changes, for tests and the status line
        self._digest: str | None = None
        self._lock = asyncio.Lock()  # one read-or-write of the file at a time
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Watch the file, then note what it says now (it may have changed since startup):
        in this order, no change goes unseen."""
        self._task = self.services.spawn(self.watcher.run(), "config watcher")
        try:
            await asyncio.wait_for(self.watcher.ready.wait(), WATCH_START_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("watching %s is slow to start; changes may be seen late", self.path)
        async with self._lock:
            state = await asyncio.to_thread(read_state, self.path)
            self._digest = state.digest
            if state.config is not None:
                notes = self._adopt(state.config, announce_same=False)
                if notes:  # said in the log too: nobody listens to events this early
                    log.info("the config file changed while mvtui started; applied: %s", "; ".join(notes))
            elif state.digest is not None and state.error is not None:
                self._report(state.error)

    async def stop(self) -> None:
        self.watcher.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _file_changed(self) -> None:
        await self.reload()

    def _watch_failed(self, error: BaseException) -> None:
        log.warning("cannot watch %s for changes (will retry): %s", self.path, error)

    async def reload(self, *, forced: bool = False) -> list[str]:
        """Apply the file if it changed since we last read or wrote it (always when forced).
        Returns notes for the operator; a broken file's problems are reported, not raised."""
        async with self._lock:
            state = await asyncio.to_thread(read_state, self.path)
            if state.digest == self._digest and not forced:
                return []
            self._digest = state.digest
            if state.error is not None:
                self._report(state.error)
                return [str(problem) for problem in state.error.problems]
            assert state.config is not None
            return self._adopt(state.config, announce_same=forced)

    async def edit(self, change: Change) -> tuple[EditResult, list[str]]:
        """Write an edit to the file and bring it into force; the watcher will then find
        nothing new. Raises ConfigEditError (file untouched) when the edit cannot be made."""
        async with self._lock:
            result = await edit_file(self.path, change)
            self._digest = digest_of(result.text.encode("utf-8"))
            return result, self._adopt(result.config, announce_same=False)

    def _adopt(self, file_config: Config, *, announce_same: bool) -> list[str]:
        services = self.services
        was_broken = services.config_error is not None
        services.config_error = None
        new = services.overrides(file_config)
        old = services.config
        if new == old:
            if was_broken or announce_same:
                services.cluster.emit("config", SOURCE, "config file read: nothing to change")
            return []
        notes = describe_changes(old, new) + services.apply_config(new)
        self.reloads += 1
        services.cluster.emit("config", SOURCE, "applied: " + "; ".join(notes or ["settings changed"]))
        return notes

    def _report(self, error: ConfigError) -> None:
        self.services.config_error = error
        message = f"{error}\nkeeping the last good config in force until the file is fixed"
        log.warning("%s", message)
        self.services.cluster.emit("config-error", SOURCE, message)


def describe_changes(old: Config, new: Config) -> list[str]:
    """What changed, for people; what `Services.apply_config` announces itself (servers
    added, routing policy, router address, instances) is left to it."""
    notes = _server_changes(old, new)
    notes += [f"[config] {name} {before} -> {after}" for name, before, after in _differences(old.timing, new.timing)]
    if old.router.api_keys != new.router.api_keys:
        notes.append(f"router API keys changed ({len(new.router.api_keys)} now)")
    if old.admin != new.admin:
        notes.append("[admin] changed: it takes effect after a restart")
    if old.ui != new.ui:
        notes.append("[ui] changed: it takes effect when the dashboard starts again")
    return notes


def _server_changes(old: Config, new: Config) -> list[str]:
    before = {server.url: server for server in old.servers}
    after = {server.url: server for server in new.servers}
    notes = [f"removing {server.label} (requests in flight finish first)" for url, server in before.items() if url not in after]
    for url, server in after.items():
        if url in before and before[url] != server:
            changed = ", ".join(_describe_field(*difference) for difference in _differences(before[url], server))
            notes.append(f"{server.label}: {changed}")
    return notes


def _describe_field(name: str, before: Any, after: Any) -> str:
    if name == "api_key":
        return "api_key changed"
    return f"{name} {before} -> {after}"


def _differences(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    return [
        (field.name, getattr(old, field.name), getattr(new, field.name))
        for field in fields(old)
        if getattr(old, field.name) != getattr(new, field.name)
    ]
