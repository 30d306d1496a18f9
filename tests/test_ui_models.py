"""The dashboard's Models screen (M) and its instance form, over a real core and a Hugging Face
cache laid out on disk in tmp_path (HF_HUB_CACHE points there); a new instance is started
for real, `vllm` being a stand-in on PATH that runs `mvtui sim`. Only NVML is faked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import tomlkit
from textual.widgets import DataTable, Input

from mvtui.config.schema import InstanceConfig
from mvtui.errors import CommandError
from mvtui.models.cache import CacheListing, scan_models
from mvtui.paths import AppPaths
from mvtui.ui.app import Dashboard, create_app
from mvtui.ui.models_screen import InstanceForm, ModelsScreen, parse_devices, parse_share, suggested_name
from tests.helpers import REPO_ROOT, eventually
from tests.hf_cache import CHAT_CONFIG, EMBED_CONFIG, CachedRepo, build_cache
from tests.test_ui import FAST_TIMING, core_from_file
from tests.ui_frozen import FROZEN_AT, frozen_factory, frozen_services, tmp_paths, two_gpus

CHAT = CachedRepo("acme/tiny-chat", CHAT_CONFIG, {"model.safetensors": 3 * 1024**3, "tokenizer.json": 2048})
EMBED = CachedRepo("acme/tiny-embed", EMBED_CONFIG, {"modules.json": 64, "model.safetensors": 90 * 1024**2})
CONFIG = f"""# mvtui config for the Models screen test: this comment stays
[router]
host = "127.0.0.1"
port = 0

[admin]
enabled = false
{FAST_TIMING}
[servers]
servers = []

