"""The dashboard driven by its keys (Textual's Pilot) over a real core: simulated vLLM
servers on 127.0.0.1, the router, the poller, real config files, a managed instance as a
real process, and the `openai` client sending requests through the router. Only NVML is
faked, at the pynvml module boundary."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import openai
import pytest
from rich.console import Console
from textual.widget import Widget

from mvtui.cluster.state import Server
from mvtui.config.schema import load_config
from mvtui.gpu import GpuProbe
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from mvtui.sim.config import SimConfig
from mvtui.sim.server import SimServer
from mvtui.ui import panels, themes
from mvtui.ui.app import Dashboard, create_app
from mvtui.ui.screens import HelpScreen, InstanceLogScreen, SleepScreen
from mvtui.ui.widgets import EventsPane, GpuPane, RequestsPane, ServerPane
from tests.helpers import eventually, free_port
from tests.ui_frozen import FakeNvml, FrozenCore, frozen_factory, frozen_services, tmp_paths, two_gpus

MODEL = "m"
FAST_TIMING = """
[config]
health_check_interval = 0.2
metrics_interval = 0.1
recover_threshold = 1
shutdown_timeout = 5
drain_timeout = 5
"""


def rendered(widget: Widget, width: int = 160) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(widget.render())
    return console.export_text()


def config_text(servers: list[tuple[str, str, int]], instances: str = "") -> str:
    entries = ",\n  ".join(f'{{ url = "{url}", name = "{name}", max_concurrent_requests = {capacity} }}' for name, url, capacity in servers)
    return f"""
[router]
host = "127.0.0.1"
port = 0

