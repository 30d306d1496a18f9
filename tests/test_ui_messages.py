"""What the dashboard tells an operator (issue 15): a broken config file in full, the admin
API's state, a top line that counts awake, asleep and down servers apart, server names
that stay apart in the request log, plurals, themes with enough contrast to read, and a
hung-up terminal (SIGHUP) that still stops the core."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from rich.console import Console
from textual.widget import Widget

from mvtui.cluster.state import ClusterEvent, ClusterSummary, RequestRecord
from mvtui.config.schema import load_config
from mvtui.gpu import GpuProbe
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from mvtui.ui import panels, themes
from mvtui.ui.app import Dashboard, create_app, run_until_stopped
from mvtui.ui.widgets import Banner, ClusterBar, RequestsPane
from tests.helpers import REPO_ROOT, eventually
from tests.ui_frozen import FakeNvml, FrozenAdmin, FrozenCore, break_config, frozen_factory, frozen_services, tmp_paths

GOOD = """
[router]
host = "127.0.0.1"
port = 0

[admin]
enabled = false

[servers]
servers = [{ url = "http://127.0.0.1:9", name = "alpha" }]
"""
BROKEN = GOOD.replace('name = "alpha" }', 'name = "alpha", max_concurrent_requests = "eight" }').replace(
    "port = 0\n", 'port = 0\npolicy = "quickest"\n'
)


@pytest.fixture
def paths(tmp_path: Path) -> AppPaths:
    return tmp_paths(tmp_path)


def text_of(widget: Widget, width: int = 200) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(widget.shown if isinstance(widget, Banner) else widget.render())
    return console.export_text()


def notices(app: Dashboard) -> list[tuple[str, str, str]]:
    return [(notice.title, notice.severity, notice.message) for notice in app._notifications]


def frozen_app(paths: AppPaths, services: FrozenCore | None = None, **options: object) -> Dashboard:
    return create_app(frozen_factory(services or frozen_services(paths)), paths, user_themes=False, **options)  # type: ignore[arg-type]


# --- a broken config file: a banner with every problem, a notification, cleared when fixed -------


async def test_a_broken_config_file_is_shown_in_full_until_it_is_fixed(tmp_path: Path, paths: AppPaths) -> None:
    path = tmp_path / "servers.toml"
    path.write_text(GOOD)

    @contextlib.asynccontextmanager
    async def open_core() -> AsyncIterator[Services]:
        async with Services(load_config(path), config_path=path, paths=paths, gpu=GpuProbe(FakeNvml())) as services:
            yield services

    app = create_app(open_core, paths, user_themes=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.settled()
        banner = app.query_one(Banner)
        assert not banner.display
        path.write_text(BROKEN)
        await pilot.press("r")
        await eventually(lambda: banner.display, what="the banner")
        shown = " ".join(text_of(banner, 78).split())  # wrapped at 80 columns: every word is there
        assert str(path) in shown and "2 problems" in shown
        assert "router.policy: must be one of fastest, balanced" in shown and "got 'quickest'" in shown
        assert "max_concurrent_requests: expected an integer, got the string 'eight'" in shown
        title, severity, message = notices(app)[-1]
        assert (title, severity) == ("config file broken", "error")
        assert message == f"{path}: 2 problems, each in full under the top line. The last good config stays in force."
        assert [title for title, _, _ in notices(app)].count("reload") == 0  # told once, not twice
        await pilot.press("r")  # the same broken file again
        await eventually(lambda: notices(app)[-1][0] == "reload", what="the reload's answer")
        assert notices(app)[-1][1:] == ("warning", "the config file still has 2 problems, each under the top line")

        path.write_text(GOOD)
        await pilot.press("r")
        await eventually(lambda: not banner.display, what="the banner gone")
        assert notices(app)[-1][:2] == ("config file fixed", "information")


def test_the_events_pane_shows_a_config_error_on_one_line(paths: AppPaths) -> None:
    services = frozen_services(paths)
    break_config(services)
    text = Console(width=120, record=True, file=open(os.devnull, "w"))
    text.print(panels.events_text(services.cluster.events, 10, 118, panels.Palette()))
    lines = text.export_text().splitlines()
    assert len(lines) == len(services.cluster.events)
    assert "config" in lines[-1] and "3 problems in the config; line 2, column 1: router." in lines[-1]


async def test_the_banner_wraps_every_problem_at_80_columns(paths: AppPaths) -> None:
    services = frozen_services(paths)
    error = break_config(services)
    app = frozen_app(paths, services)
    async with app.run_test(size=(80, 24)):
        await app.settled()
        banner = app.query_one(Banner)
        lines = text_of(banner, banner.content_size.width).splitlines()
        assert banner.display and all(len(line.rstrip()) <= 78 for line in lines)
        joined = " ".join(" ".join(lines).split())
        for problem in error.problems:
            assert " ".join(str(problem).split()) in joined


# --- the admin API's state ---------------------------------------------------------------------


async def test_an_admin_api_that_is_off_is_a_lasting_warning(paths: AppPaths) -> None:
    services = frozen_services(paths)
    services.admin = FrozenAdmin(problem="cannot listen on 127.0.0.1:8889: address already in use")
    app = frozen_app(paths, services)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        assert notices(app) == [("admin API", "warning", "admin API off: cannot listen on 127.0.0.1:8889: address already in use")]
        banner = app.query_one(Banner)
        assert "admin API off: cannot listen on 127.0.0.1:8889" in text_of(banner)
        await pilot.pause(0.6)  # ticks later: still shown, told once
        assert banner.display and len(notices(app)) == 1


async def test_an_admin_api_on_another_port_is_an_information(paths: AppPaths) -> None:
    services = frozen_services(paths)
    services.admin = FrozenAdmin(
        url="http://127.0.0.1:40123", notice="admin port 8889 is taken; the admin API listens on port 40123 instead"
    )
    app = frozen_app(paths, services)
    async with app.run_test(size=(100, 30)):
        await app.settled()
        title, severity, message = notices(app)[0]
        assert (title, severity) == ("admin API", "information")
        assert message == "admin API on http://127.0.0.1:40123 (admin port 8889 is taken; the admin API listens on port 40123 instead)"
        assert not app.query_one(Banner).display


# --- the top line ----------------------------------------------------------------------------------


async def test_the_top_line_counts_awake_asleep_and_down_apart(paths: AppPaths) -> None:
    services = frozen_services(paths, ("small", "medium", "big", "spare"))  # spare sleeps, big is down
    app = frozen_app(paths, services)
    async with app.run_test(size=(160, 30)):
        await app.settled()
        line = text_of(app.query_one(ClusterBar))
        assert "2 up · 1 asleep · 1 down" in line and "3 errors" in line and "0 retries" in line
    assert panels.server_counts(services.cluster) == {"up": 2, "asleep": 1, "down": 1}


def test_the_narrow_top_line_leaves_out_groups_with_none() -> None:
    summary = ClusterSummary(up=3, total=3, request_rate=1.0, token_rate=2.0, errors=1, retries=1, in_flight=1)
    wide = panels.cluster_line(summary, None, panels.Palette(), 150, counts={"up": 3, "asleep": 0, "down": 0}).plain
    narrow = panels.cluster_line(summary, None, panels.Palette(), 78, counts={"up": 3, "asleep": 0, "down": 0}).plain
    assert "3 up · 0 asleep · 0 down" in wide and "1 error " in wide and "1 retry " in wide and "1 in flight" in wide
    assert "3 up  " in narrow and "asleep" not in narrow and "1 retry" in narrow


def test_plurals() -> None:
    assert [panels.plural(count, "server") for count in (0, 1, 2)] == ["0 servers", "1 server", "2 servers"]
    assert [panels.plural(count, "retry") for count in (1, 2)] == ["1 retry", "2 retries"]
    assert panels.plural(1, "problem") == "1 problem" and panels.plural(1, "process") == "1 process"


def test_no_count_in_the_dashboard_is_written_with_a_fixed_plural() -> None:
    """`f"{n} requests"` is wrong for one: the dashboard's counts go through `plural`."""
    fixed = re.compile(r"\{[a-z_.()\[\] ]+\} (requests|servers|errors|retries|problems|events|instances|processes)\b")
    found = [
        f"{path.name}: {line.strip()}"
        for path in (REPO_ROOT / "mvtui" / "ui").glob("*.py")
        for line in path.read_text().splitlines()
        if fixed.search(line)
    ]
    assert found == []


