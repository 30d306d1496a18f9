"""The Models screen (M): the local Hugging Face cache as `mvtui models` lists it, with the
`[[instances]]` entries that use each model and their state, live. Enter on a model asks
for a name, devices and a memory share (`InstanceForm`), writes a new `[[instances]]` entry
through the operator (the config file keeps its comments) and starts it.

The cache is read in a thread when the screen opens (and again with `r`): huggingface_hub is
loaded then, never when the dashboard starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Static

from mvtui.errors import CommandError
from mvtui.gpu import GpuSnapshot
from mvtui.instances.record import Instance
from mvtui.models.cache import CachedModel, CacheListing
from mvtui.ui import panels
from mvtui.ui.actions import CoreActions
from mvtui.ui.panels import Palette

log = logging.getLogger(__name__)

COLUMNS = ("model", "kind", "size", "revision", "downloaded", "instances")
NARROW_COLUMNS = ("model", "instances", "size", "kind")  # below WIDE_MIN_WIDTH: what matters most first
WIDE_MIN_WIDTH = 120
GIB = 1024**3
RunCommand = Callable[[str, Callable[[], Any]], Awaitable[None]]  # the dashboard's: a notification either way


@dataclass(frozen=True)
class ModelsContext:
    """What the screen uses of the dashboard."""

    actions: CoreActions
    scan: Callable[[], CacheListing]  # blocking: called in a thread
    palette: Callable[[], Palette]
    gpus: Callable[[], GpuSnapshot | None]  # the latest GPU reading, for the form's hint
    run_command: RunCommand


# --- what a row shows ----------------------------------------------------------------------


def users_of(model: CachedModel, instances: Iterable[Instance]) -> list[Instance]:
    return [instance for instance in instances if model.is_used_by(instance.config.model)]


def size_text(size: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def revision_text(model: CachedModel) -> str:
    """The revision in use, short; `+N` when N more are cached."""
    more = len(model.revisions) - 1
    return model.revision.commit[:12] + (f" +{more}" if more else "")


def day_text(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d")


def instances_cell(users: Sequence[Instance], palette: Palette) -> Text:
    """Each entry using the model: its name and state in the state's colour; `-` for none."""
    if not users:
        return Text("-", style=palette.muted)
    parts = [
        Text.assemble(Text(instance.label, style=palette.text), " ", panels.state_label(instance.server.state, palette))
        for instance in users
    ]
    return Text(", ").join(parts)


def model_cells(model: CachedModel, users: Sequence[Instance], palette: Palette, columns: Sequence[str] = COLUMNS) -> list[Text]:
    """The row's cells, for `columns`."""
    muted = palette.muted
    cells = {
        "model": Text(model.repo_id, style=f"bold {palette.text}"),
        "kind": Text(model.kind, style=palette.text if model.kind == "generation" else muted),
        "size": Text(size_text(model.size), justify="right"),
        "revision": Text(revision_text(model), style=muted),
        "downloaded": Text(day_text(model.revision.downloaded), style=muted),
        "instances": instances_cell(users, palette),
    }
    return [cells[column] for column in columns]


def summary_text(listing: CacheListing, palette: Palette) -> Text:
    """Under the table: how many models, how much, where; what interrupted downloads left."""
    if not listing.exists:
        return Text(f"no Hugging Face cache at {listing.folder} yet: `mvtui pull MODEL` downloads one", style=palette.muted)
    if not listing.models:
        return Text(f"no models in the Hugging Face cache at {listing.folder}: `mvtui pull MODEL` downloads one", style=palette.muted)
    total = sum(model.size for model in listing.models)
    lines = [f"{panels.plural(len(listing.models), 'model')}, {size_text(total)}"]
    if listing.incomplete_files:
        lines.append(f"interrupted downloads left {size_text(listing.incomplete_bytes)} in {listing.incomplete_files} .incomplete file(s)")
    lines += list(listing.warnings)
    return Text("\n".join(lines), style=palette.muted)


def progress_text(instances: Iterable[Instance], palette: Palette) -> Text:
    """One line per instance starting now, with how far it got."""
    lines = [
        f"{instance.label}: starting{', ' + instance.progress if instance.progress else ''}" for instance in instances if instance.starting
    ]
    return Text("\n".join(lines), style=palette.starting)


def suggested_name(repo_id: str, taken: Iterable[str]) -> str:
    """A short entry name from the repo id (`Qwen/Qwen2.5-0.5B-Instruct` -> `qwen2.5-0.5b-instruct`),
    with `-2`, `-3`... when an instance has it already."""
    base = re.sub(r"[^a-z0-9._-]+", "-", repo_id.rsplit("/", 1)[-1].lower()).strip("-") or "model"
    names = set(taken)
    name, number = base, 2
    while name in names:
        name, number = f"{base}-{number}", number + 1
    return name


