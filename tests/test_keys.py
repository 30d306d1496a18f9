"""The dashboard's keys: one keymap (mvtui.keymap) from which the bindings, the footer, the
help screen and `[ui.keys]` come; rebinding; and the keys an operator reaches for (Esc,
Ctrl-C, a greyed key that says why, a help screen that scrolls)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from textual.binding import Binding
from textual.containers import VerticalScroll

from mvtui import keymap
from mvtui.cluster.state import Server
from mvtui.config.schema import ServerConfig, TimingConfig, UiConfig, load_config, parse_config
from mvtui.config.starter import example_file
from mvtui.errors import ConfigError
from mvtui.gpu import GpuProbe
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from mvtui.ui import key_reasons
from mvtui.ui.actions import ALWAYS
from mvtui.ui.app import Dashboard, create_app
from mvtui.ui.screens import ConfirmScreen, HelpScreen
from mvtui.ui.widgets import ServerPane
from tests.helpers import REPO_ROOT, eventually
from tests.ui_frozen import FakeNvml, frozen_factory, frozen_services, tmp_paths


@pytest.fixture
def paths(tmp_path: Path) -> AppPaths:
    return tmp_paths(tmp_path)


def frozen_app(paths: AppPaths, keys: str = "") -> Dashboard:
    ui = parse_config(f"[ui.keys]\n{keys}").ui if keys else UiConfig()
    return create_app(frozen_factory(frozen_services(paths, ui=ui)), paths, user_themes=False)


def footer(app: Dashboard) -> dict[str, tuple[str, bool]]:
    """What the footer shows: label -> (key, enabled)."""
    return {label: (key, enabled) for key, label, enabled in app.key_states()}


def problems_of(text: str) -> list[tuple[str, int | None, int | None, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return [(problem.where, problem.line, problem.column, problem.message) for problem in caught.value.problems]


# --- the keymap itself, without Textual ---------------------------------------------------------


def test_the_keymap_imports_neither_textual_nor_the_rest_of_mvtui() -> None:
    probe = "import json, sys, mvtui.keymap; print(json.dumps(sorted(m for m in sys.modules if m.startswith(('mvtui', 'textual')))))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["mvtui", "mvtui.keymap"]


def test_ids_are_unique_and_the_defaults_do_not_clash() -> None:
    assert len(keymap.BY_ID) == len(keymap.ACTIONS)
    assert keymap.problems({}) == []
    keys = [key for action in keymap.ACTIONS for key in action.keys]
    assert len(keys) == len(set(keys))


def test_always_available_actions_come_from_the_keymap() -> None:
    assert ALWAYS is keymap.ALWAYS
    assert {"quit", "help", "cycle_theme", "filter", "clear_filter", "select", "toggle_requests", "command_palette"} == ALWAYS


@pytest.mark.parametrize(
    ("typed", "name", "label"),
    [
        ("?", "question_mark", "?"),
        ("+", "plus", "+"),
        ("-", "minus", "-"),
        ("/", "slash", "/"),
        ("x", "x", "x"),
        ("D", "D", "D"),
        ("ctrl+/", "ctrl+slash", "ctrl+/"),
        ("delete", "delete", "del"),
        ("up", "up", "↑"),
        (",", "comma", ","),
    ],
)
def test_keys_are_named_as_textual_names_them_and_shown_short(typed: str, name: str, label: str) -> None:
    assert keymap.key_name(typed) == name
    assert keymap.key_label(name) == label


def test_a_users_map_keeps_only_what_differs_from_the_defaults() -> None:
    assert keymap.changes({"drain": "x", "help": ["?", "question_mark"], "sleep": ["z", "ctrl+s", "z"]}) == (
        ("drain", ("x",)),
        ("sleep", ("z", "ctrl+s")),
    )
    resolved = keymap.resolve(dict(keymap.changes({"drain": "x"})))
    assert resolved["drain"] == ("x",) and resolved["sleep"] == ("s",)


# --- [ui.keys] in the config file --------------------------------------------------------------------


def test_ui_keys_parse_into_the_ui_config() -> None:
    config = parse_config('[ui]\ntheme = "mvtui-light"\n\n[ui.keys]\ndrain = "x"\nsave = ["ctrl+s", "P"]\nquit = ["q", "ctrl+c"]\n')
    assert config.ui.keys == (("drain", ("x",)), ("save", ("ctrl+s", "P")))
    hash(config.ui)  # frozen all the way down
    assert parse_config('[ui]\nkeys = { help = "h" }\n').ui.keys == (("help", ("h",)),)


def test_every_ui_keys_problem_has_its_line_and_column() -> None:
    text = """[servers]
servers = [{ url = "http://a:1", drain = true }]

