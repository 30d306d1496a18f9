"""SVG snapshots of the Models screen, its instance form and the chat screen, fed frozen data:
a hand-made cache listing (fixed sizes, commits and dates), two instances in fixed states, a
conversation already held. Regenerate after an intended change with `--snapshot-update`,
then look at the report before committing the new SVGs."""

from __future__ import annotations

import hashlib
from pathlib import Path

from textual.widgets import Input

from mvtui.config.schema import InstanceConfig
from mvtui.models.cache import CachedModel, CacheListing, Revision
from mvtui.models.chat import Conversation
from mvtui.ui.app import Dashboard, create_app
from mvtui.ui.models_screen import ModelsScreen
from tests.test_ui_snapshots import SNAPSHOT_PATHS, frozen_app, settle, utc  # noqa: F401  (utc: an autouse fixture)
from tests.ui_frozen import FROZEN_AT, FrozenCore, frozen_factory, frozen_services

CACHE = Path("/home/ops/.cache/huggingface/hub")
MIB, GIB = 1024**2, 1024**3
DAY = 86400.0
# repo id, kind, size, days before FROZEN_AT, older revisions
MODELS = (
    ("BAAI/bge-m3", "embedding", int(2.2 * GIB), 40, 0),
    ("meta-llama/Llama-3.1-8B-Instruct", "generation", int(15.0 * GIB), 12, 0),
    ("Qwen/Qwen2.5-0.5B-Instruct", "generation", 988 * MIB, 3, 0),
    ("Qwen/Qwen2.5-7B-Instruct", "generation", int(15.2 * GIB), 1, 1),
    ("TheBloke/Mistral-7B-Instruct-v0.2-GGUF", "unknown", int(4.1 * GIB), 90, 0),
)
CONVERSATION = [
    {"role": "user", "content": "Say hello in three languages."},
    {"role": "assistant", "content": "Hello! Bonjour ! ¡Hola!"},
    {"role": "user", "content": "And which one is spoken in Québec?"},
    {"role": "assistant", "content": "French: in Québec you would say « Bonjour ! »."},
]


def cached(repo_id: str, kind: str, size: int, age_days: float, older: int) -> CachedModel:
    folder = CACHE / ("models--" + repo_id.replace("/", "--"))
    revisions = tuple(
        Revision(
            hashlib.sha1(f"{repo_id}@{index}".encode()).hexdigest(),
            ("main",) if index == 0 else (),
            FROZEN_AT - (age_days + index * 30) * DAY,
            size,
            12,
            folder,
        )
        for index in range(older + 1)
    )
    return CachedModel(repo_id, kind, size, revisions[0], revisions, folder)


def frozen_listing() -> CacheListing:
    return CacheListing(CACHE, tuple(cached(*model) for model in MODELS), incomplete_bytes=312 * MIB, incomplete_files=1)


def with_instances(services: FrozenCore) -> None:
    """A stopped instance of the small Qwen and a running one of the 7B."""
    instances = services.operator.instances
    instances.add(InstanceConfig(model="Qwen/Qwen2.5-0.5B-Instruct", name="qwen-small", port=8101), origin="config")
    running = instances.add(InstanceConfig(model="Qwen/Qwen2.5-7B-Instruct", name="qwen-7b", port=8102, devices=(1,)), origin="config")
    running.server.lifecycle = "running"
    running.server.health.success()


def models_app() -> Dashboard:
    services = frozen_services(SNAPSHOT_PATHS)
    with_instances(services)
    app = create_app(frozen_factory(services), SNAPSHOT_PATHS, user_themes=False)
    app.scan_models = frozen_listing
    return app


async def models_listed(pilot) -> None:  # type: ignore[no-untyped-def]
    await settle(pilot)
    await pilot.press("M")
    while not isinstance(pilot.app.screen, ModelsScreen) or pilot.app.screen.listing is None:
        await pilot.pause(0.02)
    await pilot.pause(0.1)


def test_models_screen_160x48(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(models_app(), terminal_size=(160, 48), run_before=models_listed)


def test_models_screen_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(models_app(), terminal_size=(80, 24), run_before=models_listed)


async def asked(pilot) -> None:  # type: ignore[no-untyped-def]
    """The form for Qwen/Qwen2.5-0.5B-Instruct, given a memory share it refuses."""
    await models_listed(pilot)
    await pilot.press("down", "down", "enter")
    await pilot.press("1", "enter")
    pilot.app.screen.query_one("#instance-memory", Input).value = "1.5"
    await pilot.press("enter")
    steady_cursor(pilot)


def steady_cursor(pilot) -> None:  # type: ignore[no-untyped-def]
    """The text cursor shown and not blinking, so that no picture catches it off."""
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False


def test_instance_form_with_a_problem(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(models_app(), terminal_size=(120, 36), run_before=asked)


def test_instance_form_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(models_app(), terminal_size=(80, 24), run_before=asked)


def test_chat_screen(snap_compare) -> None:  # type: ignore[no-untyped-def]
    app = frozen_app()
    app.conversations["llama-3.1-8b"] = Conversation(turns=[dict(turn) for turn in CONVERSATION])

    async def chatting(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        await pilot.press("c", *"What about Spain?")
        steady_cursor(pilot)
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=(100, 30), run_before=chatting)