[admin]
enabled = false
{FAST_TIMING}
[servers]
servers = [
  {entries}
]
{instances}"""


@contextlib.asynccontextmanager
async def sims(*configs: SimConfig) -> AsyncIterator[list[SimServer]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(SimServer(config, dev_mode=True)) for config in configs]


def core_from_file(
    path: Path, paths: AppPaths, nvml: FakeNvml | None = None
) -> Callable[[], contextlib.AbstractAsyncContextManager[Services]]:
    @contextlib.asynccontextmanager
    async def open_core() -> AsyncIterator[Services]:
        async with Services(load_config(path), config_path=path, paths=paths, gpu=GpuProbe(nvml or FakeNvml())) as services:
            yield services

    return open_core


async def ready(app: Dashboard, count: int) -> Services:
    """The core is up and `count` servers answered their health check."""
    await app.settled()
    services = app.core
    assert services is not None
    await eventually(lambda: sum(server.is_up for server in services.cluster) == count, what=f"{count} servers up")
    app.tick()
    return services


def server(app: Dashboard, name: str) -> Server:
    found = app.core.cluster.find(name)  # type: ignore[union-attr]
    assert found is not None
    return found


def keys(app: Dashboard) -> dict[str, tuple[str, bool]]:
    """What the key bar shows: key -> (description, enabled)."""
    return {key: (description, enabled) for key, description, enabled in app.key_states()}


async def select(app: Dashboard, pilot, name: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(len(app.core.cluster)):  # type: ignore[union-attr]
        if app.selected_server is not None and app.selected_server.name == name:
            return
        await pilot.press("down")
    raise AssertionError(f"could not select {name}")


async def chat(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content


@pytest.fixture
def paths(tmp_path: Path) -> AppPaths:
    return tmp_paths(tmp_path)


# --- selection, drain -----------------------------------------------------------------------


async def test_arrows_and_jk_move_the_selection(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL), SimConfig(model=MODEL), SimConfig(model=MODEL)) as (a, b, c):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("alpha", a.url, 4), ("beta", b.url, 4), ("gamma", c.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(app, 3)
            names = []
            for key in ("down", "j", "down", "k", "up", "up"):
                await pilot.press(key)
                names.append(app.selected_server.name)  # type: ignore[union-attr]
            assert names == ["beta", "gamma", "alpha", "gamma", "beta", "alpha"]
            panes = list(app.query(ServerPane))
            assert [pane.has_class("-selected") for pane in panes] == [True, False, False]


async def test_drain_key_stops_new_requests_to_the_selected_server(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL, tokens_per_s=2000, ttft_ms=1), SimConfig(model=MODEL, tokens_per_s=2000, ttft_ms=1)) as (a, b):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("alpha", a.url, 4), ("beta", b.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30)) as pilot:
            services = await ready(app, 2)
            await select(app, pilot, "alpha")
            assert keys(app)["d"] == ("drain", True)

            await pilot.press("d")
            alpha = server(app, "alpha")
            assert alpha.drain and alpha.state == "drained"
            pane = next(pane for pane in app.query(ServerPane) if pane.server is alpha)
            assert "drained" in str(pane.border_title) and pane.has_class("-state-busy")
            assert keys(app)["d"] == ("undrain", True)
            assert any(event.kind == "drain" and event.server == "alpha" for event in app.events)

            before_a, before_b = a.stats.requests, b.stats.requests
            client = openai.AsyncOpenAI(base_url=services.router_url + "/v1", api_key="unused", max_retries=0)
            await asyncio.gather(*(chat(client) for _ in range(8)))
            await client.close()
            assert a.stats.requests == before_a, "a drained server got new requests"
            assert b.stats.requests == before_b + 8

            await pilot.press("d")
            assert not alpha.drain and alpha.state == "up"
            assert keys(app)["d"] == ("drain", True)


async def test_draining_shows_while_requests_are_in_flight(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL, tokens_per_s=20, ttft_ms=1)) as (a,):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("alpha", a.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30)) as pilot:
            services = await ready(app, 1)
            client = openai.AsyncOpenAI(base_url=services.router_url + "/v1", api_key="unused", max_retries=0)
            slow = asyncio.create_task(
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=30)
            )
            alpha = server(app, "alpha")
            await eventually(lambda: alpha.in_flight == 1, what="a request in flight")
            await pilot.press("d")
            assert alpha.state == "draining"
            assert "draining" in str(next(iter(app.query(ServerPane))).border_title)
            answer = await slow  # the request in flight finishes normally
            assert answer.choices[0].finish_reason == "length"
            await eventually(lambda: alpha.state == "drained", what="drained")
            await client.close()


# --- sleep, wake ----------------------------------------------------------------------------


async def test_sleep_key_asks_the_level_then_wake_key_wakes(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL, enable_sleep_mode=True, wake_ms_l1=50, wake_ms_l2=50), SimConfig(model=MODEL)) as (a, b):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("sleeper", a.url, 4), ("plain", b.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(app, 2)
            sleeper, plain = server(app, "sleeper"), server(app, "plain")
            await eventually(lambda: sleeper.sleep_capable is True and plain.sleep_capable is False, what="sleep mode known")
            app.tick()

            await select(app, pilot, "plain")
            assert keys(app)["s"] == ("sleep", False), "sleep must be greyed out without sleep mode"
            assert keys(app)["w"] == ("wake", False)

            await select(app, pilot, "sleeper")
            assert keys(app)["s"] == ("sleep", True)
            await pilot.press("s")
            assert isinstance(app.screen, SleepScreen)
            await pilot.press("2")
            await eventually(lambda: sleeper.sleep_level == 2, what="asleep at level 2")
            assert a.stats.sleeping and a.stats.sleep_level == 2
            app.tick()
            assert sleeper.state == "sleeping L2"
            assert "sleeping L2" in str(next(p for p in app.query(ServerPane) if p.server is sleeper).border_title)
            assert keys(app)["s"] == ("sleep", False) and keys(app)["w"] == ("wake", True)

            await pilot.press("w")
            await eventually(lambda: sleeper.sleep_level == 0 and not sleeper.waking, what="awake")
            assert not a.stats.sleeping and a.stats.wake_count == 1 and a.stats.weights_loaded


async def test_escape_in_the_sleep_question_does_nothing(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL, enable_sleep_mode=True)) as (a,):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("sleeper", a.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(app, 1)
            sleeper = server(app, "sleeper")
            await eventually(lambda: sleeper.sleep_capable is True, what="sleep mode known")
            await pilot.press("s")
            assert isinstance(app.screen, SleepScreen)
            await pilot.press("escape")
            await pilot.pause(0.3)
            assert not isinstance(app.screen, SleepScreen)
            assert sleeper.sleep_level == 0 and a.stats.sleep_count == 0


# --- managed instances: start, log, stop; GPU ownership ----------------------------------------


async def test_start_log_and_stop_keys_manage_a_local_instance(tmp_path: Path, paths: AppPaths) -> None:
    port = free_port()
    command = ", ".join(f'"{part}"' for part in (sys.executable, "-m", "mvtui", "sim", "--port", "{port}", "--model", "{served_name}"))
    instance = f"""
