"""Every operator verb, in one place. The dashboard's keys, the admin API (and so the CLI)
call these; none of them changes the cluster any other way.

One rule for every front end: a drain, an undrain, a capacity change or a removal is live
at once and lasts until mvtui stops (through reloads of the file too); `persist` writes it
to the config file instead, where it survives a restart. Adding a server writes it to the
file (live only when there is no file). Sleep and wake act on the server itself; start, stop
and restart on a local instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvtui.cluster.sleep_wake import Controller
from mvtui.cluster.state import Cluster, Server
from mvtui.config.edit import Change, find_instance, set_instance, set_server_value, unset_server_value
from mvtui.config.edit import add_server as add_server_entry
from mvtui.config.edit import remove_server as remove_server_entry
from mvtui.config.entries import EntryError, instance_entry, server_entry
from mvtui.config.schema import InstanceConfig
from mvtui.control.live_config import LiveConfig
from mvtui.control.overlay import Overlay
from mvtui.control.shared import LocalOverlay, Mutation, SharedOverlay
from mvtui.errors import CommandError, ConfigEditError
from mvtui.instances.manager import InstanceManager
from mvtui.instances.record import Instance

NO_FILE = "not saved: running without a config file"


@dataclass(frozen=True)
class Outcome:
    """What a verb did, for the operator."""

    name: str
    url: str
    message: str
    saved_to: Path | None = None  # None: live only

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "message": self.message, "saved_to": str(self.saved_to) if self.saved_to else None}


class Operator:
    def __init__(
        self, cluster: Cluster, live: LiveConfig, sleep_wake: Controller, instances: InstanceManager, shared: SharedOverlay | None = None
    ) -> None:
        self.cluster = cluster
        self.live = live
        self.sleep_wake = sleep_wake
        self.instances = instances
        # Where live changes go: this process's overlay, or every replica's ([cluster] redis_url).
        self.shared: SharedOverlay = shared if shared is not None else LocalOverlay(live)

    def find(self, key: str) -> Server:
        """The one finder: by name, URL or host:port. UnknownServer lists the others."""
        return self.cluster.require(key)

    # --- drain, capacity, removal: live, or written to the file with persist ---------------

    async def drain(self, key: str, *, persist: bool = False) -> Outcome:
        """No new requests; those in flight finish (the state reads draining, then drained)."""
        return await self._set_drain(self.find(key), True, persist)

    async def undrain(self, key: str, *, persist: bool = False) -> Outcome:
        return await self._set_drain(self.find(key), False, persist)

    async def _set_drain(self, server: Server, drained: bool, persist: bool) -> Outcome:
        what = f"draining, {_requests(server.in_flight)} in flight" if drained else "taking requests again"
        said = f"{server.name}: {what}"
        if server.lifecycle is not None:  # a local instance: not a [servers] entry
            if persist:
                raise CommandError(f"{server.name} is a managed instance: its drain lasts until it stops and is not saved")
            if server.drain != drained:
                server.drain = drained
                self.cluster.emit("drain" if drained else "undrain", server, what)
            return Outcome(server.name, server.display_url, said)
        self._configured(server)
        self.shared.require()
        was = server.drain
        live: Mutation = lambda overlay: overlay.set(server.url, "drain", drained)  # noqa: E731
        if persist:
            change = set_server_value(server.url, "drain", True) if drained else unset_server_value(server.url, "drain", False)
            outcome = await self._save(server, said, change, lambda overlay: overlay.forget(server.url, "drain"), live)
        else:
            await self.shared.change(live)
            outcome = self._live(server, said)
        if was != drained:
            self.cluster.emit("drain" if drained else "undrain", server, what)
        return outcome

    async def set_capacity(self, key: str, max_concurrent_requests: int, *, persist: bool = False) -> Outcome:
        """How many requests at once the router lets the server have (its weight in routing)."""
        server = self._configured(self.find(key))
        capacity = _capacity(max_concurrent_requests)
        said = f"{server.name}: capacity {server.capacity} -> {capacity}"
        live: Mutation = lambda overlay: overlay.set(server.url, "max_concurrent_requests", capacity)  # noqa: E731
        if persist:
            change = set_server_value(server.url, "max_concurrent_requests", capacity)
            return await self._save(server, said, change, lambda overlay: overlay.forget(server.url, "max_concurrent_requests"), live)
        await self.shared.change(live)
        return self._live(server, said)

    async def remove_server(self, key: str, *, persist: bool = False) -> Outcome:
        """No new requests for it; those in flight finish, then it goes."""
        server = self._configured(self.find(key))
        waiting = (
            f"{server.in_flight} request{'s' if server.in_flight > 1 else ''} in flight finish first"
            if server.in_flight
            else "nothing in flight"
        )
        said = f"removing {server.name}: {waiting}"
        if persist and server.url in self.live.overlay.added:
            persist = False  # it was never in the file
        live: Mutation = lambda overlay: _remove(overlay, server.url)  # noqa: E731
        if persist:
            return await self._save(server, said, remove_server_entry(server.url), lambda overlay: overlay.forget(server.url), live)
        await self.shared.change(live)
        return self._live(server, said)

    async def save(self, key: str) -> Outcome:
        """Write the server's live drain and capacity to the config file."""
        server = self._configured(self.find(key))
        live = self.live.overlay.changes_for(server.url)
        if not live:
            return Outcome(server.name, server.display_url, f"{server.name}: nothing to save (the file already says this)", self.live.path)
        said = f"{server.name}: saved " + ", ".join(_describe(name, value) for name, value in live.items())

        def change(document: Any) -> None:
            for name, value in live.items():
                (set_server_value(server.url, name, value) if value is not False else unset_server_value(server.url, name, False))(document)

        return await self._save(server, said, change, lambda overlay: overlay.forget(server.url, None))

    async def add_server(
        self, url: str, *, max_concurrent_requests: int = 8, name: str = "", api_key: str | None = None, models: Sequence[str] = ()
    ) -> Outcome:
        """A new server, written to the config file: polled at once, given requests once it answers /health."""
        values = {"url": url, "max_concurrent_requests": max_concurrent_requests, "name": name, "api_key": api_key, "models": models}
        try:
            config = server_entry(values)
        except EntryError as error:
            raise CommandError(str(error)) from None
        existing = self.cluster.servers.get(config.url)
        if existing is not None and config.url in self.live.overlay.removed:
            await self.shared.change(lambda overlay: overlay.removed.discard(config.url))
            return self._live(existing, f"{existing.name} is back (it was removed until restart)")
        if existing is not None and not existing.removed:
            raise CommandError(f"{config.display_url} is already in the cluster (as {existing.name})")
        said = f"added {config.display_url}"
        if self.live.path is None:
            self.live.change(lambda overlay: overlay.added.__setitem__(config.url, config))
            return Outcome(config.label, config.display_url, f"{said} ({NO_FILE})")
        return await self._edit(config.label, config.display_url, said, add_server_entry(config), None)

    async def add_instance(self, values: Mapping[str, Any]) -> Outcome:
        """A new `[[instances]]` entry (`model` and the other keys in `values`), checked as the
        config file's entries are and appended to the file, its comments kept (live only
        when there is no file). It is not started: `start` does that."""
        config = _instance_config(values)
        if any(instance.label == config.label for instance in self.instances):
            raise CommandError(f"an instance named {config.label!r} exists already; choose another name")
        said = f"added [[instances]] {config.label} ({config.model})"
        if self.live.path is None:
            instance = self.instances.add(config, origin="api")
            return Outcome(config.label, instance.server.display_url, f"{said} ({NO_FILE})")
        notes = await self._edit_notes(_new_instance(config.label, dict(values)))
        added = next((instance for instance in self.instances if instance.label == config.label), None)
        if added is None:  # in the file, but the instances refused it (a port in use...)
            raise CommandError(f"{said} to {self.live.path}, but it could not be set up: {'; '.join(notes)}")
        return Outcome(config.label, added.server.display_url, f"{said} (saved to {self.live.path})", self.live.path)

    # --- sleep, wake, local instances ----------------------------------------------------

    async def sleep(self, key: str, level: int) -> Server:
        """Drain (bounded by drain_timeout), then `/sleep?level=N`, then confirm. In a fleet:
        drained on every replica, and only once none has anything in flight there."""
        return await self.sleep_wake.sleep(self._shared_server(key).url, level)

    async def wake(self, key: str) -> Server:
        """`/wake_up` (after a level 2 sleep also reload_weights and reset_prefix_cache)."""
        return await self.sleep_wake.wake(self._shared_server(key).url)

    def _shared_server(self, key: str) -> Server:
        """A server every replica routes to needs the fleet for sleep and wake; a local instance does not."""
        server = self.find(key)
        if server.lifecycle is None:
            self.shared.require()
        return server

    async def start(self, key: str) -> Instance:
        """Start a local instance (or join its start); CommandError carries its log's last lines."""
        return await self.instances.start(key)

    async def stop(self, key: str) -> Instance:
        """Drain a local instance, then SIGTERM its process group (SIGKILL after shutdown_timeout)."""
        return await self.instances.stop(key)

    async def restart(self, key: str) -> Instance:
        """Stop a local instance as `stop` does, then start it again with its entry's current
        settings (those changed since its start apply now); CommandError as `start`."""
        return await self.instances.restart(key)

    async def reload(self) -> list[str]:
        """Read the config file now; a broken file is reported, not raised."""
        return await self.live.reload(forced=True)

    # --- helpers ---------------------------------------------------------------------------

    def _configured(self, server: Server) -> Server:
        if server.lifecycle is not None:
            raise CommandError(f"{server.name} is a managed instance: change its [[instances]] entry instead")
        if server.removed:
            raise CommandError(f"{server.name} is being removed")
        return server

    def _live(self, server: Server, said: str) -> Outcome:
        until = "until restart" if self.live.path is not None else NO_FILE
        return Outcome(server.name, server.display_url, f"{said} ({until})")

    async def _save(self, server: Server, said: str, change: Change, settle: Any, live: Mutation | None = None) -> Outcome:
        """Write the change to the file; `settle` then drops the live change the file now
        states. In a fleet the live change stays (made on every replica): the other replicas
        read their own files."""
        if self.live.path is None:
            raise CommandError(f"{said}: cannot be saved, mvtui runs without a config file")
        if not self.shared.shared:
            return await self._edit(server.name, server.display_url, said, change, settle)
        self.shared.require()
        outcome = await self._edit(server.name, server.display_url, said, change, None)
        if live is not None:
            await self.shared.change(live)
        return outcome

    async def _edit(self, name: str, url: str, said: str, change: Change, settle: Any) -> Outcome:
        await self._edit_notes(change, settle)
        return Outcome(name, url, f"{said} (saved to {self.live.path})", self.live.path)

    async def _edit_notes(self, change: Change, settle: Any = None) -> list[str]:
        try:
            return await self.live.edit(change, settle)
        except ConfigEditError as error:
            raise CommandError(str(error)) from None


def _instance_config(values: Mapping[str, Any]) -> InstanceConfig:
    try:
        return instance_entry(dict(values))
    except EntryError as error:
        raise CommandError(str(error)) from None


def _new_instance(label: str, values: dict[str, Any]) -> Change:
    """Append an entry; one the file already has under that name is refused, not changed."""

    def change(document: Any) -> None:
        if find_instance(document, label) is not None:
            raise ConfigEditError(f"the config file has an [[instances]] entry for {label!r} already; choose another name")
        set_instance(label, values, create=True)(document)

    return change


def _requests(count: int) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def _remove(overlay: Overlay, url: str) -> None:
    overlay.added.pop(url, None)
    overlay.removed.add(url)


def _capacity(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CommandError(f"capacity must be a whole number of at least 1, got {value!r}")
    return value


def _describe(name: str, value: Any) -> str:
    if name == "drain":
        return "drained" if value else "undrained"
    return f"capacity {value}"
