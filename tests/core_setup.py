"""A real core over a real config file, for the tests of reloads, edits and the operator."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

from mvtui.cluster.state import ClusterEvent
from mvtui.config.schema import Config, load_config
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services

FAST = """
[config]
health_check_interval = 0.5
metrics_interval = 0.1
fail_threshold = 2
recover_threshold = 1
"""


def save_by_rename(path: Path, text: str) -> None:
    """What vim and most editors do: write a new file, rename it over the old one."""
    temporary = path.with_name(f".{path.name}.swp")
    temporary.write_text(text)
    os.replace(temporary, path)


def on_loopback(config: Config) -> Config:
    """What --host/--port do on the command line; the admin API is not under test here."""
    router = dataclasses.replace(config.router, host="127.0.0.1", port=0)
    return dataclasses.replace(config, router=router, admin=dataclasses.replace(config.admin, enabled=False))


def scratch_paths(folder: Path) -> AppPaths:
    return AppPaths(config_dir=folder / "config", log_dir=folder / "log", state_dir=folder / "state")


@contextlib.asynccontextmanager
async def core(path: Path) -> AsyncIterator[tuple[Services, list[ClusterEvent]]]:
    paths = scratch_paths(path.parent / "mvtui")
    services = Services(on_loopback(load_config(path)), config_path=path, overrides=on_loopback, paths=paths)
    events: list[ClusterEvent] = []
    services.cluster.subscribe(events.append)
    async with services:
        yield services, events


def kinds(events: list[ClusterEvent], kind: str) -> list[ClusterEvent]:
    return [event for event in events if event.kind == kind]


def cluster_file(tmp_path: Path, *urls_and_capacities: tuple[str, int]) -> tuple[Path, str]:
    entries = "".join(
        f'    {{ url = "{url}", max_concurrent_requests = {capacity} }},  # keep this comment\n' for url, capacity in urls_and_capacities
    )
    text = f"# Operator's notes: do not lose me.\n[servers]\nservers = [\n{entries}]\n{FAST}\n# the end\n"
    path = tmp_path / "servers.toml"
    path.write_text(text)
    return path, text
