"""Entries made outside the file (the admin API, the dashboard's add dialog) get exactly the
checks a config file entry gets: they are written as TOML and parsed by the one parser."""

from __future__ import annotations

from typing import Any

import tomlkit

from mvtui.config.schema import Config, InstanceConfig, ServerConfig, parse_config
from mvtui.errors import ConfigError


class EntryError(ValueError):
    """An entry that is not valid; the message lists every problem."""


def server_entry(values: dict[str, Any]) -> ServerConfig:
    """A `[servers]` entry from its keys; values left empty (None, "", ()) are omitted."""
    given = {key: value for key, value in values.items() if value not in (None, "", ())}
    return _parsed({"servers": {"servers": [given]}}).servers[0]


def instance_entry(values: dict[str, Any]) -> InstanceConfig:
    """An `[[instances]]` entry from its keys."""
    document = tomlkit.document()
    table = tomlkit.aot()
    table.append(tomlkit.item(values))
    document["instances"] = table
    return _parsed(document).instances[0]


def _parsed(document: Any) -> Config:
    try:
        return parse_config(tomlkit.dumps(document))
    except ConfigError as error:
        raise EntryError("; ".join(f"{problem.where}: {problem.message}" for problem in error.problems)) from None
    except (TypeError, ValueError) as error:  # a value TOML cannot hold
        raise EntryError(f"not a valid entry: {error}") from None