# --- server names in the request log -------------------------------------------------------------------


def test_names_cut_to_fit_keep_the_part_that_tells_them_apart() -> None:
    assert panels.distinct_labels(["127.0.0.1:31234", "127.0.0.1:31235", "router"], 12) == {
        "127.0.0.1:31234": "…0.0.1:31234",
        "127.0.0.1:31235": "…0.0.1:31235",
        "router": "router",
    }
    assert panels.distinct_labels(["gpu-node-1.lan:8000", "gpu-node-2.lan:8000"], 12) == {
        "gpu-node-1.lan:8000": "gpu-node-1.…",
        "gpu-node-2.lan:8000": "gpu-node-2.…",
    }
    assert panels.distinct_labels(["short"], 12) == {"short": "short"}


async def test_the_request_log_tells_servers_on_one_host_apart(paths: AppPaths) -> None:
    services = frozen_services(paths)
    services.cluster.request_log.clear()
    for index, port in enumerate((31234, 31235, 31236) * 3):
        services.cluster.record(
            RequestRecord(
                1000.0 + index,
                "POST",
                "/v1/chat/completions",
                "meta-llama/Llama-3.1-8B-Instruct",
                f"127.0.0.1:{port}",
                200,
                1.0,
                0.1,
                10,
                0,
            )
        )
    app = frozen_app(paths, services)
    async with app.run_test(size=(80, 30)) as pilot:
        await app.settled()
        await pilot.press("R")
        pane = app.query_one(RequestsPane)
        await eventually(lambda: "31236" in text_of(pane), timeout=3, what="the request log")
        text = text_of(pane)
        assert all(str(port) in text for port in (31234, 31235, 31236))


