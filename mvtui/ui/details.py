"""A server's details screen (Enter, or a double click on its pane): its numbers over the last
ten minutes as Textual sparklines, its recent requests, its errors and events, its config
entry (without secrets), a managed instance's log tail, and buttons for its commands.

The screen reads the same state as the dashboard, once a second; its buttons and keys run
the dashboard's own commands (`DetailsContext.run`), so they check, ask and notify exactly
as the keys on the main screen do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from rich.console import RenderableType
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Sparkline, Static

from mvtui import keymap
from mvtui.cluster.state import Server
from mvtui.ui import panels
from mvtui.ui.actions import CoreActions
from mvtui.ui.core import Core
from mvtui.ui.history import WINDOW_S, MetricsHistory
from mvtui.ui.panels import Palette
from mvtui.ui.widgets import TextPane

BUTTONS = ("drain", "sleep", "wake", "start", "stop")  # keymap ids, in the order shown
KEYS = (*BUTTONS, "log")  # the keymap's keys that work on this screen too
WIDE_MIN_WIDTH = 120
REQUESTS_SHOWN = 10
EVENTS_SHOWN = 10
LOG_LINES = 20


@dataclass(frozen=True)
class Metric:
    label: str
    field: str  # of history.Sample
    shown: Callable[[float], str]


METRICS = (
    Metric("running", "running", panels.count),
    Metric("waiting", "waiting", panels.count),
    Metric("KV cache", "kv_percent", lambda value: f"{value:.0f}%"),
    Metric("TTFT p50", "ttft_ms", lambda value: panels.duration(value / 1000)),
    Metric("tok/s", "tokens_per_s", panels.rate),
)


@dataclass(frozen=True)
class DetailsContext:
    """What the screen uses of the dashboard."""

    core: Core
    actions: CoreActions
    history: MetricsHistory
    keys: Mapping[str, tuple[str, ...]]  # each keymap id's keys (the user's)
    palette: Callable[[], Palette]
    run: Callable[..., Awaitable[None]]  # (action, server, *args): the command as its key runs it


def command_bindings() -> list[BindingType]:
    """The keymap's bindings for the commands this screen offers, with their ids (so the
    user's `[ui.keys]` apply here too)."""
    return [Binding(",".join(keymap.BY_ID[key].keys), f"command('{key}')", keymap.BY_ID[key].label, show=False, id=key) for key in KEYS]


class DetailsScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q", "dismiss", "close"), *command_bindings()]

    def __init__(self, server: Server, context: DetailsContext) -> None:
        super().__init__()
        self.server = server
        self.context = context
        self._events_key: tuple[object, ...] = ()
        self.events_shown: RenderableType = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="details-box", classes="dialog"):
            yield Static(id="details-head")
            with Horizontal(id="details-buttons"):
                for key in BUTTONS:
                    yield Button(key, id=f"do-{key}", compact=True)
            with VerticalScroll(id="details-body"):
                yield Static(id="metrics-title", classes="section")
                with Grid(id="details-metrics"):
                    for metric in METRICS:
                        yield Static(metric.label, classes="metric-label")
                        yield Sparkline([], id=f"spark-{metric.field}")
                        yield Static(id=f"value-{metric.field}", classes="metric-value")
                with Horizontal(id="details-logs"):
                    with Vertical(classes="details-part"):
                        yield Static("recent requests", classes="section")
                        yield TextPane(id="details-requests")
                    with Vertical(classes="details-part"):
                        yield Static("errors and events", classes="section")
                        yield Static(id="details-events")
                yield Static("config in force", classes="section")
                yield TextPane(id="details-config")
                yield Static("log", id="log-title", classes="section")
                yield TextPane(id="details-log")

    def on_mount(self) -> None:
        box = self.query_one("#details-box")
        box.border_subtitle = "Esc closes · Tab or a click: the buttons · ↑ ↓ scroll"
        self.query_one("#details-body", VerticalScroll).focus()
        self.show()
        self.call_after_refresh(self.show)  # the panes' widths are known once laid out
        self.set_interval(1.0, self.show, name="details refresh")

    def on_resize(self) -> None:
        self.call_after_refresh(self.show)

    # --- what it shows ----------------------------------------------------------------------

    def show(self) -> None:
        if not self.is_attached:
            return
        palette = self.context.palette()
        self.set_class(self.app.size.width >= WIDE_MIN_WIDTH, "-wide")
        self.query_one("#details-box").border_title = panels.server_title(self.server)
        head = self.query_one("#details-head", Static)
        head.update(panels.details_head(self.server, palette, max(20, head.content_size.width or self.app.size.width - 6)))
        self._show_buttons()
        self._show_metrics(palette)
        self._show_requests(palette)
        self._show_events(palette)
        self._show_config(palette)
        self._show_log(palette)

    def _show_buttons(self) -> None:
        for key in BUTTONS:
            action = self._action(key)
            button = self.query_one(f"#do-{key}", Button)
            label = f"{action} {keymap.key_label(self.context.keys[key][0])}"
            if str(button.label) != label:
                button.label = label
            button.set_class(not self.context.actions.applies(action, self.server), "-greyed")

    def _show_metrics(self, palette: Palette) -> None:
        history, url = self.context.history, self.server.url
        self.query_one("#metrics-title", Static).update(metrics_title(history.span(url)))
        for metric in METRICS:
            values = history.values(url, metric.field)
            self.query_one(f"#spark-{metric.field}", Sparkline).data = values if len(values) > 1 else []  # one sample: no line yet
            self.query_one(f"#value-{metric.field}", Static).update(metric_value(values, metric.shown, palette))

    def _show_requests(self, palette: Palette) -> None:
        pane = self.query_one("#details-requests", TextPane)
        mine = [record for record in self.context.core.cluster.request_log if record.server == self.server.name]
        if not mine:
            pane.set_text(Text("no requests through the router yet", style=palette.muted))
            return
        pane.set_text(panels.requests_table(mine, REQUESTS_SHOWN + 1, max(40, pane.inner_width), palette, server_column=False))

    def _show_events(self, palette: Palette) -> None:
        events = tuple(event for event in self.context.core.cluster.events if event.server == self.server.name)[-EVENTS_SHOWN:]
        key = (self.server.last_error, self.server.is_up, events, palette)
        if key != self._events_key:
            self._events_key = key
            self.events_shown = panels.server_events(self.server, events, palette)
            self.query_one("#details-events", Static).update(self.events_shown)

    def _show_config(self, palette: Palette) -> None:
        instance = self.context.actions.instance(self.server)
        config = instance.config if instance is not None else self.server.config
        self.query_one("#details-config", TextPane).set_text(panels.config_entry(config, self.server.display_url, palette))

    def _show_log(self, palette: Palette) -> None:
        instance = self.context.actions.instance(self.server)
        shown = instance is not None
        for widget in (self.query_one("#log-title"), self.query_one("#details-log")):
            widget.display = shown
        if instance is not None:
            where = f"log: {instance.log_path}" if instance.log_path else "log"
            self.query_one("#log-title", Static).update(Text(where, no_wrap=True, overflow="ellipsis"))
            self.query_one("#details-log", TextPane).set_text(panels.log_tail(list(instance.tail)[-LOG_LINES:], palette))

    # --- what it does ---------------------------------------------------------------------

    def _action(self, key: str) -> str:
        """The dashboard action a keymap id runs on this server now (drain or undrain)."""
        entry = keymap.BY_ID[key]
        if entry.alternate and self.context.actions.applies(entry.method, self.server) is False:
            return entry.alternate
        return entry.method

    async def action_command(self, key: str) -> None:
        await self.context.run(self._action(key), self.server)
        self.show()

    @on(Button.Pressed)
    async def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        key = (event.button.id or "").removeprefix("do-")
        if key in BUTTONS:
            await self.action_command(key)


def metrics_title(span: float) -> str:
    """`over the last 3 min (10 min kept)`: each plot spans what has been seen, up to 10 minutes."""
    if span >= WINDOW_S - 30:
        return "metrics over the last 10 minutes"
    return f"metrics over the last {panels.span_text(span)} (10 min kept)"


def metric_value(values: Sequence[float], shown: Callable[[float], str], palette: Palette) -> Text:
    """`now` and the plot's range: a sparkline is scaled from its lowest to its highest value."""
    if not values:
        return Text("–", style=palette.muted)
    return Text.assemble(
        (f"{shown(values[-1]):>7}", f"bold {palette.text}"), (f"  {shown(min(values))}–{shown(max(values))}", palette.muted), no_wrap=True
    )