def gpu_hint(snapshot: GpuSnapshot | None) -> str:
    """The GPUs and their free memory, for choosing devices and a memory share."""
    if snapshot is None or not snapshot.available or not snapshot.gpus:
        return "no GPU reading here (NVML): devices are not checked before the start"
    return " · ".join(_gpu_free(gpu.index, gpu.memory_free, gpu.memory_total) for gpu in snapshot.gpus)


def _gpu_free(index: int, free: int | None, total: int | None) -> str:
    if free is None or not total:
        return f"GPU {index}"
    return f"GPU {index}: {free / GIB:.1f} of {total / GIB:.0f} GiB free"


# --- the screen --------------------------------------------------------------------------


class ModelsScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,M", "dismiss", "close"), Binding("r", "rescan", "read the cache again")]

    def __init__(self, context: ModelsContext) -> None:
        super().__init__()
        self.context = context
        self.listing: CacheListing | None = None
        self.problem: str | None = None
        self._users: dict[str, Text] = {}

    def compose(self) -> ComposeResult:
        with Vertical(id="models-box", classes="dialog"):
            yield Static(id="models-head")
            yield DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
            yield Static(id="models-progress")
            yield Static(id="models-summary")

    def on_mount(self) -> None:
        box = self.query_one("#models-box")
        box.border_title = "models in the Hugging Face cache"
        box.border_subtitle = "Enter: add an instance and start it · r: read again · Esc: close"
        self.query_one(DataTable).focus()
        self.action_rescan()
        self.set_interval(1.0, self.show_instances, name="models refresh")

    # --- reading the cache ------------------------------------------------------------------

    def action_rescan(self) -> None:
        self.query_one("#models-head", Static).update(Text("reading the Hugging Face cache…", style=self.context.palette().muted))
        self.run_worker(self._scan(), group="scan", exclusive=True)

    async def _scan(self) -> None:
        try:
            listing = await asyncio.to_thread(self.context.scan)
        except CommandError as error:
            self.listing, self.problem = None, str(error)
        except Exception as error:  # a cache huggingface_hub cannot read must not take the dashboard down
            log.exception("reading the Hugging Face cache failed")
            self.listing, self.problem = None, f"cannot read the Hugging Face cache: {type(error).__name__}: {error}"
        else:
            self.listing, self.problem = listing, None
        self.show()

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS if self.app.size.width >= WIDE_MIN_WIDTH else NARROW_COLUMNS

    def on_resize(self) -> None:
        table = self.query_one(DataTable)
        if self.listing is not None and tuple(str(key.value) for key in table.columns) != self.columns:
            self.show()

    def show(self) -> None:
        """The table from the listing, in the columns that fit; the cursor stays on its model."""
        palette = self.context.palette()
        head = self.query_one("#models-head", Static)
        table = self.query_one(DataTable)
        chosen = self._chosen_model(table)
        table.clear(columns=True)
        table.add_columns(*((column, column) for column in self.columns))
        self._users.clear()
        if self.listing is None:
            head.update(Text(self.problem or "", style=palette.down))
            return
        head.update(Text(f"cache: {self.listing.folder}", style=palette.muted))
        instances = self._instances()
        for model in self.listing.models:
            users = users_of(model, instances)
            self._users[model.repo_id] = instances_cell(users, palette)
            table.add_row(*model_cells(model, users, palette, self.columns), key=model.repo_id)
        if chosen is not None and chosen in table.rows:
            table.move_cursor(row=table.get_row_index(chosen))
        self.query_one("#models-summary", Static).update(summary_text(self.listing, palette))
        self.show_instances()

    def _chosen_model(self, table: DataTable) -> str | None:
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    # --- live: who uses each model, and starts under way ---------------------------------------

    def _instances(self) -> list[Instance]:
        operator = self.context.actions.core.operator
        return list(operator.instances) if operator is not None else []

    def show_instances(self) -> None:
        if self.listing is None or not self.is_attached:
            return
        palette = self.context.palette()
        instances = self._instances()
        table = self.query_one(DataTable)
        for model in self.listing.models:
            cell = instances_cell(users_of(model, instances), palette)
            if cell != self._users.get(model.repo_id):
                self._users[model.repo_id] = cell
                table.update_cell(model.repo_id, "instances", cell, update_width=True)
        progress = progress_text(instances, palette)
        shown = self.query_one("#models-progress", Static)
        shown.display = bool(progress.plain)
        shown.update(progress)

    # --- Enter: a new [[instances]] entry, started ---------------------------------------------

    @on(DataTable.RowSelected)
    def _chosen(self, event: DataTable.RowSelected) -> None:
        event.stop()
        model = self.listing.find(str(event.row_key.value)) if self.listing is not None else None
        if model is not None:
            self.ask(model)

    def ask(self, model: CachedModel) -> None:
        context = self.context
        name = suggested_name(model.repo_id, (instance.label for instance in self._instances()))
        form = InstanceForm(model, name, gpu_hint(context.gpus()), context.actions.instance_problem)

        def chosen(values: dict[str, Any] | None) -> None:
            if values is not None:  # the app's worker: it goes on when this screen is closed
                self.app.run_worker(add_and_start(self.app, context, values), group="commands")

        self.app.push_screen(form, chosen)