# the chat model, started by hand
[[instances]]
name = "chat"
model = "acme/tiny-chat"
auto_start = false  # keep it stopped
"""
# `vllm serve MODEL ... --port P --served-model-name S ...` as a simulated server
FAKE_VLLM = """#!{python}
import os, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
sim = ["-m", "mvtui", "sim", "--port", value("--port"), "--model", value("--served-model-name")]
os.execv(sys.executable, [sys.executable, *sim])
"""


@pytest.fixture
def paths(tmp_path: Path) -> AppPaths:
    return tmp_paths(tmp_path)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with a chat and an embedding model, where huggingface_hub looks for it."""
    from huggingface_hub import constants

    folder = build_cache(tmp_path / "hf-hub", [CHAT, EMBED], modified=FROZEN_AT)
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))  # read when it was first imported
    return folder


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`vllm` on PATH for the instances the core starts (their environment is ours)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "vllm"
    script.write_text(FAKE_VLLM.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    yield script


def rows(app: Dashboard) -> dict[str, list[str]]:
    table = app.screen.query_one(DataTable)
    return {str(key.value): [str(cell) for cell in table.get_row(key)] for key in table.rows}


async def open_models(app: Dashboard, pilot, count: int) -> ModelsScreen:  # type: ignore[no-untyped-def]
    await pilot.press("M")
    screen = app.screen
    assert isinstance(screen, ModelsScreen)
    await eventually(lambda: len(rows(app)) == count, what=f"{count} models listed")
    return screen


# --- the screen ---------------------------------------------------------------------------------


async def test_the_models_screen_lists_the_cache_with_the_instances_using_each(tmp_path: Path, paths: AppPaths, hf_cache: Path) -> None:
    path = tmp_path / "servers.toml"
    path.write_text(CONFIG)
    app = create_app(core_from_file(path, paths), paths, user_themes=False)
    async with app.run_test(size=(140, 30)) as pilot:
        await app.settled()
        screen = await open_models(app, pilot, 2)
        day = datetime.fromtimestamp(FROZEN_AT).strftime("%Y-%m-%d")
        assert rows(app) == {
            "acme/tiny-chat": ["acme/tiny-chat", "generation", "3.0 GiB", CHAT.commit[:12], day, "chat ○ stopped"],
            "acme/tiny-embed": ["acme/tiny-embed", "embedding", "90.0 MiB", EMBED.commit[:12], day, "-"],
        }
        assert str(screen.query_one("#models-head").content) == f"cache: {hf_cache}"
        assert str(screen.query_one("#models-summary").content) == "2 models, 3.1 GiB"
        await pilot.press("escape")
        assert not isinstance(app.screen, ModelsScreen)


async def test_an_empty_or_missing_cache_says_how_to_fill_it(paths: AppPaths, tmp_path: Path) -> None:
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    app.scan_models = lambda: scan_models(tmp_path / "nowhere")
    async with app.run_test(size=(120, 30)) as pilot:
        await app.settled()
        await pilot.press("M")
        summary = app.screen.query_one("#models-summary")
        await eventually(lambda: "mvtui pull MODEL" in str(summary.content), what="the hint")
        assert str(summary.content) == f"no Hugging Face cache at {tmp_path / 'nowhere'} yet: `mvtui pull MODEL` downloads one"


async def test_enter_on_a_model_writes_an_instance_entry_and_starts_it(
    tmp_path: Path, paths: AppPaths, hf_cache: Path, fake_vllm: Path
) -> None:
    path = tmp_path / "servers.toml"
    path.write_text(CONFIG)
    app = create_app(core_from_file(path, paths, two_gpus()), paths, user_themes=False)
    async with app.run_test(size=(140, 36), notifications=True) as pilot:
        await app.settled()
        await open_models(app, pilot, 2)
        await pilot.press("enter")  # on the first model, acme/tiny-chat
        form = app.screen
        assert isinstance(form, InstanceForm)
        assert form.query_one("#instance-name", Input).value == "tiny-chat"  # "chat" is taken
        assert "GPU 1: 76.8 of 80 GiB free" in str(form.query_one(".form-hint").content)
        await pilot.press("1", "enter")  # devices, then on to the memory share
        form.query_one("#instance-memory", Input).value = "0.5"
        await pilot.press("enter")
        assert isinstance(app.screen, ModelsScreen)

        core = app.core
        assert core is not None
        await eventually(lambda: "tiny-chat" in [instance.label for instance in core.operator.instances], what="the instance")
        text = path.read_text()
        assert text.startswith(CONFIG), "the file keeps what it said, comments included"
        added = tomlkit.parse(text)["instances"][1]
        assert added.unwrap() == {"model": "acme/tiny-chat", "name": "tiny-chat", "devices": [1], "gpu_memory_utilization": 0.5}

        local = core.cluster.find("tiny-chat")
        await eventually(lambda: local.lifecycle == "running" and local.is_up, timeout=30, what="the instance up")
        await eventually(lambda: rows(app)["acme/tiny-chat"][-1] == "chat ○ stopped, tiny-chat ● up", what="its state in the row")
        said = [(notice.title, notice.message.replace("\\[", "[")) for notice in app._notifications]  # as shown
        assert ("add instance", f"added [[instances]] tiny-chat (acme/tiny-chat) (saved to {path})") in said
        assert any(title == "start" and message.startswith("tiny-chat: running on http://127.0.0.1:") for title, message in said)


async def test_the_form_says_what_is_wrong_and_writes_nothing(tmp_path: Path, paths: AppPaths, hf_cache: Path) -> None:
    path = tmp_path / "servers.toml"
    path.write_text(CONFIG)
    app = create_app(core_from_file(path, paths), paths, user_themes=False)
    async with app.run_test(size=(140, 36)) as pilot:
        await app.settled()
        await open_models(app, pilot, 2)
        await pilot.press("down", "enter")  # acme/tiny-embed
        form = app.screen
        assert isinstance(form, InstanceForm)
        error = form.query_one("#instance-error")
        cases = [
            ("embed", "a", "0.5", "devices: GPU indices separated by commas, like 0,1; got 'a'"),
            ("embed", "0", "1.5", "memory share: more than 0 and at most 1, like 0.5; got 1.5"),
            ("embed", "0", "half", "memory share: a number between 0 and 1, like 0.5; got 'half'"),
            ("chat", "0", "0.5", "an instance named 'chat' exists already; choose another name"),
        ]
        for name, devices, memory, problem in cases:
            form.query_one("#instance-name", Input).value = name
            form.query_one("#instance-devices", Input).value = devices
            memory_field = form.query_one("#instance-memory", Input)
            memory_field.value = memory
            memory_field.focus()
            await pilot.press("enter")
            assert app.screen is form
            assert str(error.content) == problem
        await pilot.press("escape")
        assert isinstance(app.screen, ModelsScreen)
        assert path.read_text() == CONFIG


def test_the_dashboard_loads_huggingface_hub_only_when_the_models_screen_opens(tmp_path: Path) -> None:
    probe = f"""
import asyncio, sys
from pathlib import Path
from mvtui.ui.app import create_app
from tests.ui_frozen import frozen_factory, frozen_services, tmp_paths

async def main():
    paths = tmp_paths(Path({str(tmp_path)!r}))
    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.settled()
        before = [name for name in ("huggingface_hub", "openai") if name in sys.modules]
        await pilot.press("M")
        while app.screen.listing is None and app.screen.problem is None:
            await asyncio.sleep(0.02)
        print(before, "huggingface_hub" in sys.modules)

asyncio.run(main())
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[] True"


# --- the pieces ---------------------------------------------------------------------------------


def test_a_suggested_name_is_short_and_free() -> None:
    assert suggested_name("Qwen/Qwen2.5-0.5B-Instruct", []) == "qwen2.5-0.5b-instruct"
    assert suggested_name("acme/tiny-chat", ["tiny-chat", "tiny-chat-2"]) == "tiny-chat-3"
    assert suggested_name("/models/Llama 3 (8B)", []) == "llama-3-8b"


def test_the_form_fields_parse_like_the_cli() -> None:
    assert parse_devices("0,1") == [0, 1] and parse_devices(" 2 3 ") == [2, 3] and parse_devices("") == []
    assert isinstance(parse_devices("0,x"), str) and isinstance(parse_devices("-1"), str)
    assert parse_share("0.4") == 0.4
    assert isinstance(parse_share("0"), str) and isinstance(parse_share("1.01"), str) and isinstance(parse_share(""), str)


def test_an_entry_uses_a_model_by_repo_id_or_by_a_path_into_the_cache(hf_cache: Path) -> None:
    chat = scan_models(hf_cache).find("acme/tiny-chat")
    assert chat is not None
    assert chat.is_used_by("ACME/Tiny-Chat")
    assert chat.is_used_by(str(chat.revision.path))
    assert not chat.is_used_by("acme/tiny-embed") and not chat.is_used_by("tiny-chat")


async def test_the_operator_adds_an_instance_live_without_a_config_file(paths: AppPaths) -> None:
    services = frozen_services(paths)
    outcome = await services.operator.add_instance({"model": "acme/tiny-chat", "name": "tiny", "devices": [0]})
    assert outcome.name == "tiny" and outcome.saved_to is None
    assert outcome.message == "added [[instances]] tiny (acme/tiny-chat) (not saved: running without a config file)"
    instance = services.operator.instances.find("tiny")
    assert instance.config == InstanceConfig(model="acme/tiny-chat", name="tiny", devices=(0,)) and instance.lifecycle == "stopped"
    with pytest.raises(CommandError, match="an instance named 'tiny' exists already"):
        await services.operator.add_instance({"model": "acme/other", "name": "tiny"})
    with pytest.raises(CommandError, match=r"gpu_memory_utilization: must be at most 1, got 2"):
        await services.operator.add_instance({"model": "acme/other", "gpu_memory_utilization": 2})
    assert json.dumps(outcome.as_json())


async def test_a_cache_that_cannot_be_read_is_said_not_fatal(paths: AppPaths) -> None:
    def broken() -> CacheListing:
        raise OSError("Permission denied: '/srv/hf'")

    app = create_app(frozen_factory(frozen_services(paths)), paths, user_themes=False)
    app.scan_models = broken
    async with app.run_test(size=(120, 30)) as pilot:
        await app.settled()
        await pilot.press("M")
        head = app.screen.query_one("#models-head")
        await eventually(lambda: "cannot read" in str(head.content), what="the problem")
        assert str(head.content) == "cannot read the Hugging Face cache: OSError: Permission denied: '/srv/hf'"
        assert app.is_running and isinstance(app.screen, ModelsScreen)
