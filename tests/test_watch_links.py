"""Hot reload through symlinks: a Kubernetes ConfigMap's `..data` switch, and edits made to
the file a re-pointed link now names. Real files and links in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mvtui.config.schema import load_config
from mvtui.config.watch import FileWatcher
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from tests.core_setup import on_loopback
from tests.helpers import Proc, eventually, start_sim


@contextlib.asynccontextmanager
async def watching(path: Path) -> AsyncIterator[list[str]]:
    """What the file reads each time the watcher reports a change."""
    seen: list[str] = []

    async def changed() -> None:
        seen.append(path.read_text())

    watcher = FileWatcher(path, changed)
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(watcher.ready.wait(), 5)
    try:
        yield seen
    finally:
        watcher.stop()
        await asyncio.wait_for(task, 5)


class ConfigMapVolume:
    """The layout kubelet mounts: `servers.toml -> ..data/servers.toml`, `..data -> ..TIMESTAMP`,
    and an update that writes a new timestamped folder, then swaps `..data` in one rename."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()
        os.symlink(self._write_folder(text), root / "..data")
        os.symlink("..data/servers.toml", root / "servers.toml")

    @property
    def path(self) -> Path:
        return self.root / "servers.toml"

    def update(self, text: str) -> None:
        old = os.readlink(self.root / "..data")
        os.symlink(self._write_folder(text), self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")
        shutil.rmtree(self.root / old)

    def _write_folder(self, text: str) -> str:
        self.generation += 1
        name = f"..2024_01_01_00_00_0{self.generation}.{12345 + self.generation}"
        (self.root / name).mkdir()
        (self.root / name / "servers.toml").write_text(text)
        return name


def repoint(link: Path, target: str) -> None:
    """`ln -sfn` done atomically: a new link renamed over the old one."""
    fresh = link.with_name(f".{link.name}.new")
    os.symlink(target, fresh)
    os.replace(fresh, link)


async def test_a_configmap_data_switch_is_seen_every_time(tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "config", "a")
    async with watching(volume.path) as seen:
        volume.update("b")
        await eventually(lambda: "b" in seen, what="the first ..data switch seen")
        volume.update("c")  # the watch has moved on to the new timestamped folder
        await eventually(lambda: "c" in seen, what="the second ..data switch seen")
    assert seen[-1] == "c"


async def test_an_edit_behind_a_re_pointed_link_is_seen(tmp_path: Path) -> None:
    for name, text in (("a", "a"), ("b", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "servers.toml").write_text(text)
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "servers.toml"
    os.symlink("../a/servers.toml", path)
    async with watching(path) as seen:
        repoint(path, "../b/servers.toml")
        await eventually(lambda: "b" in seen, what="the re-pointed link seen")
        (tmp_path / "b" / "servers.toml").write_text("b, edited")  # in place, in the new folder
        await eventually(lambda: "b, edited" in seen, what="the edit behind the link seen")


async def test_an_edit_made_while_the_watch_moves_is_not_lost(tmp_path: Path) -> None:
    """The watch moves to the new folder once the callback for the switch has returned; an
    edit made in the new folder before that is still reported."""
    volume = ConfigMapVolume(tmp_path / "config", "a")
    seen: list[str] = []
    release = asyncio.Event()

    async def changed() -> None:
        seen.append(volume.path.read_text())
        await release.wait()  # the watch stays on the old folders meanwhile

    watcher = FileWatcher(volume.path, changed)
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(watcher.ready.wait(), 5)
    try:
        volume.update("b")
        await eventually(lambda: seen == ["b"], what="the switch seen")
        (Path(os.path.realpath(volume.path)).parent / "servers.toml").write_text("b, edited")
        release.set()
        await eventually(lambda: seen[-1] == "b, edited", what="the edit made while the watch moved")
    finally:
        watcher.stop()
        await asyncio.wait_for(task, 5)


# --- the whole core: a ConfigMap update changes what the router does --------------------------


@pytest.fixture
def sim() -> Iterator[Proc]:
    proc = start_sim("llama", extra=["--tokens-per-s", "200", "--ttft-ms", "5"])
    try:
        yield proc
    finally:
        proc.stop()


def servers_toml(url: str, capacity: int) -> str:
    return f'[servers]\nservers = [{{ url = "{url}", max_concurrent_requests = {capacity} }}]\n'


async def test_a_configmap_update_is_in_force_without_a_restart(tmp_path: Path, sim: Proc) -> None:
    volume = ConfigMapVolume(tmp_path / "config", servers_toml(sim.url, 4))
    paths = AppPaths(config_dir=tmp_path / "c", log_dir=tmp_path / "l", state_dir=tmp_path / "s")
    config = on_loopback(load_config(volume.path))
    async with Services(config, config_path=volume.path, overrides=on_loopback, paths=paths) as services:
        assert services.cluster.servers[sim.url].capacity == 4
        volume.update(servers_toml(sim.url, 9))
        await eventually(lambda: services.cluster.servers[sim.url].capacity == 9, what="capacity from the new ConfigMap")
        volume.update(servers_toml(sim.url, 2))
        await eventually(lambda: services.cluster.servers[sim.url].capacity == 2, what="capacity from the next ConfigMap")
