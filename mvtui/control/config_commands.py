"""Operator actions that change the config: add or remove a server, change its capacity,
a drain that survives a restart. The dashboard, the admin API and the CLI call these.

Each change is written to the config file (comments and formatting kept, see config_edit)
and brought into force at once. Without a config file (the demo) the change is made live
only, and the message says it was not saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import tomlkit

from mvtui.cluster.state import Server
from mvtui.config.edit import Change, server_values, set_server_value, unset_server_value
from mvtui.config.edit import add_server as add_server_entry
from mvtui.config.edit import remove_server as remove_server_entry
from mvtui.config.schema import Config, ServerConfig, normalize_url, parse_config
from mvtui.control.commands import drain, find_server, undrain
from mvtui.errors import CommandError, ConfigEditError, ConfigError

if TYPE_CHECKING:
    from mvtui.runtime.wiring import Services


@dataclass(frozen=True)
class ConfigChange:
    """What a command did, for the operator."""

    url: str
    name: str
    message: str
    saved_to: Path | None  # None: made live only, not written anywhere


async def add_server(
    services: "Services",
    url: str,
    *,
    max_concurrent_requests: int = 8,
    name: str = "",
    api_key: str | None = None,
    models: Sequence[str] = (),
) -> ConfigChange:
    """A new server: polled at once, given requests once it answers /health."""
    server = ServerConfig(normalize_url(url), max_concurrent_requests, name, api_key, tuple(models))
    _check(server)
    existing = services.cluster.servers.get(server.url)
    if existing is not None and not existing.removed:
        raise CommandError(f"{server.url} is already in the cluster (as {existing.name})")
    live = dataclasses.replace(services.config, servers=(*services.config.servers, server))
    return await _change(services, server.url, server.label, add_server_entry(server), live, f"added {server.url}")


async def remove_server(services: "Services", key: str) -> ConfigChange:
    """No new requests for it; those in flight finish, then it goes."""
    server = _configured(services, key)
    kept = tuple(config for config in services.config.servers if config.url != server.url)
    live = dataclasses.replace(services.config, servers=kept)
    message = f"removing {server.name}: {server.in_flight} requests in flight finish first"
    return await _change(services, server.url, server.name, remove_server_entry(server.url), live, message)


async def set_capacity(services: "Services", key: str, max_concurrent_requests: int) -> ConfigChange:
    """How many requests at once the router lets the server have (its weight in routing)."""
    server = _configured(services, key)
    if isinstance(max_concurrent_requests, bool) or not isinstance(max_concurrent_requests, int) or max_concurrent_requests < 1:
        raise CommandError(f"capacity must be a whole number of at least 1, got {max_concurrent_requests!r}")
    live = _with_server(services.config, dataclasses.replace(server.config, max_concurrent_requests=max_concurrent_requests))
    change = set_server_value(server.url, "max_concurrent_requests", max_concurrent_requests)
    message = f"{server.name}: capacity {server.capacity} -> {max_concurrent_requests}"
    return await _change(services, server.url, server.name, change, live, message)


async def set_drain(services: "Services", key: str, drained: bool) -> ConfigChange:
    """Drain (or undrain) now, and keep it so in the config file across restarts."""
    server = _configured(services, key)
    (drain if drained else undrain)(services.cluster, server.url)
    live = _with_server(services.config, dataclasses.replace(server.config, drain=drained))
    change = set_server_value(server.url, "drain", True) if drained else unset_server_value(server.url, "drain", False)
    message = f"{server.name}: {'drained' if drained else 'taking requests again'}"
    try:
        return await _change(services, server.url, server.name, change, live, message)
    except CommandError as error:
        raise CommandError(f"{message} now, but not saved: {error}") from None


def _configured(services: "Services", key: str) -> Server:
    server = find_server(services.cluster, key)
    if server.lifecycle is not None:
        raise CommandError(f"{server.name} is a managed instance: change its [[instances]] entry instead")
    if server.removed:
        raise CommandError(f"{server.name} is being removed")
    return server


def _with_server(config: Config, changed: ServerConfig) -> Config:
    servers = tuple(changed if server.url == changed.url else server for server in config.servers)
    return dataclasses.replace(config, servers=servers)


def _check(server: ServerConfig) -> None:
    """The same checks as a config file entry gets."""
    text = tomlkit.dumps({"servers": {"servers": [server_values(server)]}})
    try:
        parse_config(text)
    except ConfigError as error:
        raise CommandError("; ".join(problem.message for problem in error.problems)) from None


async def _change(services: "Services", url: str, name: str, change: Change, live: Config, message: str) -> ConfigChange:
    if services.reloader is None:
        services.apply_config(live)
        return ConfigChange(url, name, f"{message} (not saved: running without a config file)", None)
    try:
        await services.reloader.edit(change)
    except ConfigEditError as error:
        raise CommandError(str(error)) from None
    return ConfigChange(url, name, f"{message} (saved to {services.reloader.path})", services.reloader.path)
