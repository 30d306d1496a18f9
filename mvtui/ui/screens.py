"""Modal screens: help, the sleep level question, a confirmation, an instance's log."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.events import Key
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Input, Log, Static

from mvtui.ui import panels

HELP_FRAME = 7  # border, padding and the scroll bar around the help text
STATES = (
    ("up", "healthy and taking requests"),
    ("down", "not answering /health"),
    ("draining", "no new requests; some still in flight"),
    ("drained", "no new requests; none in flight"),
    ("sleeping L1", "weights offloaded to CPU RAM: fast wake"),
    ("sleeping L2", "weights discarded: wake reloads them"),
    ("waking", "waking up; requests wait for it"),
    ("starting", "a managed instance booting"),
    ("stopped", "a managed instance not running"),
    ("error", "a managed instance that failed"),
    ("removing", "removed: requests in flight finish, then it goes"),
)


def help_text(keys: Sequence[tuple[str, str]], palette: panels.Palette, themes_dir: Path, log_file: Path) -> Table:
    """The help screen's text: `keys` are (keys, what they do) rows, from the keymap."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style=f"bold {palette.accent}")
    grid.add_column()
    for key, meaning in keys:
        grid.add_row(Text(key), Text(meaning))
    grid.add_row("", "")
    for state, meaning in STATES:
        grid.add_row(panels.state_label(state, palette), Text(meaning, style=palette.text))
    grid.add_row("", "")
    grid.add_row(
        Text("mouse", style=palette.muted), Text("click a server to select it, double-click it for its details", style=palette.muted)
    )
    grid.add_row(Text("themes", style=palette.muted), Text(f"drop TOML themes into {themes_dir}", style=palette.muted))
    grid.add_row(Text("log", style=palette.muted), Text(str(log_file), style=palette.muted))
    return grid


class HelpScreen(ModalScreen[None]):
    """The keys, the state legend and where things are; scrolls when the terminal is small."""

    BINDINGS = [
        Binding("escape,question_mark,q", "dismiss", "close"),
        Binding("j", "scroll(1)", "down", show=False),
        Binding("k", "scroll(-1)", "up", show=False),
    ]

    def __init__(self, content: Table) -> None:
        super().__init__()
        self.content = content

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Static(self.content)

    def on_mount(self) -> None:
        box = self.query_one("#help-box", VerticalScroll)
        # a scrolling box cannot size itself to its content: as wide as the text (max-width caps it)
        box.styles.width = Measurement.get(self.app.console, self.app.console.options, self.content).maximum + HELP_FRAME
        box.border_title = "mvtui keys"
        box.border_subtitle = "↑ ↓ PgUp PgDn scroll · Esc closes"
        box.focus()

    def action_scroll(self, lines: int) -> None:
        self.query_one("#help-box", VerticalScroll).scroll_relative(y=lines, animate=False)


class SleepScreen(ModalScreen[int | None]):
    """Asks which sleep level; dismisses with 1, 2 or None."""

    BINDINGS = [
        Binding("1", "choose(1)", "level 1"),
        Binding("2", "choose(2)", "level 2"),
        Binding("escape,q", "choose(0)", "cancel"),
    ]

    def __init__(self, server_name: str) -> None:
        super().__init__()
        self.server_name = server_name

    def compose(self) -> ComposeResult:
        yield Static(
            f"Put [b]{escape(self.server_name)}[/b] to sleep?\n\n"
            "[b]1[/b]  level 1: weights offloaded to CPU RAM; wakes in about a second\n"
            "[b]2[/b]  level 2: weights discarded; wakes in seconds, then reloads them\n\n"
            "It is drained first: requests in flight finish. [b]Esc[/b] cancels.",
            id="sleep-box",
            classes="dialog",
        )

    def on_mount(self) -> None:
        self.query_one("#sleep-box").border_title = "sleep"

    def action_choose(self, level: int) -> None:
        self.dismiss(level or None)


class AddServerScreen(ModalScreen[tuple[str, int] | None]):
    """Asks a new server's URL and capacity; dismisses with (url, capacity) or None."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="add-box", classes="dialog"):
            yield Static("URL of the vLLM server, and how many requests it may run at once:")
            yield Input(placeholder="http://gpu-3:8000", id="add-url")
            yield Input(value="8", placeholder="max_concurrent_requests", id="add-capacity", type="integer")
            yield Static("[b]Enter[/b] adds it (and writes it to the config file), [b]Esc[/b] cancels.")

    def on_mount(self) -> None:
        self.query_one("#add-box").border_title = "add a server"
        self.query_one("#add-url", Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        url = self.query_one("#add-url", Input).value.strip()
        capacity = self.query_one("#add-capacity", Input).value.strip()
        if event.input.id == "add-url" and url:
            self.query_one("#add-capacity", Input).focus()
        elif url and capacity.isdigit():
            self.dismiss((url, int(capacity)))

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[str | None]):
    """A question with one-key answers (case counts: y and Y differ); dismisses with the
    answer's key, or None for Esc."""

    BINDINGS = [Binding("escape", "dismiss(None)", "cancel")]

    def __init__(self, question: str, answers: Sequence[tuple[str, str]] = (("y", "yes"), ("n", "no"))) -> None:
        super().__init__()
        self.question = question
        self.answers = dict(answers)

    def compose(self) -> ComposeResult:
        lines = [f"[b]{escape(key)}[/b]  {escape(meaning)}" for key, meaning in self.answers.items()]
        yield Static("\n".join([self.question, "", *lines]), id="confirm-box", classes="dialog")

    def on_key(self, event: Key) -> None:
        if event.character is not None and event.character in self.answers:
            event.stop()
            self.dismiss(event.character)


class InstanceLogScreen(ModalScreen[None]):
    """The tail of a managed instance's log file, followed once a second (read in a thread)."""

    BINDINGS = [Binding("escape,l,q", "dismiss", "close")]
    TAIL_BYTES = 64 * 1024

    def __init__(self, name: str, path: Path) -> None:
        super().__init__()
        self.instance_name = name
        self.path = path
        self._offset = 0
        self._error_shown = False

    def compose(self) -> ComposeResult:
        with Vertical(id="log-box", classes="dialog"):
            yield Log(max_lines=5000, auto_scroll=True)

    async def on_mount(self) -> None:
        box = self.query_one("#log-box")
        box.border_title = f"{self.instance_name}: {self.path}"
        box.border_subtitle = "Esc to close"
        await self.follow()
        self.set_interval(1.0, self.follow)

    async def follow(self) -> None:
        try:
            text, self._offset = await asyncio.to_thread(read_new, self.path, self._offset, self.TAIL_BYTES)
        except OSError as error:
            if not self._error_shown:
                self.query_one(Log).write_line(f"cannot read {self.path}: {error.strerror or error}")
                self._error_shown = True
            return
        if text:
            self.query_one(Log).write(text)


def read_new(path: Path, offset: int, tail_bytes: int) -> tuple[str, int]:
    """What was appended to `path` since `offset` (at most its last `tail_bytes` the first time)."""
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        if size < offset:  # truncated or replaced: start over
            offset = 0
        start = max(0, size - tail_bytes) if offset == 0 else offset
        handle.seek(start)
        data = handle.read(size - start)
    return data.decode("utf-8", errors="replace"), start + len(data)