def test_the_server_column_is_as_wide_as_the_names_where_the_models_leave_room() -> None:
    records = [RequestRecord(0.0, "POST", "/v1/x", "m", name, 200, 1.0, None, None, 0) for name in ("gpu-node-17.cluster.local:8000", "b")]
    text = panels.requests_table(records, 5, 100, panels.Palette()).plain
    assert "gpu-node-17.cluster.local:8000" in text


# --- themes: contrast -------------------------------------------------------------------------------


def test_contrast_ratio_is_wcags() -> None:
    assert themes.contrast_ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert themes.contrast_ratio("#ffffff", "#ffffff") == pytest.approx(1.0)
    assert themes.contrast_ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)
    assert themes.contrast_ratio("#ffffff80", "#000000") == themes.contrast_ratio("#808080", "#000000")


SHIPPED = {theme.name: theme for theme in themes.load_themes(None)[0]}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_theme_has_enough_contrast(name: str) -> None:
    """Text 4.5:1 on every background; borders, state colours, gauges, sparklines and greyed
    keys 3:1; a greyed key clearly dimmer than an enabled one."""
    variables = themes.theme_variables(SHIPPED[name])
    assert themes.contrast_problems(variables) == []
    enabled = themes.contrast_ratio(variables["foreground"], variables["panel"])
    assert enabled >= 1.5 * themes.contrast_ratio(variables["key-disabled"], variables["panel"])


def test_the_light_themes_pane_borders_are_visible() -> None:
    variables = themes.theme_variables(SHIPPED["mvtui-light"])
    assert themes.contrast_ratio(variables["pane-border"], variables["surface"]) >= 3.0
    assert themes.contrast_ratio(variables["panel-lighten-2"], variables["surface"]) < 1.1  # what the borders were


def test_a_low_contrast_theme_is_caught() -> None:
    pale = themes.theme_from_toml('name = "pale"\nprimary = "#888888"\nforeground = "#bbbbbb"\nbackground = "#cccccc"\ndark = false\n')
    problems = themes.contrast_problems(themes.theme_variables(pale))
    assert any(problem.startswith("foreground on background") for problem in problems)


async def test_the_dashboards_css_sees_the_same_variables(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(80, 24)):
        await app.settled()
        for name in SHIPPED:
            app.theme = name
            seen = app.get_css_variables()
            expected = themes.theme_variables(SHIPPED[name])
            assert {key: seen[key] for key in ("pane-border", "key-disabled", "foreground", "surface")} == {
                key: expected[key] for key in ("pane-border", "key-disabled", "foreground", "surface")
            }


# --- SIGHUP -------------------------------------------------------------------------------------------


def watched_factory(services: FrozenCore, stopped: list[str]) -> Callable[[], contextlib.AbstractAsyncContextManager[FrozenCore]]:
    @contextlib.asynccontextmanager
    async def open_core() -> AsyncIterator[FrozenCore]:
        try:
            yield services
        finally:
            stopped.append("core stopped")

    return open_core


async def test_sighup_stops_the_core_and_ends_the_app(paths: AppPaths) -> None:
    stopped: list[str] = []
    app = create_app(watched_factory(frozen_services(paths), stopped), paths, user_themes=False, handle_signals=True)
    async with app.run_test(size=(80, 24)):
        await app.settled()
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: not app.is_running, timeout=5, what="the app ended")
    assert stopped == ["core stopped"] and app.return_code == 0
    assert asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP) is False  # gone with the app


async def test_the_core_stops_even_when_the_terminal_writes_fail(paths: AppPaths) -> None:
    """Once the terminal is gone Textual's writes fail; the way out still stops the core."""
    stopped: list[str] = []
    app = create_app(watched_factory(frozen_services(paths), stopped), paths, user_themes=False, handle_signals=True)
    running = asyncio.create_task(run_until_stopped(app, headless=True, size=(80, 24)))
    await asyncio.wait_for(app.core_ready.wait(), 10)

    def broken_write(data: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    app._driver.write = broken_write  # type: ignore[method-assign, union-attr]
    app.hang_up()
    app.refresh(layout=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(running, 15)
    assert stopped == ["core stopped"]


def test_events_keep_their_order_when_one_has_many_lines() -> None:
    events = [ClusterEvent("config-error", "config", "a\n  - b\n  - c", at=0.0), ClusterEvent("up", "x", "up", at=1.0)]
    plain = panels.events_text(events, 5, 80, panels.Palette()).plain.splitlines()
    assert len(plain) == 2 and "a; b; c" in plain[0]
