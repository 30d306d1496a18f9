"""The config in force: what the file says, under the command line's overrides (`--port`)
and the operator's live changes (`Overlay`).

A valid file is brought into force at once (servers matched by URL keep their state); a
broken one is reported with every problem, and the last good config stays in force until
the file is fixed. Our own edits write the file and bring the result into force in one
step, so the watcher then finds nothing new.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from mvtui.config.edit import Change
from mvtui.config.file import digest_of, edit_file, read_state
from mvtui.config.schema import Config, ServerConfig
from mvtui.control.overlay import Overlay
from mvtui.errors import ConfigEditError, ConfigError

log = logging.getLogger(__name__)

Applier = Callable[[Config, Config], list[str]]  # (old, new) -> notes for the operator
Emit = Callable[[str, str], None]  # (kind, message): a cluster event from the config


def _unchanged(config: Config) -> Config:
    return config


def _ignore(kind: str, message: str) -> None:
    pass


class LiveConfig:
    def __init__(
        self,
        file_config: Config,
        *,
        path: Path | None = None,
        overrides: Callable[[Config], Config] = _unchanged,
        emit: Emit = _ignore,
    ) -> None:
        self.path = path.absolute() if path is not None else None
        self.overrides = overrides
        self.overlay = Overlay()
        self.error: ConfigError | None = None  # the file's problems while it is broken
        self.reloads = 0  # changes brought into force from the file
        self._file_config = file_config
        self.current = self._composed()
        self._emit = emit
        self._appliers: list[Applier] = []
        self._digest: str | None = None
        self._file_existed = False
        self._lock = asyncio.Lock()  # one read-or-write of the file at a time

    def on_change(self, applier: Applier) -> None:
        """Called with (old, new) whenever the config in force changes."""
        self._appliers.append(applier)

    # --- the file ------------------------------------------------------------------------

    async def load(self) -> None:
        """Note what the file says now (it may have changed since startup) and apply it."""
        if self.path is None:
            return
        async with self._lock:
            state = await asyncio.to_thread(read_state, self.path)
            self._note_digest(state.digest)
            if state.config is not None:
                notes = self.adopt(state.config, announce_same=False)
                if notes:  # said in the log too: nobody listens to events this early
                    log.info("the config file changed while mvtui started; applied: %s", "; ".join(notes))
            elif state.digest is not None and state.error is not None:
                self._report(state.error)

    async def reload(self, *, forced: bool = False) -> list[str]:
        """Apply the file if it changed since we last read or wrote it (always when forced).
        Returns notes for the operator; a broken file's problems are reported, not raised."""
        if self.path is None:
            return ["running without a config file: nothing to reload"]
        async with self._lock:
            state = await asyncio.to_thread(read_state, self.path)
            if state.digest == self._digest and not forced:
                return []
            self._note_digest(state.digest)
            if state.error is not None:
                self._report(state.error)
                return [str(problem) for problem in state.error.problems]
            assert state.config is not None
            return self.adopt(state.config, announce_same=forced)

    async def edit(self, change: Change, settle: Callable[[Overlay], None] | None = None) -> list[str]:
        """Write a change to the file and bring it into force; `settle` then drops the live
        changes the file now states. Raises ConfigEditError (file untouched)."""
        if self.path is None:
            raise ConfigEditError("running without a config file")
        async with self._lock:
            result = await edit_file(self.path, change, may_create=not self._file_existed)
            self._note_digest(digest_of(result.text.encode("utf-8")))
            if settle is not None:
                settle(self.overlay)
            return self.adopt(result.config, announce_same=False)

    def _note_digest(self, digest: str | None) -> None:
        self._digest = digest
        self._file_existed = self._file_existed or digest is not None

    def adopt(self, file_config: Config, *, announce_same: bool = False) -> list[str]:
        """Bring a config into force as if the file said it; notes for the operator."""
        was_broken = self.error is not None
        self.error = None
        self._file_config = file_config
        notes = self._bring_into_force()
        if notes:
            self.reloads += 1
            self._emit("config", "applied: " + "; ".join(notes))
        elif was_broken or announce_same:
            self._emit("config", "config file read: nothing to change")
        return notes

    def _report(self, error: ConfigError) -> None:
        self.error = error
        message = f"{error}\nkeeping the last good config in force until the file is fixed"
        log.warning("%s", message)
        self._emit("config-error", message)

    # --- live changes --------------------------------------------------------------------

    def change(self, mutate: Callable[[Overlay], None]) -> list[str]:
        """A live change by the operator, in force at once and kept through reloads."""
        mutate(self.overlay)
        return self._bring_into_force()

    def listed_servers(self) -> tuple[ServerConfig, ...]:
        """Every server the file lists (and those added live without a file), before the
        operator's live changes: the servers a shared overlay may speak of."""
        listed = self.overrides(self._file_config).servers
        present = {server.url for server in listed}
        return (*listed, *(server for url, server in self.overlay.added.items() if url not in present))

    def _composed(self) -> Config:
        return self.overlay.apply(self.overrides(self._file_config))

    def _bring_into_force(self) -> list[str]:
        old, new = self.current, self._composed()
        if new == old:
            return []
        self.current = new
        notes = describe_changes(old, new)
        for applier in self._appliers:
            notes += applier(old, new)
        return notes or ["settings changed"]


def describe_changes(old: Config, new: Config) -> list[str]:
    """What changed, for people; what the appliers announce themselves (servers added,
    routing policy, router address, instances) is left to them."""
    notes = _server_changes(old, new)
    notes += [f"[config] {name} {before} -> {after}" for name, before, after in _differences(old.timing, new.timing)]
    if old.router.api_keys != new.router.api_keys:
        notes.append(f"router API keys changed ({len(new.router.api_keys)} now)")
    if old.admin != new.admin:
        notes.append("[admin] changed: it takes effect after a restart")
    if old.ui != new.ui:
        notes.append("[ui] changed: it takes effect when the dashboard starts again")
    if old.cluster != new.cluster:
        notes.append("[cluster] changed: it takes effect after a restart")
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
    if name == "drain":
        return "drained" if after else "undrained"
    if name == "max_concurrent_requests":
        return f"capacity {before} -> {after}"
    return f"{name} {before} -> {after}"


def _differences(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    return [
        (field.name, getattr(old, field.name), getattr(new, field.name))
        for field in fields(old)
        if getattr(old, field.name) != getattr(new, field.name)
    ]
