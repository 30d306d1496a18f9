"""One meaning per verb: live changes last until restart and survive reloads; persisted ones
are in the file. And the file is never lost: a vanished file is not recreated by an edit,
and another writer's save in between is never overwritten."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tomlkit.toml_document import TOMLDocument

from mvtui.config.edit import set_server_value
from mvtui.config.file import apply_edit
from mvtui.config.schema import Config, ServerConfig, parse_config
from mvtui.control.live_config import LiveConfig
from mvtui.control.overlay import Overlay
from mvtui.errors import CommandError, ConfigEditError
from tests.core_setup import cluster_file, core, save_by_rename
from tests.helpers import Proc, eventually, start_sim

A, B = "http://a:1", "http://b:2"


@pytest.fixture(scope="module")
def sim() -> Iterator[Proc]:
    proc = start_sim("llama", extra=["--tokens-per-s", "200", "--ttft-ms", "5"])
    try:
        yield proc
    finally:
        proc.stop()


def test_the_overlay_changes_the_file_config_and_forgets_on_request() -> None:
    config = Config(servers=(ServerConfig(A, 4), ServerConfig(B, 2)))
    overlay = Overlay()
    overlay.set(A, "drain", True)
    overlay.set(A, "max_concurrent_requests", 9)
    overlay.removed.add(B)
    changed = overlay.apply(config)
    assert changed.servers == (ServerConfig(A, 9, drain=True),)
    overlay.forget(A, "drain")
    overlay.forget(B)
    assert overlay.apply(config).servers == (ServerConfig(A, 9), ServerConfig(B, 2))
    with pytest.raises(ValueError):
        overlay.set(A, "url", "http://elsewhere")


def test_a_live_change_is_kept_when_the_file_changes_under_it() -> None:
    live = LiveConfig(Config(servers=(ServerConfig(A, 4),)))
    live.change(lambda overlay: overlay.set(A, "drain", True))
    live.adopt(Config(servers=(ServerConfig(A, 6),)))  # the operator edited the file meanwhile
    assert live.current.servers == (ServerConfig(A, 6, drain=True),)


async def test_live_verbs_leave_the_file_alone_and_persist_writes_it(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4))
    async with core(path) as (services, _):
        operator = services.operator
        assert operator is not None
        server = services.cluster.servers[sim.url]
        outcome = await operator.drain(sim.url)
        assert outcome.saved_to is None and "until restart" in outcome.message
        await operator.set_capacity(sim.url, 7)
        assert server.drain and server.capacity == 7 and path.read_text() == text
        # a reload caused by someone else's save keeps the live changes
        edited = text.replace("max_concurrent_requests = 4 }", 'max_concurrent_requests = 4, name = "renamed" }')
        save_by_rename(path, edited)
        await eventually(lambda: server.name == "renamed")
        assert server.drain and server.capacity == 7
        saved = await operator.save(sim.url)
        assert saved.saved_to == path and "drained" in saved.message and "capacity 7" in saved.message
        assert path.read_text() == edited.replace("max_concurrent_requests = 4,", "max_concurrent_requests = 7,").replace(
            '"renamed" }', '"renamed", drain = true }'
        )
        assert services.live.overlay.changes_for(sim.url) == {}
    async with core(path) as (services, _):  # a restart: the saved state is the file's
        server = services.cluster.servers[sim.url]
        assert server.drain and server.capacity == 7


async def test_a_live_removal_lasts_until_restart(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4))
    async with core(path) as (services, _):
        assert services.operator is not None
        await services.operator.remove_server(sim.url)
        await eventually(lambda: sim.url not in services.cluster.servers)
        assert path.read_text() == text
    async with core(path) as (services, _):
        assert sim.url in services.cluster.servers


async def test_an_edit_never_recreates_a_config_file_that_was_moved_away(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4))
    text = text.replace("[servers]", '[router]\napi_keys = ["secret"]\n\n[servers]')
    path.write_text(text)
    async with core(path) as (services, _):
        assert services.operator is not None
        moved = tmp_path / "servers.toml.moved"
        os.rename(path, moved)
        await eventually(lambda: services.config_error is not None)
        with pytest.raises(CommandError, match="is gone"):
            await services.operator.add_server("http://127.0.0.1:9", max_concurrent_requests=2)
        with pytest.raises(CommandError, match="is gone"):
            await services.operator.set_capacity(sim.url, 2, persist=True)
        assert not path.exists() and moved.read_text() == text
        assert services.config.router.api_keys == ("secret",)  # the last good config stays in force


def test_a_first_edit_may_create_a_file_that_never_existed(tmp_path: Path) -> None:
    path = tmp_path / "new.toml"
    with pytest.raises(ConfigEditError, match="is gone"):
        apply_edit(path, set_server_value(A, "drain", True))
    from mvtui.config.edit import add_server

    result = apply_edit(path, add_server(ServerConfig(A, 3)), may_create=True)
    assert parse_config(path.read_text()).servers == result.config.servers == (ServerConfig(A, 3),)


def test_a_save_by_someone_else_during_an_edit_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "servers.toml"
    path.write_text(f'[servers]\nservers = [{{ url = "{A}", max_concurrent_requests = 4 }}]\n')
    theirs = f'# their save\n[servers]\nservers = [{{ url = "{A}", max_concurrent_requests = 4, name = "a" }}]\n'
    ours = set_server_value(A, "max_concurrent_requests", 8)
    calls = []

    def racing_change(document: TOMLDocument) -> None:
        if not calls:  # another writer saves while we edit our first read
            path.write_text(theirs)
        calls.append(1)
        ours(document)

    apply_edit(path, racing_change)
    final = path.read_text()
    assert len(calls) == 2, "the edit should have started over on the new content"
    assert final.startswith("# their save") and 'name = "a"' in final and "max_concurrent_requests = 8" in final
    assert parse_config(final).servers == (dataclasses.replace(ServerConfig(A, 8), name="a"),)
