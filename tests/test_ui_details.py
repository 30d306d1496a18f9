"""A server's details screen (Enter, a double click), the command palette (ctrl+p) and the
mouse: each runs the same commands as the keys, over a frozen core with a real Operator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console
from textual.widgets import Button, Sparkline

from mvtui.cluster.state import Server
from mvtui.config.schema import InstanceConfig, ServerConfig
from mvtui.paths import AppPaths
from mvtui.ui import panels
from mvtui.ui.app import Dashboard, create_app
from mvtui.ui.commands import SERVER_COMMANDS
from mvtui.ui.details import DetailsScreen
from mvtui.ui.history import MetricsHistory, sample_of
from mvtui.ui.screens import SleepScreen
from mvtui.ui.widgets import ServerPane, TextPane
from tests.helpers import eventually
from tests.ui_frozen import FrozenCore, fill_history, frozen_factory, frozen_services, tmp_paths


@pytest.fixture
def paths(tmp_path: Path) -> AppPaths:
    return tmp_paths(tmp_path)


def frozen_app(paths: AppPaths, services: FrozenCore | None = None) -> Dashboard:
    return create_app(frozen_factory(services or frozen_services(paths)), paths, user_themes=False)


def server(app: Dashboard, name: str) -> Server:
    found = app.core.cluster.find(name)  # type: ignore[union-attr]
    assert found is not None
    return found


def pane_text(screen: DetailsScreen, pane_id: str, width: int = 200) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    widget = screen.query_one(pane_id)
    console.print(widget.text if isinstance(widget, TextPane) else screen.events_shown)
    return console.export_text()


def last_notice(app: Dashboard) -> str:
    shown = list(app._notifications)
    return str(shown[-1].message) if shown else ""


def entries(text: str) -> dict[str, str]:
    """`key = value` lines as a dict."""
    return dict(tuple(part.strip() for part in line.split(" = ", 1)) for line in text.splitlines() if " = " in line)  # type: ignore[misc]


async def open_details(app: Dashboard, pilot, name: str) -> DetailsScreen:  # type: ignore[no-untyped-def]
    for _ in range(len(app.core.cluster)):  # type: ignore[union-attr]
        if app.selected_server is not None and app.selected_server.name == name:
            break
        await pilot.press("down")
    await pilot.press("enter")
    screen = app.screen
    assert isinstance(screen, DetailsScreen) and screen.server.name == name
    await pilot.pause()
    return screen


# --- the details screen -----------------------------------------------------------------------------


async def test_enter_opens_the_selected_servers_details(paths: AppPaths) -> None:
    services = frozen_services(paths)
    app = frozen_app(paths, services)
    fill_history(app.history, services)
    async with app.run_test(size=(160, 48)) as pilot:
        await app.settled()
        screen = await open_details(app, pilot, "small")
        assert "small" in str(screen.query_one("#details-box").border_title)
        requests = pane_text(screen, "#details-requests")
        small = [record for record in services.cluster.request_log if record.server == "small"]
        assert f"{small[-1].latency:.1f} s" in requests and "server" not in requests.splitlines()[0]
        assert len([line for line in requests.splitlines() if "llama" in line]) == len(small)
        assert "up, serving llama-3.1-8b" in pane_text(screen, "#details-events")
        assert entries(pane_text(screen, "#details-config"))["name"] == '"small"'
        assert not screen.query_one("#details-log").display  # not a managed instance
        await pilot.press("escape")
        assert not isinstance(app.screen, DetailsScreen)


async def test_the_plots_are_textual_sparklines_over_the_kept_history(paths: AppPaths) -> None:
    services = frozen_services(paths)
    app = frozen_app(paths, services)
    fill_history(app.history, services)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.settled()
        screen = await open_details(app, pilot, "medium")
        url = server(app, "medium").url
        sparks = {spark.id: spark for spark in screen.query(Sparkline)}
        assert set(sparks) == {"spark-running", "spark-waiting", "spark-kv_percent", "spark-ttft_ms", "spark-tokens_per_s"}
        kept = app.history.values(url, "kv_percent")
        assert list(sparks["spark-kv_percent"].data or []) == kept and len(kept) >= 300  # ten minutes, a sample every 2 s
        assert "metrics over the last 10 minutes" in str(screen.query_one("#metrics-title").render())


async def test_the_last_errors_of_a_down_server(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.settled()
        screen = await open_details(app, pilot, "big")
        events = pane_text(screen, "#details-events")
        lines = [" ".join(line.split()) for line in events.splitlines()]
        assert lines[0] == "last error cannot connect: Connection refused"
        assert "00:00:02 down: cannot connect: Connection refused" in lines and "medium" not in events


async def test_the_config_entry_never_shows_secrets(paths: AppPaths) -> None:
    services = frozen_services(paths)
    secret = ServerConfig(url="http://ops:hunter2@10.0.0.20:8000", name="guarded", api_key="sk-live-123")
    services.cluster.apply([*services.config.servers, secret])
    app = frozen_app(paths, services)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.settled()
        screen = await open_details(app, pilot, "guarded")
        config = pane_text(screen, "#details-config")
        assert entries(config)["url"] == '"http://10.0.0.20:8000"' and entries(config)["api_key"] == "(set, not shown)"
        everything = config + str(screen.query_one("#details-box").border_title)
        assert "hunter2" not in everything and "sk-live-123" not in everything


async def test_an_instances_details_show_its_log_tail_and_its_entry(paths: AppPaths) -> None:
    services = frozen_services(paths)
    config = InstanceConfig(
        model="qwen",
        name="local",
        port=18123,
        env=(("HF_TOKEN", "hf_secret"), ("VLLM_LOGGING_LEVEL", "INFO")),
        extra_args=("--api-key", "sk-x"),
    )
    instance = services.operator.instances.add(config)
    instance.tail.extend(f"INFO line {index}" for index in range(30))
    app = frozen_app(paths, services)
    async with app.run_test(size=(120, 60)) as pilot:
        await app.settled()
        screen = await open_details(app, pilot, "local")
        log = pane_text(screen, "#details-log")
        assert screen.query_one("#details-log").display
        assert "INFO line 29" in log and "INFO line 10" in log and "INFO line 9\n" not in log  # its last 20 lines
        entry = pane_text(screen, "#details-config")
        assert entries(entry)["model"] == '"qwen"' and entries(entry)["port"] == "18123"
        assert "hf_secret" not in entry and "sk-x" not in entry and 'VLLM_LOGGING_LEVEL = "INFO"' in entry


async def test_the_buttons_run_the_same_commands_as_the_keys(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.settled()
        screen = await open_details(app, pilot, "small")
        small = server(app, "small")
        await pilot.click("#do-drain")
        assert small.drain and small.state == "draining"  # its 3 requests in flight finish
        assert str(screen.query_one("#do-drain", Button).label) == "undrain d"
        await pilot.click("#do-drain")
        assert not small.drain
        await pilot.press("d")  # the keymap's key works here too
        assert small.drain
        await pilot.click("#do-sleep")
        assert isinstance(app.screen, SleepScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, DetailsScreen)


async def test_a_greyed_button_says_why(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.settled()
        screen = await open_details(app, pilot, "small")
        assert screen.query_one("#do-start", Button).has_class("-greyed")
        await pilot.click("#do-start")
        assert "small is not a local instance mvtui manages" in last_notice(app)
        await pilot.click("#do-wake")
        assert last_notice(app) == "small is awake"


def test_the_history_is_bounded_and_forgets_removed_servers(tmp_path: Path) -> None:
    services = frozen_services(tmp_paths(tmp_path))
    history = MetricsHistory(window_s=60, period_s=2)
    for second in range(0, 1000, 1):
        history.sample(services.cluster, float(second))
    assert all(len(history.samples(server.url)) == 31 for server in services.cluster)  # 60 s / 2 s, and the first
    assert len(history) == 31 * len(services.cluster)
    gone = services.cluster.find("big")
    assert gone is not None
    services.cluster.forget(gone)
    history.sample(services.cluster, 2000.0)
    assert history.samples(gone.url) == []


def test_a_sample_of_a_server_that_is_down_or_asleep_runs_nothing(tmp_path: Path) -> None:
    services = frozen_services(tmp_paths(tmp_path), ("small", "big", "spare"))
    small, big, spare = (services.cluster.find(name) for name in ("small", "big", "spare"))
    assert sample_of(small, 0.0).running == 3 and sample_of(small, 0.0).kv_percent == pytest.approx(62)  # type: ignore[arg-type]
    for quiet in (big, spare):
        sample = sample_of(quiet, 0.0)  # type: ignore[arg-type]
        assert (sample.running, sample.waiting, sample.tokens_per_s) == (0.0, 0.0, 0.0)


def test_secret_arguments_are_hidden() -> None:
    assert panels.redact_args(("--api-key", "sk-1", "--port", "8000", "--hf-token=abc", "--model", "m")) == (
        "--api-key",
        "(set, not shown)",
        "--port",
        "8000",
        "--hf-token=(set, not shown)",
        "--model",
        "m",
    )


# --- the mouse -------------------------------------------------------------------------------------------


async def test_a_click_selects_a_server_and_a_double_click_opens_it(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        assert app.selected_server.name == "small"  # type: ignore[union-attr]
        big = next(pane for pane in app.query(ServerPane) if pane.server.name == "big")
        await pilot.click(big)
        assert app.selected_server.name == "big" and big.has_class("-selected")  # type: ignore[union-attr]
        medium = next(pane for pane in app.query(ServerPane) if pane.server.name == "medium")
        await pilot.double_click(medium)
        assert isinstance(app.screen, DetailsScreen) and app.screen.server.name == "medium"


# --- the command palette -----------------------------------------------------------------------------------


async def test_the_palette_lists_every_command_for_every_server(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(100, 30)):
        await app.settled()
        listed = {command.text: command for command in app.palette_commands()}
        for name in ("small", "medium", "big"):
            assert f"details {name}" in listed and f"sleep {name}" in listed and f"remove {name}" in listed
        assert "undrain medium" in listed and "drain medium" not in listed  # medium is drained
        assert listed["sleep big"].ready is False and listed["sleep big"].help == "not now: big is down"
        assert listed["sleep small"].ready and listed["drain small"].ready
        assert {"reload the config file", "help", "quit", "theme mvtui-light"} <= set(listed)
        assert listed["reload the config file"].ready is False  # no config file
        assert len([text for text in listed if text.endswith(" small")]) == len(SERVER_COMMANDS) - 1  # undrain hidden


async def test_typing_a_command_in_the_palette_runs_it(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        await pilot.press("ctrl+p")
        await pilot.press(*"drain big")
        await pilot.pause(0.5)  # the palette searches in the background
        await pilot.press("enter")
        await eventually(lambda: server(app, "big").drain, timeout=5, what="big drained")
        await pilot.press("ctrl+p", *"details small")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await eventually(lambda: isinstance(app.screen, DetailsScreen), timeout=5, what="the details screen")


async def test_a_palette_command_that_does_not_apply_says_why(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        command = next(command for command in app.palette_commands() if command.text == "wake big")
        assert command.help == "not now: big is down, not asleep"
        await command.run()
        await pilot.pause()
        assert last_notice(app) == "big is down, not asleep" and not server(app, "big").waking


async def test_the_palettes_own_commands_run_the_dashboards_actions(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        listed = {command.text: command for command in app.palette_commands()}
        await listed["theme mvtui-light"].run()
        assert app.theme == "mvtui-light"
        listed["help"].run()
        await pilot.pause()
        assert type(app.screen).__name__ == "HelpScreen"
