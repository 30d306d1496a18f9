"""SVG snapshots of the dashboard fed frozen data (no network, fixed numbers and times,
a fake pynvml). Regenerate after an intended change with `--snapshot-update`, then look
at the report before committing the new SVGs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.command import CommandList

from mvtui.ui.app import Dashboard, create_app
from tests.ui_frozen import FakeNvml, FrozenCore, break_config, fill_history, frozen_factory, frozen_services, tmp_paths


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Clock times on screen do not depend on the machine's time zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# Shown on the help screen, so fixed; nothing is written there unless `t` is pressed.
SNAPSHOT_PATHS = tmp_paths(Path("/nonexistent/mvtui-snapshots"))


def frozen_app(
    names: tuple[str, ...] = ("small", "medium", "big"), nvml: FakeNvml | None = None, setup: Callable[[FrozenCore], object] | None = None
) -> Dashboard:
    paths = SNAPSHOT_PATHS
    services = frozen_services(paths, names, nvml)
    if setup is not None:
        setup(services)
    app = create_app(frozen_factory(services), paths, user_themes=False)
    fill_history(app.history, services)  # ten minutes of numbers for the details screen's plots
    app.history.period_s = 1e9  # and no sample of the live clock after them: the plots stay put
    return app


async def settle(pilot) -> None:  # type: ignore[no-untyped-def]
    await pilot.app.settled()


def test_main_screen_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(frozen_app(), terminal_size=(80, 24), run_before=settle)


def test_main_screen_160x48(snap_compare) -> None:  # type: ignore[no-untyped-def]
    app = frozen_app(("small", "medium", "big", "spare"))
    assert snap_compare(app, terminal_size=(160, 48), run_before=settle)


def test_no_gpu_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    app = frozen_app(nvml=FakeNvml(init_error="Driver Not Loaded"))
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)


def test_help_screen(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(frozen_app(), press=["question_mark"], terminal_size=(100, 40), run_before=settle)


def test_help_screen_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    """At 80x24 the help scrolls: its top, with a scroll bar..."""
    assert snap_compare(frozen_app(), press=["question_mark"], terminal_size=(80, 24), run_before=settle)


def test_help_screen_80x24_scrolled_to_the_end(snap_compare) -> None:  # type: ignore[no-untyped-def]
    """...and its end: the state legend (removing too) and the log path are reachable."""
    assert snap_compare(frozen_app(), press=["question_mark", "end"], terminal_size=(80, 24), run_before=settle)


def test_config_error_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    """A broken config file: the banner under the top line, with the path and every problem."""
    assert snap_compare(frozen_app(setup=break_config), terminal_size=(80, 24), run_before=settle)


def test_details_screen_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(frozen_app(), press=["enter"], terminal_size=(80, 24), run_before=settle)


def test_details_screen_160x48(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(frozen_app(), press=["down", "enter"], terminal_size=(160, 48), run_before=settle)


def test_command_palette(snap_compare) -> None:  # type: ignore[no-untyped-def]
    async def search(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        await pilot.press("ctrl+p", *"sleep")
        for _ in range(200):  # the palette searches in the background
            found = pilot.app.screen.query(CommandList)
            if found and found.first().option_count == 3:
                break
            await pilot.pause(0.02)
        await pilot.pause(0.2)

    assert snap_compare(frozen_app(), terminal_size=(100, 30), run_before=search)