[[instances]]
model = "{MODEL}"
name = "local"
port = {port}
devices = [1]
auto_start = false
startup_timeout = 30
command = [{command}]
"""
    path = tmp_path / "servers.toml"
    path.write_text(config_text([], instance).replace("servers = [\n  \n]", "servers = []"))
    nvml = two_gpus()
    app = create_app(core_from_file(path, paths, nvml), paths, user_themes=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        local = server(app, "local")
        app.tick()
        assert local.state == "stopped"
        assert keys(app)["S"] == ("start", True) and keys(app)["X"] == ("stop", False) and keys(app)["l"] == ("log", False)

        await pilot.press("S")
        await eventually(lambda: local.lifecycle == "running" and local.is_up, timeout=30, what="instance running")
        app.tick()
        assert keys(app)["S"] == ("start", False) and keys(app)["X"] == ("stop", True) and keys(app)["l"] == ("log", True)

        instance = app.core.instances.for_server(local)  # type: ignore[union-attr]
        nvml.gpus[1].pids = (instance.pid,)  # the instance's process shows up on GPU 1
        await eventually(lambda: "local" in rendered(app.query_one(GpuPane)), timeout=5, what="GPU owner shown")

        await pilot.press("l")
        assert isinstance(app.screen, InstanceLogScreen)
        assert app.screen.path == instance.log_path
        await eventually(lambda: "mvtui starts" in "\n".join(app.screen.query_one("Log").lines), what="log shown")  # type: ignore[union-attr]
        await pilot.press("escape")

        await pilot.press("X")
        await eventually(lambda: local.lifecycle == "stopped", timeout=15, what="instance stopped")
        assert instance.process is None
        app.tick()
        assert keys(app)["S"] == ("start", True)


# --- reload, filter, log panes, help, theme -----------------------------------------------------


async def test_reload_key_reads_the_config_file_now(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL), SimConfig(model=MODEL)) as (a, b):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("alpha", a.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30)) as pilot:
            services = await ready(app, 1)
            assert keys(app)["r"] == ("reload", True)
            await services.reloader.stop()  # type: ignore[union-attr]  # no watcher: only the key can reload
            path.write_text(config_text([("alpha", a.url, 4), ("beta", b.url, 4)]))
            await pilot.pause(0.3)
            assert services.cluster.find("beta") is None

            await pilot.press("r")
            await eventually(lambda: services.cluster.find("beta") is not None, what="beta added by the reload")
            await eventually(lambda: any(pane.server.name == "beta" for pane in app.query(ServerPane)), what="beta's pane")
            assert services.live.reloads == 1  # type: ignore[union-attr]


async def test_reload_key_is_greyed_out_without_a_config_file(paths: AppPaths) -> None:
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    async with app.run_test(size=(100, 30)):
        await app.settled()
        assert keys(app)["r"] == ("reload", False)


async def test_filter_key_shows_only_matching_servers(paths: AppPaths) -> None:
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        assert [pane.server.name for pane in app.query(ServerPane)] == ["small", "medium", "big"]
        await pilot.press("slash", "d", "o", "w", "n")  # by state word
        await pilot.pause()
        assert [pane.server.name for pane in app.query(ServerPane)] == ["big"]
        assert app.selected_server.name == "big"  # type: ignore[union-attr]
        await pilot.press("enter")  # keeps the filter; keys act on the dashboard again
        await pilot.press("d")
        assert app.core.cluster.find("big").drain  # type: ignore[union-attr]
        await pilot.press("slash", "escape")
        await pilot.pause()
        assert [pane.server.name for pane in app.query(ServerPane)] == ["small", "medium", "big"]


async def test_requests_key_swaps_the_events_for_the_request_log(paths: AppPaths) -> None:
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.settled()
        events, requests = app.query_one(EventsPane), app.query_one(RequestsPane)
        assert events.display and not requests.display
        assert "Connection refused" in rendered(events)
        await pilot.press("R")
        assert requests.display and not events.display
        last = app.core.cluster.request_log[-1]  # type: ignore[union-attr]
        await eventually(lambda: last.model in rendered(requests), timeout=3, what="the request log drawn")
        text = rendered(requests)
        assert "status" in text and f"{last.latency:.1f} s" in text and str(last.tokens) in text
        await pilot.press("R")
        assert events.display and not requests.display


async def test_help_key_opens_and_closes_the_help(paths: AppPaths) -> None:
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    async with app.run_test(size=(100, 40)) as pilot:
        await app.settled()
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_theme_key_cycles_and_the_choice_is_remembered(paths: AppPaths) -> None:
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.settled()
        assert app.theme == "mvtui-dark"
        await pilot.press("t")
        chosen = app.theme
        assert chosen != "mvtui-dark" and chosen.startswith("mvtui-")
        await eventually(lambda: themes.read_ui_state(paths.ui_state).get("theme") == chosen, what="theme saved")
    again = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    async with again.run_test(size=(80, 24)):
        await again.settled()
        assert again.theme == chosen


async def test_a_broken_user_theme_is_a_notification_not_a_crash(paths: AppPaths) -> None:
    paths.themes_dir.mkdir(parents=True)
    (paths.themes_dir / "broken.toml").write_text('name = "broken"\nprimary = "not a colour"\n')
    (paths.themes_dir / "mine.toml").write_text('name = "mine"\nprimary = "#ff00aa"\ndark = false\n')
    app = create_app(frozen_factory(frozen_services(paths)), paths)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.settled()
        assert "mine" in app.available_themes and "broken" not in app.available_themes
        assert any("broken.toml" in str(notice.message) for notice in app._notifications)
        for _ in range(4):
            await pilot.press("t")
        seen = themes.read_ui_state(paths.ui_state)["theme"]
        assert seen in {"mvtui-dark", "mvtui-light", "mvtui-high-contrast", "mine"}


# --- the GPU pane with a fake pynvml --------------------------------------------------------------


@pytest.mark.parametrize(
    ("nvml", "expected"),
    [
        (two_gpus(), ["0 H100 80GB HBM3", "61.5/80 GiB", "87%", "64°C", "1 H100 80GB HBM3", "3.2/80 GiB", "38°C", "idle"]),
        (FakeNvml(gpus=[]), ["GPU: not available (no GPU found)"]),
        (FakeNvml(init_error="Driver Not Loaded"), ["GPU: not available (no NVIDIA driver (Driver Not Loaded))"]),
        (FakeNvml(gpus=two_gpus().gpus, count_error="Unknown Error"), ["GPU: not available (NVML error: Unknown Error)"]),
    ],
    ids=["gpus", "no-gpu", "no-driver", "nvml-error"],
)
async def test_gpu_pane(paths: AppPaths, nvml: FakeNvml, expected: list[str]) -> None:
    app = create_app(frozen_factory(frozen_services(paths, nvml=nvml)), paths, user_themes=False)
    async with app.run_test(size=(120, 30)):
        await app.settled()
        pane = app.query_one(GpuPane)
        text = rendered(pane)
        for part in expected:
            assert part in text
        assert pane.has_class("-listing") == (nvml.gpus != [] and not nvml.init_error and not nvml.count_error)
        assert app.core.cluster.summary().total == 3  # the rest of the dashboard is unaffected


async def test_gpu_readings_happen_at_most_once_a_second(paths: AppPaths) -> None:
    nvml = two_gpus()
    app = create_app(frozen_factory(frozen_services(paths, nvml=nvml)), paths, user_themes=False, refresh_per_s=4)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.settled()
        first = nvml.calls
        await pilot.pause(1.6)
        assert nvml.calls - first <= 2  # 1.6 s at one reading a second, however often the screen repaints


# --- quitting ----------------------------------------------------------------------------------


async def test_quit_key_lets_requests_in_flight_finish_then_stops_the_core(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL, tokens_per_s=25, ttft_ms=1)) as (a,):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("alpha", a.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30)) as pilot:
            services = await ready(app, 1)
            port = services.router_port
            client = openai.AsyncOpenAI(base_url=services.router_url + "/v1", api_key="unused", max_retries=0)
            slow = asyncio.create_task(
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20)
            )
            await eventually(lambda: server(app, "alpha").in_flight == 1, what="a request in flight")
            await pilot.press("q")
            assert app.stopping
            answer = await slow
            assert answer.choices[0].finish_reason == "length"
            await eventually(lambda: not app.is_running, timeout=10, what="the app exited")
            await client.close()
        assert app.return_code == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_a_core_that_cannot_start_ends_the_app_with_its_error(paths: AppPaths) -> None:
    @contextlib.asynccontextmanager
    async def broken() -> AsyncIterator[Services]:
        raise OSError("cannot listen on 127.0.0.1:8888: address already in use")
        yield  # pragma: no cover

    app = create_app(broken, paths, user_themes=False)
    async with app.run_test(size=(80, 24)):
        await eventually(lambda: not app.is_running, timeout=5, what="the app exited")
    assert app.return_code == 1
    assert "address already in use" in str(app.core_failure)


# --- panels and theme files, without an app -------------------------------------------------


def test_sparkline_scales_to_the_largest_value_and_pads_the_left() -> None:
    line = panels.sparkline([0.0, 1.0, 2.0, 4.0], 6, "#ffffff").plain
    assert line == "  ▁▃▅█"
    assert panels.sparkline([0.0, 0.0], 3, "#ffffff").plain == "   "


def test_bar_fills_in_eighths_and_says_when_unknown() -> None:
    palette = panels.Palette()
    assert panels.bar(0.5, 4, palette).plain == "██  "
    assert panels.bar(1 / 16, 2, palette).plain == "▏ "
    assert panels.bar(None, 3, palette).plain == "···"
    assert panels.bar(1.7, 3, palette).plain == "███"  # over full is full


def test_theme_file_problems_are_all_listed() -> None:
    with pytest.raises(themes.ThemeError) as raised:
        themes.theme_from_toml('primary = "blurple"\nshade = 3\ndark = "yes"\n')
    message = str(raised.value)
    assert "`name`" in message and "'blurple' is not a colour" in message and "'shade'" in message and "`dark`" in message
    with pytest.raises(themes.ThemeError, match="not valid TOML"):
        themes.theme_from_toml("name = ")


def test_every_shipped_theme_loads() -> None:
    loaded, problems = themes.load_themes(None)
    assert problems == []
    assert {"mvtui-dark", "mvtui-light", "mvtui-high-contrast"} <= {theme.name for theme in loaded}
    light = next(theme for theme in loaded if theme.name == "mvtui-light")
    assert light.dark is False and light.variables["state-up"] == "#1a7f37"


def test_palette_blends_transparent_theme_colours_onto_the_background() -> None:
    solid = themes.solid_colors({"background": "#000000", "foreground-muted": "#FFFFFF80", "state-up": "#00ff00", "text": "auto 87%"})
    assert solid["state-up"] == "#00FF00" and "text" not in solid
    assert solid["foreground-muted"] in ("#7F7F7F", "#808080")
    assert panels.Palette.from_variables(solid).up == "#00FF00"


def test_the_top_line_counts_rates_only_of_servers_being_scraped(tmp_path: Path) -> None:
    services = frozen_services(tmp_paths(tmp_path), ("small", "big", "spare"))
    summary = services.cluster.summary()
    small = server_of(services, "small")
    # "big" is down and "spare" asleep: their last rates are history, not traffic now
    assert summary.request_rate == small.stats.request_rate.latest
    assert summary.token_rate == small.stats.token_rate.latest
    big = server_of(services, "big")
    assert big.current_rates() == (0.0, 0.0) and small.current_rates()[0] > 0


def server_of(services: FrozenCore, name: str) -> Server:
    found = services.cluster.find(name)
    assert found is not None
    return found


async def test_edit_keys_are_live_and_the_save_keys_write_only_the_edited_value(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL), SimConfig(model=MODEL), SimConfig(model=MODEL)) as (a, b, c):
        path = tmp_path / "servers.toml"
        original = "# our cluster: keep this comment\n" + config_text([("alpha", a.url, 4), ("gamma", c.url, 4)])
        path.write_text(original)
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(120, 36)) as pilot:
            services = await ready(app, 2)
            await select(app, pilot, "alpha")

            await pilot.press("plus", "plus", "minus", "d")  # live, until restart: the file is left alone
            await eventually(lambda: server(app, "alpha").capacity == 5 and server(app, "alpha").drain, what="capacity 5, drained")
            await pilot.pause(0.2)
            assert path.read_text() == original

            await pilot.press("p")  # save: the live drain and capacity go into the file
            await eventually(lambda: "drain = true" in path.read_text(), what="drain saved")
            saved = original.replace("max_concurrent_requests = 4", "max_concurrent_requests = 5", 1)
            assert path.read_text().replace(", drain = true", "") == saved
            await pilot.press("D")  # undrain, and write that
            await eventually(lambda: "drain = true" not in path.read_text(), what="undrain saved")
            assert not server(app, "alpha").drain and path.read_text() == saved

            await pilot.press("a")
            await pilot.press(*b.url)
            await pilot.press("enter", "enter")  # the URL, then the capacity (8 by default)
            await eventually(lambda: services.cluster.servers.get(b.url) is not None, what="the new server")
            assert b.url in path.read_text() and "# our cluster: keep this comment" in path.read_text()
            await eventually(lambda: server(app, b.url).is_up, what="the new server up")

            await select(app, pilot, "alpha")
            await pilot.press("delete", "y")  # until restart: gone from the cluster, still in the file
            await eventually(lambda: services.cluster.servers.get(a.url) is None, what="alpha gone")
            assert a.url in path.read_text()
            await select(app, pilot, "gamma")
            await pilot.press("delete", "Y")  # and from the file
            await eventually(lambda: c.url not in path.read_text(), what="gamma removed from the file")
            await eventually(lambda: services.cluster.servers.get(c.url) is None, what="gamma gone")


async def test_an_empty_cluster_says_how_to_add_a_server(tmp_path: Path, paths: AppPaths) -> None:
    path = tmp_path / "servers.toml"
    path.write_text(config_text([]).replace("servers = [\n  \n]", "servers = []"))
    app = create_app(core_from_file(path, paths), paths, user_themes=False)
    async with app.run_test(size=(100, 30)):
        await app.settled()
        app.tick()
        hint = app.query_one("#no-servers")
        assert hint.display and str(path) in str(hint.render())


async def test_escape_in_the_add_server_question_cancels_it(paths: AppPaths) -> None:
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        before = len(app.core.cluster)  # type: ignore[union-attr]
        await pilot.press("a", "h", "escape")
        await pilot.pause()
        assert len(app.screen_stack) == 1 and len(app.core.cluster) == before  # type: ignore[union-attr]
