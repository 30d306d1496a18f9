"""The dashboard's chat screen (c) over a real core: questions go through mvtui's own router
(with its API key) to `mvtui sim` servers, the answers stream into the screen, the
conversation is kept, Esc stops an answer, and a sleeping server or a stopped instance is
woken or started first."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from textual.widgets import Input, Static

from mvtui.models.chat import Conversation
from mvtui.paths import AppPaths
from mvtui.sim.config import SimConfig
from mvtui.ui.app import create_app
from mvtui.ui.chat_screen import ChatScreen
from tests.helpers import Proc, eventually, free_port, start_sim
from tests.test_ui import MODEL, config_text, core_from_file, ready, select, server, sims
from tests.ui_frozen import frozen_factory, frozen_services, tmp_paths

KEY = "sk-dashboard-test"


@pytest.fixture
def paths(tmp_path: Path) -> AppPaths:
    return tmp_paths(tmp_path)


def transcript(screen: ChatScreen) -> list[tuple[str, str]]:
    """(role, text) of every message shown."""
    found = []
    for widget in screen.query(".chat-message").results(Static):
        role = next(name[1:] for name in widget.classes if name.startswith("-"))
        found.append((role, str(widget.content)))
    return found


async def ask(pilot, screen: ChatScreen, question: str) -> None:  # type: ignore[no-untyped-def]
    """Type the question and send it, without waiting for the screen to be idle (the Pilot's
    `press` would: not before the streamed answer is over)."""
    await pilot.press(*question)
    before = screen.answering
    await screen.query_one("#chat-input", Input).action_submit()
    await eventually(lambda: screen.answering is not before, what="the question sent")


async def answered(screen: ChatScreen, count: int) -> None:
    await eventually(lambda: len(screen.context.conversation.turns) == 2 * count and screen.answering.is_finished, what=f"answer {count}")


async def test_a_chat_streams_through_the_router_and_keeps_the_conversation(tmp_path: Path, paths: AppPaths, procs: list[Proc]) -> None:
    sim = start_sim(MODEL, extra=["--tokens-per-s", "20", "--default-max-tokens", "30"])
    procs.append(sim)
    path = tmp_path / "servers.toml"
    path.write_text(config_text([("remote", sim.url, 4)]).replace("port = 0\n", f'port = 0\napi_keys = ["{KEY}"]\n', 1))
    app = create_app(core_from_file(path, paths), paths, user_themes=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(app, 1)
        await eventually(lambda: server(app, "remote").models == (MODEL,), what="the model discovered")
        await pilot.press("c")
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        await ask(pilot, screen, "hello")
        partial = await eventually(
            lambda: screen.answer is not None and not screen.answering.is_finished and screen.answer.text, what="tokens"
        )
        await answered(screen, 1)
        first = screen.context.conversation.turns[1]["content"]
        assert first.startswith(partial) and len(first) > len(partial), "the answer came in pieces"
        assert transcript(screen)[:2] == [("user", "you  hello"), ("assistant", f"{MODEL}  {first.lstrip()}")]
        assert transcript(screen)[2][0] == "note" and "30 tokens" in transcript(screen)[2][1]

        await ask(pilot, screen, "and again")
        await answered(screen, 2)
        assert [turn["role"] for turn in screen.context.conversation.turns] == ["user", "assistant", "user", "assistant"]
        records = [record for record in app.core.cluster.request_log if record.server == "remote"]  # type: ignore[union-attr]
        assert [record.status for record in records] == [200, 200]

        await pilot.press("escape")
        assert not isinstance(app.screen, ChatScreen)
        await pilot.press("c")  # the conversation is still there
        again = app.screen
        assert isinstance(again, ChatScreen)
        assert [role for role, _ in transcript(again)] == ["user", "assistant", "user", "assistant"]
        await pilot.press("/", *"clear", "enter")
        assert again.context.conversation.turns == [] and transcript(again) == [("note", "conversation cleared")]


async def test_escape_stops_a_streaming_answer_then_closes(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL, tokens_per_s=10, default_max_tokens=200)) as (slow,):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("slow", slow.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(120, 36)) as pilot:
            await ready(app, 1)
            await eventually(lambda: server(app, "slow").models == (MODEL,), what="the model discovered")
            await pilot.press("c")
            screen = app.screen
            assert isinstance(screen, ChatScreen)
            await ask(pilot, screen, "tell me everything")
            await eventually(lambda: screen.answer is not None and len(screen.answer.text) > 5, what="a few tokens")
            await pilot.press("escape")
            await answered(screen, 1)
            assert app.screen is screen, "the first Esc only stops the answer"
            kept = screen.context.conversation.turns[1]["content"]
            assert 0 < len(kept) < 200 * 3
            assert transcript(screen)[-1][1].startswith("stopped · ")
            await eventually(lambda: server(app, "slow").in_flight == 0, what="the request over at the router")
            await pilot.press("escape")
            assert not isinstance(app.screen, ChatScreen)


async def test_a_sleeping_server_is_woken_before_the_chat(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL, enable_sleep_mode=True, wake_ms_l1=3000)) as (sleepy,):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("sleepy", sleepy.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(120, 36)) as pilot:
            services = await ready(app, 1)
            sleeping = server(app, "sleepy")
            await eventually(lambda: sleeping.models == (MODEL,), what="the model discovered")
            await services.operator.sleep("sleepy", 1)
            await pilot.press("c")
            screen = app.screen
            assert isinstance(screen, ChatScreen)
            await eventually(lambda: "waking" in str(screen.status_text()), what="the wake on the status line")
            await eventually(lambda: ("note", "sleepy: awake") in transcript(screen), what="awake")
            assert transcript(screen)[0] == ("note", "sleepy is sleeping L1: waking it first")
            await ask(pilot, screen, "hi")
            await answered(screen, 1)
            assert sleeping.sleep_level == 0


async def test_a_stopped_instance_is_started_before_the_chat(tmp_path: Path, paths: AppPaths) -> None:
    port = free_port()
    command = ", ".join(f'"{part}"' for part in (sys.executable, "-m", "mvtui", "sim", "--port", "{port}", "--model", "{served_name}"))
    instance = f"""
