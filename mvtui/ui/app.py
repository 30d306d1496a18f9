"""The full-screen dashboard: a view of the core plus a keyboard, nothing more.

The app starts the core (proxy, poller, ...) from the factory it is given, on Textual's own
event loop, so OpenAI clients are served the whole time the screen is up. It reads the
cluster's state on a throttled tick (a few frames a second at most) and never per request;
keys, the details screen's buttons, the command palette and the mouse call the core's
commands. Quitting (q, SIGTERM, SIGHUP) stops the core gracefully before the app exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal
from textual.events import Key
from textual.markup import escape
from textual.widgets import Input, Static

from mvtui import keymap
from mvtui.cluster.state import ClusterEvent, ClusterSummary, RequestRecord, Server
from mvtui.config.starter import example_file
from mvtui.errors import CommandError
from mvtui.gpu import Gpu, GpuSampler
from mvtui.models.cache import CacheListing, scan_models
from mvtui.models.chat import Conversation
from mvtui.paths import AppPaths
from mvtui.ui import key_reasons, notices, panels, themes
from mvtui.ui.actions import CoreActions
from mvtui.ui.chat_screen import ChatContext, ChatScreen
from mvtui.ui.commands import DashboardCommands, PaletteCommand, server_commands
from mvtui.ui.core import Core, CoreFactory
from mvtui.ui.details import DetailsContext, DetailsScreen
from mvtui.ui.history import MetricsHistory
from mvtui.ui.models_screen import ModelsContext, ModelsScreen
from mvtui.ui.screens import AddServerScreen, ConfirmScreen, HelpScreen, InstanceLogScreen, SleepScreen, help_text
from mvtui.ui.widgets import Banner, ClusterBar, EventsPane, GpuPane, KeyBar, RequestsPane, ServerPane

log = logging.getLogger(__name__)

MAX_FRAMES_PER_S = 4.0
DETAIL_MIN_WIDTH = 120
DETAIL_PANE_HEIGHT = 9  # seven lines and the border
RESERVED_ROWS = 12  # cluster line, GPU pane, some log, keys
DETAIL_COLUMN_WIDTH = 64
WIDE_LOGS_MIN_WIDTH = 120
REMOVE_ANSWERS = (
    ("y", "remove it until mvtui restarts"),
    ("Y", "remove it and delete it from the config file"),
    ("n", "keep it (Esc too)"),
)
# Commands that wait (a wake, a start) run as workers, so the screen stays live: action ->
# (what the notification is titled, the call).
BACKGROUND: dict[str, tuple[str, Callable[..., Awaitable[str]]]] = {
    "drain_save": ("drain and save", lambda actions, server: actions.drain_save(server)),
    "save": ("save", lambda actions, server: actions.save(server)),
    "capacity": ("capacity", lambda actions, server, step: actions.change_capacity(server, step)),
    "wake": ("wake", lambda actions, server: actions.wake(server)),
    "start": ("start", lambda actions, server: actions.start(server)),
    "stop": ("stop", lambda actions, server: actions.stop(server)),
}
SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def bindings(actions: Sequence[keymap.KeyAction]) -> list[BindingType]:
    """Textual's bindings for the keymap, with its ids, so `[ui.keys]` can rebind them; an
    action's alternate (undrain) shares its keys and id."""
    found: list[BindingType] = []
    for action in actions:
        keys = ",".join(action.keys)
        found.append(Binding(keys, action.action, action.label, show=False, id=action.id))
        if action.alternate:
            found.append(Binding(keys, action.alternate, action.alternate, show=False, id=action.id))
    return found


