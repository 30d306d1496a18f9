"""The operator's live changes over the config file: kept until mvtui stops, and through
every reload, unless they are written to the file.

A drain, an undrain, a capacity or a removal made from the dashboard, the CLI or the admin
API lands here first (see `control.operator`); `persist` writes it to the file instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mvtui.config.schema import Config, ServerConfig

FIELDS = ("drain", "max_concurrent_requests")  # what a live change may set on a server


@dataclass
class Overlay:
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # url -> field -> value
    removed: set[str] = field(default_factory=set)
    added: dict[str, ServerConfig] = field(default_factory=dict)  # only without a config file

    def set(self, url: str, name: str, value: Any) -> None:
        if name not in FIELDS:
            raise ValueError(f"{name} cannot be changed live")
        self.values.setdefault(url, {})[name] = value

    def forget(self, url: str, name: str | None = None) -> None:
        """Drop a live change (all of the server's when `name` is None): the file rules again."""
        if name is None:
            self.values.pop(url, None)
            self.removed.discard(url)
            self.added.pop(url, None)
            return
        changes = self.values.get(url, {})
        changes.pop(name, None)
        if not changes:
            self.values.pop(url, None)

    def changes_for(self, url: str) -> dict[str, Any]:
        return dict(self.values.get(url, {}))

    def copy(self) -> Overlay:
        return Overlay({url: dict(values) for url, values in self.values.items()}, set(self.removed), dict(self.added))

    def entry(self, url: str) -> dict[str, Any]:
        """What is live for one server, as the replicas of a fleet share it (no `added`:
        those stay with the replica that runs without a config file)."""
        entry = self.changes_for(url)
        if url in self.removed:
            entry["removed"] = True
        return entry

    def urls(self) -> frozenset[str]:
        return frozenset({*self.values, *self.removed})

    def adopt(self, entries: dict[str, dict[str, Any]]) -> None:
        """Take the fleet's entries (URL -> `entry`) as the whole of the shared part."""
        self.values = {url: {name: entry[name] for name in FIELDS if name in entry} for url, entry in entries.items()}
        self.values = {url: values for url, values in self.values.items() if values}
        self.removed = {url for url, entry in entries.items() if entry.get("removed") is True}

    def apply(self, config: Config) -> Config:
        """The config with the live changes on top."""
        if not (self.values or self.removed or self.added):
            return config
        present = {server.url for server in config.servers}
        listed = [*config.servers, *(server for url, server in self.added.items() if url not in present)]
        servers = tuple(_changed(server, self.values.get(server.url)) for server in listed if server.url not in self.removed)
        return dataclasses.replace(config, servers=servers)


def _changed(server: ServerConfig, values: dict[str, Any] | None) -> ServerConfig:
    if values and "max_concurrent_requests" in values:
        values = {**values, "capacity_set": True}  # a capacity set live is stated, like one in the file
    return dataclasses.replace(server, **values) if values else server