[[instances]]
model = "{MODEL}"
name = "local"
port = {port}
auto_start = false
startup_timeout = 30
command = [{command}]
"""
    path = tmp_path / "servers.toml"
    path.write_text(config_text([], instance).replace("servers = [\n  \n]", "servers = []"))
    app = create_app(core_from_file(path, paths), paths, user_themes=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await app.settled()
        local = server(app, "local")
        app.tick()
        assert local.state == "stopped" and app.check_action("chat", ()) is True
        await pilot.press("c")
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        assert transcript(screen)[0] == ("note", "local is stopped: starting it first")
        await ask(pilot, screen, "hi")  # asked while it starts: it waits for the start
        await answered(screen, 1)
        assert local.lifecycle == "running"
        notes = [text for role, text in transcript(screen) if role == "note"]
        assert notes[1] == f"local: running on http://127.0.0.1:{port}"


async def test_chat_is_greyed_on_a_server_without_a_model_and_listed_in_the_palette(paths: AppPaths) -> None:
    services = frozen_services(paths)
    small = services.cluster.find("small")
    assert small is not None
    small.discovered_models = ()
    app = create_app(frozen_factory(services), paths, user_themes=False)
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await app.settled()
        assert app.check_action("chat", ()) is None  # greyed
        await pilot.press("c")
        await pilot.pause()
        assert not isinstance(app.screen, ChatScreen)
        said = [(notice.title, notice.message) for notice in app._notifications]
        assert ("chat", "small lists no model yet (it has not answered /v1/models)") in said
        await select(app, pilot, "medium")
        assert app.check_action("chat", ()) is True
        texts = [command.text for command in app.palette_commands()]
        assert "chat medium" in texts and "chat small" in texts and "models: the Hugging Face cache" in texts


async def test_a_conversation_is_kept_per_model(paths: AppPaths) -> None:
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    kept = Conversation(turns=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    app.conversations["llama-3.1-8b"] = kept
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        await pilot.press("c")
        screen = app.screen
        assert isinstance(screen, ChatScreen) and screen.context.conversation is kept
        assert transcript(screen) == [("user", "you  hi"), ("assistant", "llama-3.1-8b  hello there")]


async def test_a_router_that_cannot_be_reached_is_said_and_nothing_is_kept(paths: AppPaths) -> None:
    services = frozen_services(paths)
    services.router_port = free_port()  # nothing listens there
    app = create_app(frozen_factory(services), paths, user_themes=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        await pilot.press("c")
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        await ask(pilot, screen, "anyone?")
        await eventually(lambda: screen.answering.is_finished, what="the question over")
        await pilot.pause()
        (asked, _), (role, text) = transcript(screen)
        assert asked == "user" and role == "error"
        assert text.startswith(f"cannot reach the router at http://127.0.0.1:{services.router_port}: ")
        assert screen.context.conversation.turns == []