class Dashboard(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "mvtui"
    COMMANDS = {DashboardCommands}  # ctrl+p (the keymap's `palette`)
    AUTO_FOCUS = None  # keys belong to the dashboard; only `/` gives the filter focus
    BINDINGS = bindings(keymap.ACTIONS)

    def __init__(
        self,
        open_core: CoreFactory,
        paths: AppPaths,
        *,
        refresh_per_s: float | None = None,
        handle_signals: bool = False,
        user_themes: bool = True,
    ) -> None:
        super().__init__()
        self.open_core = open_core
        self.paths = paths
        self.core: Core | None = None
        self.core_actions: CoreActions | None = None
        self.gpu: GpuSampler | None = None  # the core's GPU probe, sampled once it is up
        self.refresh_per_s = refresh_per_s
        self.handle_signals = handle_signals
        self.events: deque[ClusterEvent] = deque()  # the core's own list once it is up
        self.selected: str | None = None
        self.filter_text = ""
        self.show_requests: bool | None = None  # None: shown when the terminal is wide
        self.core_ready = asyncio.Event()
        self.core_failure: BaseException | None = None
        self.stopping = False
        self._stop_requested = asyncio.Event()
        self._core_task: asyncio.Task[None] | None = None
        self._panes: dict[str, ServerPane] = {}
        self._palette = panels.Palette()
        self._availability: list[tuple[str, str, bool]] = []
        self._theme_names: list[str] = []
        self._user_themes = user_themes
        self._remembered: str | None = None  # the theme the user last chose with `t`
        self._ui_up = False
        self.keys = keymap.resolve({})  # every action's keys, with the user's [ui.keys]
        self._user_keys: keymap.UserKeys = ()
        self.history = MetricsHistory()  # each server's numbers, for the details screen's plots
        self._notices = notices.Notices()
        self._terminal_fds: list[int] = []  # the terminal's, sent to /dev/null on SIGHUP
        self.scan_models: Callable[[], CacheListing] = scan_models  # the Models screen's, in a thread (tests freeze it)
        self.conversations: dict[str, Conversation] = {}  # the chat screen's, by model, kept while the dashboard runs

    # --- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield ClusterBar()
        yield Banner()
        yield Grid(id="servers")
        yield Static(id="no-servers")
        yield GpuPane()
        with Horizontal(id="bottom"):
            yield EventsPane(self.events)
            yield RequestsPane(self._request_log)
        yield Input(placeholder="filter: name, URL, model or state (Enter keeps, Esc clears)", id="filter")
        yield KeyBar()

    def get_theme_variable_defaults(self) -> dict[str, str]:
        """mvtui's own variables for themes that do not set them (Textual's built-ins)."""
        return themes.mvtui_defaults(self.current_theme)

    async def on_mount(self) -> None:
        self._bar, self._grid, self._gpu_pane = self.query_one(ClusterBar), self.query_one("#servers", Grid), self.query_one(GpuPane)
        # held, not queried later: a modal screen may be on top then
        self._empty_hint, self._filter_field = self.query_one("#no-servers", Static), self.query_one("#filter", Input)
        self._events_pane, self._requests_pane, self._keys = (
            self.query_one(EventsPane),
            self.query_one(RequestsPane),
            self.query_one(KeyBar),
        )
        self._banner = self.query_one(Banner)
        self._ui_up = True
        await self._load_themes()
        self._show_filter(False)
        self._core_task = asyncio.create_task(self._run_core(), name="mvtui core")
        if self.handle_signals:
            self._handle_signals()
        self.tick()

    def _handle_signals(self) -> None:
        """SIGTERM quits like `q`; SIGHUP (the terminal is gone) too, see `hang_up`."""
        self._terminal_fds = [fd for fd in (0, 1, 2) if os.isatty(fd)]  # a hung-up terminal no longer says so
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: self.call_later(self.action_quit))
        loop.add_signal_handler(signal.SIGHUP, self.hang_up)

    def hang_up(self) -> None:
        """SIGHUP: the terminal is gone. The core is told to stop at once, not through
        Textual's message queue, and the terminal's file descriptors are pointed at /dev/null
        so that Textual's writes, which would fail from now on, cannot break the way out; the
        app exits once the requests in flight have finished."""
        log.warning("the terminal hung up (SIGHUP): stopping")
        if not self.is_headless:
            _detach_from_terminal(self._terminal_fds)
        self._stop_requested.set()
        self.stopping = True

    def on_resize(self) -> None:
        self.call_after_refresh(self.tick)

    async def on_unmount(self) -> None:
        """However the app ends, the core is stopped before the loop goes away."""
        self._ui_up = False
        if self.handle_signals:
            for number in SIGNALS:
                asyncio.get_running_loop().remove_signal_handler(number)
        await self.stop_core()

    async def stop_core(self) -> None:
        """Stop the core (if it runs) and wait until it has: after the app, whatever ended it."""
        self._stop_requested.set()
        if self._core_task is not None and not self._core_task.done():
            limit = self.core.config.timing.shutdown_timeout + 5 if self.core else 15
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._core_task), limit)

    # --- the core -----------------------------------------------------------------------

    async def _run_core(self) -> None:
        try:
            async with self.open_core() as core:
                self._core_started(core)
                await self._stop_requested.wait()
                self.stopping = True
                self.tick()
        except Exception as error:  # the core could not start or stop: say so, then exit
            log.exception("mvtui core failed")
            self.core_failure = error
        if self.is_running:
            failure = self.core_failure
            self.exit(return_code=1 if failure else 0, message=f"mvtui: {failure}" if failure else None)

    def _core_started(self, core: Core) -> None:
        self.core = core
        self.core_actions = CoreActions(core)
        self.gpu = GpuSampler(core.gpu)
        self.run_worker(self.gpu.run(), name="gpu sampler", group="gpu")
        self.events = core.cluster.events
        self._events_pane.events = self.events
        rate = self.refresh_per_s or core.config.ui.refresh_per_s
        self.set_interval(1.0 / min(MAX_FRAMES_PER_S, max(0.2, rate)), self.tick, name="dashboard refresh")
        if self._remembered is None and core.config.ui.theme in self.available_themes:
            self.theme = core.config.ui.theme
        self.core_ready.set()
        self.tick()
        log.info("dashboard up; router on %s", core.router_url)

    async def settled(self) -> None:
        """Until the core is up and the first GPU reading is in (tests, screenshots)."""
        await self.core_ready.wait()
        while self.gpu is None or self.gpu.latest is None:
            await asyncio.sleep(0.01)
        await self.repaint()

    async def repaint(self) -> None:
        """Repaint now, and again once the layout that caused is done (a pane's text depends
        on its size)."""
        for _ in range(2):
            self.tick()
            laid_out = asyncio.Event()
            self.call_after_refresh(laid_out.set)
            await laid_out.wait()

    def _request_log(self) -> Sequence[RequestRecord]:
        return self.core.cluster.request_log if self.core else ()

    # --- the throttled tick: the only place widgets are repainted -----------------------

    def tick(self) -> None:
        if not self._ui_up:
            return
        palette = self._palette
        bar = self._bar
        core = self.core
        if core is None:
            note = "starting the core…"
            bar.set_text(panels.cluster_line(_EMPTY_SUMMARY, None, palette, self.size.width - 2, note))
        else:
            summary = core.cluster.summary()
            router = core.router_url if core.router_port is not None else None
            counts = panels.server_counts(core.cluster)
            bar.set_text(
                panels.cluster_line(
                    summary, router, palette, self.size.width - 2, self._note(summary.in_flight), counts, core.cluster.fleet
                )
            )
            self._apply_keys(core.config.ui.keys)
            self._show_problems(core, palette)
            self._show_servers(palette)
            self.history.sample(core.cluster, time.monotonic())
        self._gpu_pane.show(self.gpu.latest if self.gpu else None, palette, self._gpu_owners)
        self._show_logs(palette)
        self._refresh_keys(palette)

    def _show_problems(self, core: Core, palette: panels.Palette) -> None:
        """A broken config file and an admin API that is off: in the banner while they last,
        and a notification when they appear (and when they clear)."""
        admin = core.admin
        problem = admin.problem if admin is not None else None
        reload_key = keymap.key_label(self.keys["reload"][0])
        fleet = core.cluster.fleet
        key = (str(core.config_error), problem, palette, reload_key, fleet.degraded if fleet else None, fleet.problem if fleet else None)
        banner = lambda: panels.problems_banner(core.config_error, problem, palette, reload_key, fleet)  # noqa: E731
        self._banner.show(key, banner, error=core.config_error is not None)
        for notice in self._notices.changes(core.config_error, admin):
            self.notify(escape(notice.message), title=notice.title, severity=notice.severity, timeout=notice.timeout)

    def _apply_keys(self, user: keymap.UserKeys) -> None:
        """The config's [ui.keys] over the defaults: at start, and again when a reload changes them."""
        if user == self._user_keys:
            return
        self._user_keys = user
        self.keys = keymap.resolve(dict(user))
        self.set_keymap({action: ",".join(keys) for action, keys in user})

    @property
    def wide(self) -> bool:
        return self.size.width >= WIDE_LOGS_MIN_WIDTH

    @property
    def requests_shown(self) -> bool:
        """The request log: beside the events when the terminal is wide, else instead of them."""
        return self.wide if self.show_requests is None else self.show_requests

    def _show_logs(self, palette: panels.Palette) -> None:
        events, requests = self._events_pane, self._requests_pane
        shown = self.requests_shown
        if (events.display, requests.display) != (self.wide or not shown, shown):
            events.display, requests.display = self.wide or not shown, shown
            self.call_after_refresh(self.tick)  # their height is known once laid out
        for pane in (events, requests):
            if pane.display:
                pane.show(palette)

    def _note(self, in_flight: int) -> str:
        if self.stopping:
            return f"stopping: {in_flight} in flight"
        if self.filter_text:
            return f"filter: {self.filter_text}"
        return ""

    def visible_servers(self) -> list[Server]:
        if self.core is None:
            return []
        servers = list(self.core.cluster)
        needle = self.filter_text.strip().lower()
        if needle:
            servers = [server for server in servers if needle in _search_text(server)]
        return servers

    def _show_servers(self, palette: panels.Palette) -> None:
        servers = self.visible_servers()
        self._sync_panes(servers)
        urls = [server.url for server in servers]
        if self.selected not in urls:
            self.selected = urls[0] if urls else None
        detailed, columns = self._server_layout(len(servers))
        grid = self._grid
        if grid.styles.grid_size_columns != columns:
            grid.styles.grid_size_columns = columns
        width = (self.size.width - (columns - 1)) // columns - 4  # border and padding
        for server in servers:
            self._panes[server.url].show(palette, detailed=detailed, selected=server.url == self.selected, width=width)

    def _server_layout(self, count: int) -> tuple[bool, int]:
        """Detailed panes in a grid when they all fit on screen, else compact rows."""
        width, height = self.size
        if width < DETAIL_MIN_WIDTH or count == 0:
            return False, 1
        columns = max(1, min(count, width // DETAIL_COLUMN_WIDTH))
        rows = -(-count // columns)
        if rows * DETAIL_PANE_HEIGHT + RESERVED_ROWS > height:
            return False, 1
        return True, columns

    def _show_empty_hint(self) -> None:
        """With no server at all, say how to get one instead of showing a blank screen."""
        hint = self._empty_hint
        empty = self.core is not None and len(self.core.cluster) == 0
        hint.display = empty
        if empty:
            where = self.core.config_path or self.paths.default_config  # type: ignore[union-attr]
            hint.update(
                f"No servers yet. Press [b]a[/b] to add one, list them in [b]{escape(str(where))}[/b] "
                f"([b]mvtui init[/b] writes a starter; every option: {escape(str(example_file()))}), "
                "or try [b]mvtui --demo[/b]."
            )

    def _sync_panes(self, servers: list[Server]) -> None:
        self._show_empty_hint()
        grid = self._grid
        wanted = [server.url for server in servers]
        if list(self._panes) == wanted and all(self._panes[server.url].server is server for server in servers):
            return
        for url, pane in list(self._panes.items()):
            pane.remove()
            del self._panes[url]
        for server in servers:
            self._panes[server.url] = ServerPane(server)
        grid.mount_all(self._panes.values())

    def _gpu_owners(self, gpu: Gpu) -> Sequence[str]:
        return self.core_actions.gpu_owners(gpu) if self.core_actions else []

    # --- selection and availability -----------------------------------------------------

    @property
    def selected_server(self) -> Server | None:
        if self.core is None or self.selected is None:
            return None
        server = self.core.cluster.servers.get(self.selected)
        return server if server is not None and server.url in self._panes else None

    def action_select(self, step: int) -> None:
        urls = list(self._panes)
        if not urls:
            return
        index = urls.index(self.selected) if self.selected in urls else 0
        self.selected = urls[(index + step) % len(urls)]
        self.tick()
        self._panes[self.selected].scroll_visible(animate=False)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in keymap.ALWAYS:
            return True
        if self.core_actions is None:
            return False if action == "undrain" else None
        return self.core_actions.applies(action, self.selected_server)

    def key_states(self) -> list[tuple[str, str, bool]]:
        """(key, label, enabled) for the footer, from the keymap with the user's keys; actions
        that check_action hides (drain on a drained server) left out."""
        states = []
        for action in keymap.ACTIONS:
            if action.footer:
                key = keymap.key_label(self.keys[action.id][0])
                states += [(key, label, bool(state)) for label, state in self._footer_states(action) if state is not False]
        return states

    def _footer_states(self, action: keymap.KeyAction) -> list[tuple[str, bool | None]]:
        states = [(action.label, self.check_action(action.method, ()))]
        if action.alternate:
            states.append((action.alternate, self.check_action(action.alternate, ())))
        return states

    def _refresh_keys(self, palette: panels.Palette) -> None:
        states = self.key_states()
        self._keys.show(states, palette)
        if states != self._availability:
            self._availability = states
            self.refresh_bindings()

    # --- actions: each calls a core command -----------------------------------------------

    async def _run_command(self, what: str, command: Callable[[], Any]) -> None:
        """Run a core command; its message or error becomes a notification."""
        try:
            result = command()
            if asyncio.iscoroutine(result):
                result = await result
        except CommandError as error:
            self.notify(escape(str(error)), title=what, severity="error")
        else:
            if isinstance(result, str) and result:
                self.notify(escape(result), title=what)
        self.tick()

    async def run_on(self, action: str, server: Server, *args: Any) -> None:
        """One command on one server, however it was asked for: its key (on the selected
        server), a button on its details screen, the command palette. One that does not
        apply now says why instead."""
        actions = self.core_actions
        if actions is None:
            return
        if not actions.applies(action, server):
            self.notify(escape(key_reasons.why_greyed(action, server, self._facts(server))), title=action.replace("_", " "), timeout=4)
        elif action in ("drain", "undrain"):  # at once: the pane shows it on the next frame
            await self._run_command(action, lambda: getattr(actions, action)(server))
        elif action in BACKGROUND:
            what, call = BACKGROUND[action]
            self.run_worker(self._run_command(what, lambda: call(actions, server, *args)), group="commands")
        else:
            getattr(self, f"_open_{action}")(server, actions)

    async def _on_selected(self, action: str, *args: Any) -> None:
        server = self.selected_server
        if server is not None:
            await self.run_on(action, server, *args)

    async def action_drain(self) -> None:
        await self._on_selected("drain")

    async def action_undrain(self) -> None:
        await self._on_selected("undrain")

    async def action_drain_save(self) -> None:
        await self._on_selected("drain_save")

    async def action_save(self) -> None:
        await self._on_selected("save")

    async def action_sleep(self) -> None:
        await self._on_selected("sleep")

    async def action_capacity(self, step: int) -> None:
        await self._on_selected("capacity", step)

    async def action_remove_server(self) -> None:
        await self._on_selected("remove_server")

    async def action_wake(self) -> None:
        await self._on_selected("wake")

    async def action_start(self) -> None:
        await self._on_selected("start")

    async def action_stop(self) -> None:
        await self._on_selected("stop")

    async def action_instance_log(self) -> None:
        await self._on_selected("instance_log")

    async def action_details(self) -> None:
        await self._on_selected("details")

    def _open_sleep(self, server: Server, actions: CoreActions) -> None:
        def chosen(level: int | None) -> None:
            if level:
                self.run_worker(self._run_command("sleep", lambda: actions.sleep(server, level)), group="commands")

        self.push_screen(SleepScreen(server.name), chosen)

    def _open_remove_server(self, server: Server, actions: CoreActions) -> None:
        def chosen(answer: str | None) -> None:
            if answer in ("y", "Y"):
                call = lambda: actions.remove_server(server, persist=answer == "Y")  # noqa: E731
                self.run_worker(self._run_command("remove server", call), group="commands")

        question = f"Remove [b]{escape(server.name)}[/b] ({escape(server.display_url)})? Requests in flight finish first."
        self.push_screen(ConfirmScreen(question, REMOVE_ANSWERS), chosen)

    def _open_instance_log(self, server: Server, actions: CoreActions) -> None:
        path = actions.log_file(server)
        if path is not None:
            self.push_screen(InstanceLogScreen(server.name, path))

    def _open_details(self, server: Server, actions: CoreActions) -> None:
        assert self.core is not None
        self.history.sample(self.core.cluster, time.monotonic(), force=not self.history.samples(server.url))
        context = DetailsContext(self.core, actions, self.history, self.keys, lambda: self._palette, self.run_on)
        self.push_screen(DetailsScreen(server, context))

    async def action_chat(self) -> None:
        await self._on_selected("chat")

    def _open_chat(self, server: Server, actions: CoreActions) -> None:
        assert self.core is not None
        model = actions.chat_model(server)
        if model is None:
            return
        conversation = self.conversations.setdefault(model, Conversation())
        context = ChatContext(server, model, self.core.router_url, actions.router_api_key(), actions, conversation, lambda: self._palette)
        self.push_screen(ChatScreen(context))

    def action_models(self) -> None:
        actions = self.core_actions
        if actions is not None:
            gpus = lambda: self.gpu.latest if self.gpu else None  # noqa: E731
            self.push_screen(ModelsScreen(ModelsContext(actions, self.scan_models, lambda: self._palette, gpus, self._run_command)))

    def action_add_server(self) -> None:
        actions = self.core_actions
        if actions is None:
            return

        def chosen(answer: tuple[str, int] | None) -> None:
            if answer is not None:
                self.run_worker(self._run_command("add server", lambda: actions.add_server(*answer)), group="commands")

        self.push_screen(AddServerScreen(), chosen)

    def action_reload(self) -> None:
        actions = self.core_actions
        if actions is not None:
            self.run_worker(self._reload(actions), group="commands")

    async def _reload(self, actions: CoreActions) -> None:
        """Read the config file now. A broken file is announced once, by the banner's own
        notification; reading the same broken file again says it is still broken."""
        before = str(actions.core.config_error)
        try:
            notes = await actions.reload()
        except CommandError as failure:
            self.notify(escape(str(failure)), title="reload", severity="error")
            return
        broken = actions.core.config_error
        if broken is None:
            self.notify(escape(notes), title="reload")
        elif str(broken) == before:
            self.notify(escape(notices.still_broken(broken)), title="reload", severity="warning")
        self.tick()

    # --- the mouse and the command palette -------------------------------------------------

    async def on_server_pane_clicked(self, message: ServerPane.Clicked) -> None:
        """A click selects a server; a double click opens its details."""
        url = message.pane.server.url
        if url not in self._panes:
            return
        self.selected = url
        self.tick()
        if message.clicks >= 2:
            await self.run_on("details", message.pane.server)

    def palette_commands(self) -> list[PaletteCommand]:
        """What the command palette lists: every command for every server, then the
        dashboard's own (read when the palette opens)."""
        found: list[PaletteCommand] = []
        if self.core is not None and self.core_actions is not None:
            applies, facts = self.core_actions.applies, self._facts
            why = lambda action, server: key_reasons.why_greyed(action, server, facts(server))  # noqa: E731
            found += server_commands(self.core.cluster, applies, why, self.run_on)
        return found + self._global_commands()

    def _global_commands(self) -> list[PaletteCommand]:
        reload_state = self.check_action("reload", ())
        commands = [
            PaletteCommand("reload the config file", "read it now", lambda: self.run_action("reload"), ready=bool(reload_state)),
            PaletteCommand(
                "add a server", "asks its URL and capacity", lambda: self.run_action("add_server"), ready=self.core_actions is not None
            ),
            PaletteCommand(
                "models: the Hugging Face cache",
                "Enter on one adds an [[instances]] entry and starts it",
                lambda: self.run_action("models"),
                ready=self.core_actions is not None,
            ),
            PaletteCommand("requests: show or hide the request log", "beside the events when wide", self.action_toggle_requests),
            PaletteCommand("filter servers", "by name, URL, model or state", self.action_filter),
            PaletteCommand("theme: next", "the choice is remembered", self.action_cycle_theme),
            *(PaletteCommand(f"theme {name}", "the choice is remembered", self._theme_setter(name)) for name in self._theme_names),
            PaletteCommand("help", "every key, the states, where things are", self.action_help),
            PaletteCommand("quit", "stop taking requests, let those in flight finish", self.action_quit),
        ]
        if not reload_state:
            commands[0] = PaletteCommand(
                commands[0].text, f"not now: {key_reasons.why_greyed('reload', None, self._facts())}", commands[0].run, ready=False
            )
        return commands

    def _theme_setter(self, name: str) -> Callable[[], Awaitable[None]]:
        async def choose() -> None:
            await self.choose_theme(name)

        return choose

    def action_toggle_requests(self) -> None:
        self.show_requests = not self.requests_shown
        self.tick()

    def _show_filter(self, shown: bool) -> Input:
        field = self._filter_field
        field.display = shown
        field.can_focus = shown  # a hidden field must never take the keys
        return field

    def action_filter(self) -> None:
        self._show_filter(True).focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.tick()

    @on(Input.Submitted, "#filter")
    def _filter_kept(self, event: Input.Submitted) -> None:
        self._show_filter(bool(event.value))
        self.set_focus(None)

    def action_clear_filter(self) -> None:
        """Esc: clear the filter, while typing it or once kept."""
        field = self._filter_field
        if not (field.display or self.filter_text):
            return
        field.value = ""
        self._show_filter(False)
        self.filter_text = ""
        self.set_focus(None)
        self.tick()

    def on_key(self, event: Key) -> None:
        """A greyed-out key says why instead of doing nothing (this runs before its binding,
        which will not run)."""
        active = self.screen.active_bindings.get(event.key)
        if active is None or active.enabled or active.binding.id not in keymap.BY_ID:
            return
        reason = key_reasons.why_greyed(active.binding.action.split("(")[0], self.selected_server, self._facts())
        self.notify(escape(reason), title=active.binding.description, timeout=4)

    def _facts(self, server: Server | None = None) -> key_reasons.Facts:
        """What the greyed reasons need to know beside `server` (default: the selected one)."""
        core, actions, server = self.core, self.core_actions, server or self.selected_server
        return key_reasons.Facts(
            core_up=core is not None and actions is not None,
            config_file=core is not None and core.config_path is not None,
            sleep_wake=core is not None and core.operator is not None,
            instance=actions.instance(server) if actions is not None and server is not None else None,
        )

    def action_help(self) -> None:
        rows = [(keymap.keys_label(self.keys[action.id]), action.help) for action in keymap.ACTIONS]
        self.push_screen(HelpScreen(help_text(rows, self._palette, self.paths.themes_dir, self.paths.log_dir / "mvtui.log")))

    async def action_quit(self) -> None:
        """Stop taking requests, let those in flight finish (the screen says so), then exit."""
        if self._core_task is None or self._core_task.done():
            self.exit()
            return
        self._stop_requested.set()
        self.stopping = True
        self.tick()

    # --- themes -----------------------------------------------------------------------------

    async def _load_themes(self) -> None:
        folder = self.paths.themes_dir if self._user_themes else None
        loaded, problems = await asyncio.to_thread(themes.load_themes, folder)
        memory = await asyncio.to_thread(themes.read_ui_state, self.paths.ui_state)
        self._remembered = memory.get("theme") if isinstance(memory.get("theme"), str) else None
        for theme in loaded:
            self.register_theme(theme)
        self._theme_names = [theme.name for theme in loaded]
        for problem in problems:
            self.notify(str(problem), title="theme skipped", severity="warning", timeout=10)
        remembered = self._remembered
        self.theme = remembered if remembered in self.available_themes else themes.DEFAULT_THEME

    def watch_theme(self, name: str) -> None:
        self._palette = panels.Palette.from_variables(themes.solid_colors(self.get_css_variables()))
        if self._theme_names:  # themes are loaded in on_mount, after the widgets exist
            self.tick()

    async def action_cycle_theme(self) -> None:
        await self.choose_theme(themes.next_theme(self._theme_names, self.theme))

    async def choose_theme(self, name: str) -> None:
        """Switch to a theme and remember it for next time."""
        self.theme = self._remembered = name
        try:
            await asyncio.to_thread(themes.write_ui_state, self.paths.ui_state, {"theme": name})
        except OSError as error:
            self.notify(f"cannot remember the theme: {error}", severity="warning")
        self.notify(name, title="theme", timeout=2)


def _search_text(server: Server) -> str:
    return " ".join((server.name, server.url, server.state, *server.models)).lower()


_EMPTY_SUMMARY = ClusterSummary(up=0, total=0, request_rate=0.0, token_rate=0.0, errors=0, retries=0, in_flight=0)


def create_app(
    open_core: CoreFactory,
    paths: AppPaths,
    *,
    refresh_per_s: float | None = None,
    handle_signals: bool = False,
    user_themes: bool = True,
) -> Dashboard:
    """The dashboard over the core `open_core` yields (tests hand it a frozen core whose
    GPU probe wraps a fake pynvml); `user_themes=False` ignores the user's theme folder."""
    return Dashboard(open_core, paths, refresh_per_s=refresh_per_s, handle_signals=handle_signals, user_themes=user_themes)


def run_dashboard(factory: CoreFactory, paths: AppPaths, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    """`mvtui`: the dashboard in this terminal until the user quits; the exit status.
    `loop_factory`: the same loop as `--no-ui` (see mvtui.event_loop)."""
    app = create_app(factory, paths, handle_signals=True)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run_until_stopped(app))
    return app.return_code or 0


async def run_until_stopped(app: Dashboard, **options: Any) -> None:
    """Run the app; whatever ends it (a key, a signal, Textual failing on a terminal that is
    gone), the core is stopped before this returns."""
    try:
        await app.run_async(**options)
    finally:
        await app.stop_core()


def _detach_from_terminal(fds: Sequence[int]) -> None:
    """Point the terminal's file descriptors at /dev/null: writes to a hung-up terminal fail,
    and would stop Textual's output thread."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    finally:
        os.close(null)