[ui.keys]
drian = "x"
sleep = 3
wake = []
start = "X"
help = "a b"
stop = "control+x"
"""
    found = problems_of(text)
    assert [(where, line, column) for where, line, column, _ in found] == [
        ("ui.keys.drian", 5, 1),
        ("ui.keys.sleep", 6, 1),
        ("ui.keys.wake", 7, 1),
        ("ui.keys.start", 8, 1),
        ("ui.keys.help", 9, 1),
        ("ui.keys.stop", 10, 1),
    ]
    messages = {where: message for where, _, _, message in found}
    assert "did you mean 'drain'?" in messages["ui.keys.drian"]
    assert "a key or a list of keys" in messages["ui.keys.sleep"] and "a key or a list of keys" in messages["ui.keys.wake"]
    assert messages["ui.keys.start"] == "key 'X' is already stop's (by default); rebind stop too, or choose another key"
    assert "not a key name" in messages["ui.keys.help"] and "unknown modifier 'control'" in messages["ui.keys.stop"]


def test_two_rebound_actions_on_one_key_both_say_so() -> None:
    found = problems_of('[ui.keys]\nsleep = "x"\nwake = ["w", "x"]\n')
    assert [(where, line) for where, line, _, _ in found] == [("ui.keys.sleep", 2), ("ui.keys.wake", 3)]
    assert all("bound to" in message for *_, message in found)


def test_rebinding_away_from_a_default_frees_it() -> None:
    assert parse_config('[ui.keys]\nsleep = "d"\ndrain = "x"\n').ui.keys == (("sleep", ("d",)), ("drain", ("x",)))


def test_ui_keys_must_be_a_table() -> None:
    assert problems_of("[ui]\nkeys = 3\n") == [("ui.keys", 2, 1, "expected a table, got the number 3")]


def test_the_example_lists_every_action() -> None:
    """test_config's check that the example's commented values are the defaults covers the keys."""
    text = example_file().read_text()
    assert "# [ui.keys]" in text
    assert [action.id for action in keymap.ACTIONS if f"\n# {action.id} = " not in text] == []


def test_the_readme_names_every_action() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    assert [action.id for action in keymap.ACTIONS if f"`{action.id}`" not in text] == []


# --- the dashboard: bindings, footer and help from the keymap --------------------------------------


def test_the_bindings_come_from_the_keymap() -> None:
    found = {(binding.id, binding.key, binding.action) for binding in Dashboard.BINDINGS if isinstance(binding, Binding)}
    wanted = {(action.id, ",".join(action.keys), action.action) for action in keymap.ACTIONS}
    assert found == wanted | {("drain", "d", "undrain")}


async def test_the_footer_and_the_help_come_from_the_keymap(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        assert list(footer(app)) == [action.label for action in keymap.ACTIONS if action.footer]
        await pilot.press("question_mark")
        table = app.screen.content  # type: ignore[attr-defined]
        rows = list(zip((str(cell) for cell in table.columns[0].cells), (str(cell) for cell in table.columns[1].cells), strict=True))
        assert rows[: len(keymap.ACTIONS)] == [(keymap.keys_label(action.keys), action.help) for action in keymap.ACTIONS]


async def test_a_rebound_key_acts_and_shows_everywhere(paths: AppPaths) -> None:
    app = frozen_app(paths, 'help = "h"\ndrain = ["x", "ctrl+d"]\ntheme = "T"\n')
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        shown = footer(app)
        assert shown["drain"][0] == "x" and shown["help"] == ("h", True) and shown["theme"] == ("T", True)
        await pilot.press("question_mark")
        assert not isinstance(app.screen, HelpScreen), "? was rebound to h"
        await pilot.press("h")
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.content
        keys_column = [str(cell) for cell in table.columns[0].cells]
        assert "x ctrl+d" in keys_column and "h" in keys_column and "?" not in keys_column
        await pilot.press("escape")
        before = app.theme
        await pilot.press("t")
        assert app.theme == before
        await pilot.press("T")
        assert app.theme != before


async def test_a_reload_applies_new_keys(tmp_path: Path, paths: AppPaths) -> None:
    path = tmp_path / "servers.toml"
    base = '[router]\nhost = "127.0.0.1"\nport = 0\n\n[admin]\nenabled = false\n\n[servers]\nservers = []\n'
    path.write_text(base + '\n[ui.keys]\nhelp = "h"\n')

    @contextlib.asynccontextmanager
    async def open_core() -> AsyncIterator[Services]:
        async with Services(load_config(path), config_path=path, paths=paths, gpu=GpuProbe(FakeNvml())) as services:
            yield services

    app = create_app(open_core, paths, user_themes=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        assert footer(app)["help"] == ("h", True)
        path.write_text(base + '\n[ui.keys]\nhelp = "H"\n')
        await pilot.press("r")
        await eventually(lambda: footer(app)["help"] == ("H", True), what="the new key in the footer")
        await pilot.press("h")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("H")
        assert isinstance(app.screen, HelpScreen)


async def test_the_help_screen_scrolls_to_its_last_line_at_80x24(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.settled()
        await pilot.press("question_mark")
        box = app.screen.query_one("#help-box", VerticalScroll)
        await pilot.pause()
        assert box.max_scroll_y > 0 and box.scroll_y == 0
        assert box.outer_size.height <= 24 and box.outer_size.width <= 80
        await pilot.press("end")
        await pilot.pause()
        assert box.scroll_y == box.max_scroll_y
        await pilot.press("k")
        await pilot.pause()
        assert box.scroll_y == box.max_scroll_y - 1
        await pilot.press("home")
        await pilot.pause()
        assert box.scroll_y == 0
        labels = [str(cell) for cell in app.screen.content.columns[0].cells]
        assert "log" in labels and any("removing" in label for label in labels)


async def test_escape_clears_a_kept_filter(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        await pilot.press("slash", "b", "i", "g", "enter")  # kept: the field stays, the keys are the dashboard's
        await pilot.pause()
        assert [pane.server.name for pane in app.query(ServerPane)] == ["big"] and app.focused is None
        await pilot.press("escape")
        await pilot.pause()
        assert app.filter_text == "" and not app.query_one("#filter").display
        assert [pane.server.name for pane in app.query(ServerPane)] == ["small", "medium", "big"]
        await pilot.press("slash", "s", "escape")  # while typing, too
        await pilot.pause()
        assert app.filter_text == "" and app.focused is None and len(app.query(ServerPane)) == 3


async def test_ctrl_c_quits_like_q(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.settled()
        await pilot.press("ctrl+c")
        await pilot.pause(0.2)
        assert app.stopping or not app.is_running


async def test_a_greyed_key_says_why(paths: AppPaths) -> None:
    app = frozen_app(paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        assert footer(app)["start"] == ("S", False)
        await pilot.press("S", "r")
        await pilot.pause()
        said = [(notice.title, notice.message) for notice in app._notifications]
        assert ("start", "small is not a local instance mvtui manages: start it where it runs") in said
        assert ("reload", "mvtui was started without a config file") in said


def test_greyed_reasons_follow_the_servers_state() -> None:
    server = Server(ServerConfig("http://gpu-2:8000", name="gpu-2"), TimingConfig())
    server.health.success()
    server.sleep_capable = False
    facts = key_reasons.Facts()
    assert key_reasons.why_greyed("sleep", server, facts) == "gpu-2 was started without sleep mode (vllm serve --enable-sleep-mode)"
    assert key_reasons.why_greyed("wake", server, facts) == "gpu-2 is awake"
    server.sleep_capable, server.sleep_level = True, 1
    assert key_reasons.why_greyed("sleep", server, facts) == "gpu-2 is already asleep"
    server.lifecycle = "stopped"
    assert key_reasons.why_greyed("capacity", server, facts).startswith("gpu-2 is a managed instance")
    assert key_reasons.why_greyed("sleep", None, facts) == "no server is selected"
    assert key_reasons.why_greyed("sleep", server, key_reasons.Facts(core_up=False)) == "the core is still starting"
    assert key_reasons.why_greyed("save", server, key_reasons.Facts(config_file=False)) == "mvtui was started without a config file"


async def test_remove_asks_until_restart_or_from_the_file(paths: AppPaths) -> None:
    app = frozen_app(paths)
    calls: list[tuple[str, bool]] = []

    async def remove_server(server: Server, *, persist: bool = False) -> str:
        calls.append((server.name, persist))
        return "removing"

    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        app.core_actions.remove_server = remove_server  # type: ignore[union-attr,method-assign]
        for answer in ("n", "escape", "y", "Y"):
            await pilot.press("delete")
            assert isinstance(app.screen, ConfirmScreen)
            text = str(app.screen.query_one("#confirm-box").render())
            assert "until mvtui restarts" in text and "config file" in text
            await pilot.press(answer)
            await pilot.pause()
            assert not isinstance(app.screen, ConfirmScreen)
        await eventually(lambda: calls == [("small", False), ("small", True)], what="two removals")


async def test_the_save_keys_call_the_core(paths: AppPaths) -> None:
    app = frozen_app(paths)
    calls: list[str] = []

    async def drain_save(server: Server) -> str:
        calls.append(f"drain_save {server.name}")
        return "saved"

    async def save(server: Server) -> str:
        calls.append(f"save {server.name}")
        return "saved"

    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        app.core_actions.drain_save, app.core_actions.save = drain_save, save  # type: ignore[union-attr,method-assign]
        await pilot.press("D", "p")
        await eventually(lambda: calls == ["drain_save small", "save small"], what="both saved")
