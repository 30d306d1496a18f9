"""Which event loop `mvtui --no-ui` runs on: uvloop when installed, asyncio on request or without it."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest

from mvtui.event_loop import loop_factory
from tests.helpers import free_port, start_mvtui


@pytest.fixture
def fake_uvloop(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("uvloop")
    module.new_event_loop = asyncio.new_event_loop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", module)
    return module


def test_uvloop_is_used_when_installed(fake_uvloop: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MVTUI_LOOP", raising=False)
    assert loop_factory() is fake_uvloop.new_event_loop
    assert loop_factory("uvloop") is fake_uvloop.new_event_loop


def test_mvtui_loop_asyncio_turns_uvloop_off(fake_uvloop: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVTUI_LOOP", "asyncio")
    assert loop_factory() is None
    assert loop_factory(" AsyncIO ") is None


def test_without_uvloop_asyncio_is_used(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    assert loop_factory("") is None
    assert loop_factory("uvloop") is None
    assert "uvloop is not installed" in caplog.text


def test_headless_logs_the_loop_it_runs(tmp_path, procs) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    config = tmp_path / "servers.toml"
    config.write_text("[servers]\nservers = []\n\n[admin]\nenabled = false\n")
    args = ["--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    router = start_mvtui(args, port=port, env={"MVTUI_LOOP": "asyncio"})  # answers /health: started
    procs.append(router)
    assert "event loop: asyncio" in router.log_tail()
