"""Thin widgets over the panel functions. The app's throttled tick calls `show(...)`; each
widget builds its text with a panel function at its current size and repaints only when
that text changed, so an idle or steady dashboard costs the event loop next to nothing.
Nothing here runs per request."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence

from rich.console import RenderableType
from rich.text import Text
from textual.events import Click
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from mvtui.cluster.state import ClusterEvent, RequestRecord, Server
from mvtui.gpu import GpuSnapshot
from mvtui.ui import panels
from mvtui.ui.panels import Owners, Palette

ROLE_CLASSES = tuple(f"-state-{role}" for role in panels.ROLE_GLYPHS)


def _shape(text: Text) -> tuple[int, int]:
    """Line count and widest line: what an auto-sized widget's size depends on."""
    lines = text.plain.split("\n")
    return len(lines), max(map(len, lines))


class TextPane(Widget):
    """A widget showing one Text, repainted only when the Text changes."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.text = Text()

    def render(self) -> Text:
        return self.text

    def set_text(self, text: Text) -> None:
        if text == self.text:
            return
        relayout = _shape(text) != _shape(self.text)
        self.text = text
        if relayout:
            self.clear_cached_dimensions()  # Textual caches the height per width
        self.refresh(layout=relayout)

    @property
    def inner_width(self) -> int:
        return self.content_size.width or max(0, self.size.width - 2)


class ServerPane(TextPane):
    """One server: border title with state, name and URL; the body from `panels.server_body`.
    A click selects it; a double click opens its details (the app handles `Clicked`)."""

    class Clicked(Message):
        def __init__(self, pane: ServerPane, clicks: int) -> None:
            super().__init__()
            self.pane = pane
            self.clicks = clicks

    def __init__(self, server: Server) -> None:
        super().__init__(classes="server")
        self.server = server

    def on_click(self, event: Click) -> None:
        event.stop()
        self.post_message(self.Clicked(self, event.chain))

    def show(self, palette: Palette, *, detailed: bool, selected: bool, width: int) -> None:
        role = panels.state_role(self.server.state)
        self.set_class(selected, "-selected")
        for name in ROLE_CLASSES:
            self.set_class(name == f"-state-{role}", name)
        title = panels.server_title(self.server)
        if title != self.border_title:
            self.border_title = title
        self.set_text(panels.server_body(self.server, max(20, self.inner_width or width), palette, detailed=detailed))


class ClusterBar(TextPane):
    """The cluster line on top."""

    def __init__(self) -> None:
        super().__init__(id="cluster-bar")
        self.text = Text("mvtui  starting…")


class Banner(Static):
    """What is broken now (a config file, the admin API), in full under the cluster line;
    hidden when nothing is. Redrawn only when what it says changes."""

    def __init__(self) -> None:
        super().__init__(id="banner")
        self.key: Hashable = None
        self.shown: RenderableType | None = None
        self.display = False

    def show(self, key: Hashable, content: Callable[[], RenderableType | None], *, error: bool) -> None:
        """`content` is built only when `key` (what it depends on) changed; `error` draws
        the line under it in the error colour (else the warning colour)."""
        if key == self.key:
            return
        self.key = key
        self.shown = content()
        self.display = self.shown is not None
        self.set_class(error, "-error")
        self.update(self.shown if self.shown is not None else "")


class GpuPane(TextPane):
    """Every local GPU, or one line saying why there are none."""

    def __init__(self) -> None:
        super().__init__(id="gpu")

    def show(self, snapshot: GpuSnapshot | None, palette: Palette, owners: Owners) -> None:
        listing = snapshot is not None and snapshot.available and bool(snapshot.gpus)
        self.set_class(listing, "-listing")
        if listing and snapshot is not None:
            self.border_title = f"GPU ({len(snapshot.gpus)})"
            self.set_text(panels.gpu_table(snapshot, max(40, self.inner_width), palette, owners))
        else:
            self.border_title = None
            self.set_text(panels.gpu_unavailable_line(snapshot, palette))


class EventsPane(TextPane):
    """What happened to the cluster (servers up/down, drains, sleeps, reloads), newest last."""

    def __init__(self, events: deque[ClusterEvent]) -> None:
        super().__init__(id="events", classes="log")
        self.events = events
        self.border_title = "events"

    def show(self, palette: Palette) -> None:
        self.set_text(panels.events_text(self.events, self.content_size.height, max(20, self.inner_width), palette))


class RequestsPane(TextPane):
    """The last requests through the router, newest last."""

    def __init__(self, requests: Callable[[], Sequence[RequestRecord]]) -> None:
        super().__init__(id="requests", classes="log")
        self.requests = requests
        self.border_title = "requests"

    def show(self, palette: Palette) -> None:
        self.set_text(panels.requests_table(self.requests(), self.content_size.height, max(40, self.inner_width), palette))


class KeyBar(TextPane):
    """The footer: every key with what it does, greyed out where it does not apply now.
    Wraps onto a second line when the terminal is too narrow for one."""

    def __init__(self) -> None:
        super().__init__(id="keys")

    def show(self, keys: list[tuple[str, str, bool]], palette: Palette) -> None:
        self.set_text(panels.key_bar(keys, max(20, self.inner_width or self.app.size.width - 2), palette))