async def add_and_start(app: Any, context: ModelsContext, values: Mapping[str, Any]) -> None:
    """Write the entry, say so, then start it (its failure is a notification with its log)."""
    actions = context.actions
    try:
        label, said = await actions.add_instance(values)
    except CommandError as error:
        app.notify(escape(str(error)), title="add instance", severity="error")
        return
    app.notify(escape(said), title="add instance")
    await context.run_command("start", lambda: actions.start_instance(label))


# --- the form ----------------------------------------------------------------------------------


class InstanceForm(ModalScreen[dict[str, Any] | None]):
    """Asks a new instance's name, devices and memory share; dismisses with its
    `[[instances]]` keys once the config's own checks pass (else says what is wrong), or None."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    FIELDS = ("instance-name", "instance-devices", "instance-memory")

    def __init__(self, model: CachedModel, name: str, hint: str, check: Callable[[Mapping[str, Any]], str | None]) -> None:
        super().__init__()
        self.model = model
        self.name_given = name
        self.hint = hint
        self.check = check

    def compose(self) -> ComposeResult:
        model = self.model
        with Vertical(id="instance-box", classes="dialog"):
            yield Static(
                f"A new [b][[instances]][/b] entry for [b]{escape(model.repo_id)}[/b] ({model.kind}, {size_text(model.size)}), "
                "written to the config file; then mvtui starts it."
            )
            yield Static(escape(self.hint), classes="form-hint")
            with Grid(id="instance-fields"):
                yield Static("name", classes="form-label")
                yield Input(value=self.name_given, placeholder="the entry's name", id="instance-name", compact=True)
                yield Static("devices", classes="form-label")
                yield Input(placeholder="GPU indices: 0,1 (empty: GPU 0)", id="instance-devices", compact=True)
                yield Static("memory share", classes="form-label")
                yield Input(value="0.85", placeholder="of each GPU's memory: 0.85", id="instance-memory", compact=True)
            yield Static(
                "devices: CUDA_VISIBLE_DEVICES · memory share: vLLM's gpu_memory_utilization, the share of each GPU it takes",
                classes="form-hint",
            )
            yield Static(id="instance-error")

    def on_mount(self) -> None:
        box = self.query_one("#instance-box")
        box.border_title = "add an instance"
        box.border_subtitle = "Enter: next field, on the last one add and start · Esc: cancel"
        self.query_one("#instance-devices", Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        index = self.FIELDS.index(event.input.id or "")
        if index < len(self.FIELDS) - 1:
            self.query_one(f"#{self.FIELDS[index + 1]}", Input).focus()
            return
        values, problem = self.values()
        problem = problem or self.check(values)
        if problem:
            self.say(problem)
        else:
            self.dismiss(values)

    def values(self) -> tuple[dict[str, Any], str | None]:
        """The entry's keys from the fields, or what is wrong with them."""
        name = self.query_one("#instance-name", Input).value.strip()
        devices = parse_devices(self.query_one("#instance-devices", Input).value)
        memory = parse_share(self.query_one("#instance-memory", Input).value)
        values: dict[str, Any] = {"model": self.model.repo_id}
        if name:
            values["name"] = name
        if isinstance(devices, str):
            return values, devices
        if devices:
            values["devices"] = devices
        if isinstance(memory, str):
            return values, memory
        values["gpu_memory_utilization"] = memory
        return values, None

    def say(self, problem: str) -> None:
        self.query_one("#instance-error", Static).update(Text(problem.replace("instances[0].", "")))

    def action_cancel(self) -> None:
        self.dismiss(None)


def parse_devices(text: str) -> list[int] | str:
    """`0,1` -> [0, 1]; what is wrong otherwise."""
    parts = [part.strip() for part in text.replace(" ", ",").split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        return f"devices: GPU indices separated by commas, like 0,1; got {text.strip()!r}"
    return [int(part) for part in parts]


def parse_share(text: str) -> float | str:
    try:
        share = float(text.strip())
    except ValueError:
        return f"memory share: a number between 0 and 1, like 0.5; got {text.strip()!r}"
    if not 0 < share <= 1:
        return f"memory share: more than 0 and at most 1, like 0.5; got {text.strip()}"
    return share
