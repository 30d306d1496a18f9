"""The dashboard's panels as plain functions from cluster state to Rich renderables.

Nothing here touches Textual or the network: a panel takes a server (or a GPU snapshot,
or the request log), the width it may use and a `Palette`, and returns text. That keeps
every panel testable by rendering it to a Rich console, and the widgets thin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from rich.text import Text

from mvtui.cluster.state import ClusterEvent, ClusterSummary, RequestRecord, Server
from mvtui.gpu import Gpu, GpuSnapshot

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
BAR_EIGHTHS = " ▏▎▍▌▋▊▉"
GIB = 1024**3
# Joins panel lines: a panel's lines are cut at the edge, never wrapped (its height stays put).
LINES = Text("\n", no_wrap=True, overflow="ellipsis")

# Every state word the cluster can show, by the role that picks its colour and glyph.
STATE_ROLES = {
    "up": "up",
    "running": "up",
    "down": "down",
    "error": "down",
    "draining": "busy",
    "drained": "busy",
    "removing": "busy",
    "waking": "starting",
    "starting": "starting",
    "stopping": "busy",
    "stopped": "idle",
    "unknown": "idle",
}
ROLE_GLYPHS = {"up": "●", "down": "✕", "busy": "◐", "asleep": "◌", "starting": "◔", "idle": "○"}


@dataclass(frozen=True)
class Palette:
    """Colours for the panels, read from the active theme's CSS variables."""

    text: str = "#e0e0e0"
    muted: str = "#8a8f98"
    up: str = "#4ebf71"
    down: str = "#e05561"
    busy: str = "#e5b045"
    asleep: str = "#8aa4ff"
    starting: str = "#56b6c2"
    idle: str = "#8a8f98"
    bar_empty: str = "#3a3f4b"
    bar_low: str = "#4ebf71"
    bar_mid: str = "#e5b045"
    bar_high: str = "#e05561"
    spark_requests: str = "#56b6c2"
    spark_tokens: str = "#c678dd"
    accent: str = "#ffa62b"
    disabled: str = "#4b5360"

    @classmethod
    def from_variables(cls, variables: Mapping[str, str]) -> "Palette":
        """Take each colour from a `state-*`/`bar-*`/`spark-*` variable, else a theme base colour."""

        def pick(*names: str) -> str:
            for name in names:
                value = variables.get(name)
                if value and not value.startswith("$"):
                    return value
            return getattr(cls, names[-1].replace("-", "_"), cls.text)

        return cls(
            text=pick("foreground", "text"),
            muted=pick("foreground-muted", "foreground-darken-2", "muted"),
            up=pick("state-up", "success", "up"),
            down=pick("state-down", "error", "down"),
            busy=pick("state-busy", "warning", "busy"),
            asleep=pick("state-asleep", "secondary", "asleep"),
            starting=pick("state-starting", "primary", "starting"),
            idle=pick("state-idle", "foreground-muted", "idle"),
            bar_empty=pick("bar-empty", "panel-lighten-1", "bar_empty"),
            bar_low=pick("bar-low", "success", "bar_low"),
            bar_mid=pick("bar-mid", "warning", "bar_mid"),
            bar_high=pick("bar-high", "error", "bar_high"),
            spark_requests=pick("spark-requests", "primary", "spark_requests"),
            spark_tokens=pick("spark-tokens", "accent", "spark_tokens"),
            accent=pick("accent", "accent"),
            disabled=pick("key-disabled", "disabled"),
        )

    def role(self, role: str) -> str:
        return getattr(self, role, self.idle)


def state_role(state: str) -> str:
    if state.startswith("sleeping"):
        return "asleep"
    return STATE_ROLES.get(state, "idle")


def state_label(state: str, palette: Palette) -> Text:
    """The state as glyph and word in its colour: never colour alone."""
    role = state_role(state)
    return Text(f"{ROLE_GLYPHS[role]} {state}", style=f"bold {palette.role(role)}")


# --- small pieces -----------------------------------------------------------------------


def sparkline(values: Iterable[float], width: int, color: str) -> Text:
    """The last `width` values as block characters, scaled to the largest of them."""
    recent = list(values)[-width:] if width > 0 else []
    top = max(recent, default=0.0)
    cells = []
    for value in recent:
        if top <= 0 or value <= 0:
            cells.append(" " if top <= 0 else SPARK_BLOCKS[0])
        else:
            cells.append(SPARK_BLOCKS[min(len(SPARK_BLOCKS) - 1, int(value / top * (len(SPARK_BLOCKS) - 1) + 0.5))])
    return Text(" " * (width - len(recent)) + "".join(cells), style=color, no_wrap=True)


def bar(fraction: float | None, width: int, palette: Palette) -> Text:
    """A horizontal gauge with eighth-cell resolution, coloured by how full it is."""
    if width <= 0:
        return Text()
    if fraction is None:
        return Text("·" * width, style=palette.muted)
    fraction = min(1.0, max(0.0, fraction))
    color = palette.bar_low if fraction < 0.7 else palette.bar_mid if fraction < 0.9 else palette.bar_high
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    filled = "█" * full + (BAR_EIGHTHS[part] if part and full < width else "")
    text = Text(filled, style=f"{color} on {palette.bar_empty}", no_wrap=True)
    text.append(" " * (width - len(filled)), style=f"on {palette.bar_empty}")
    return text


def recent(values: Sequence[float], samples: int = 4) -> float:
    """The mean of the last few per-scrape rates: one scrape interval alone is too jumpy to read."""
    window = list(values)[-samples:]
    return sum(window) / len(window) if window else 0.0


def current_rates(server: Server) -> tuple[float, float]:
    """Requests/s and tokens/s now; a server that is down or asleep is not scraped, so its
    history (still drawn in the sparklines) says nothing about now."""
    if not server.is_up or server.asleep:
        return 0.0, 0.0
    return recent(server.stats.request_rate.values), recent(server.stats.token_rate.values)


def rate(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.1f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def count(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def clock_time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _fit(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + "…" if width > 0 else ""


def _pair(label: str, value: str, palette: Palette, value_style: str = "") -> Text:
    return Text.assemble((label, palette.muted), " ", (value, value_style or palette.text))


# --- the cluster line -------------------------------------------------------------------


def cluster_line(summary: ClusterSummary, router_url: str | None, palette: Palette, width: int, note: str = "") -> Text:
    """The line on top: servers up of total, rates, errors, retries, the router's address."""
    compact = width < 110
    if summary.total == 0:
        up_color = palette.muted
    elif summary.up == summary.total:
        up_color = palette.up
    else:
        up_color = palette.busy if summary.up else palette.down
    sep = Text("  " if compact else "   ")
    parts = [
        Text.assemble(("● ", up_color), (f"{summary.up}/{summary.total}", f"bold {up_color}"), (" up", palette.muted)),
        Text.assemble((rate(summary.request_rate), f"bold {palette.text}"), (" req/s", palette.muted)),
        Text.assemble((rate(summary.token_rate), f"bold {palette.text}"), (" tok/s", palette.muted)),
        Text.assemble((str(summary.errors), f"bold {palette.down if summary.errors else palette.text}"), (" err" if compact else " errors", palette.muted)),
        Text.assemble((str(summary.retries), f"bold {palette.busy if summary.retries else palette.text}"), (" retries", palette.muted)),
    ]
    if not compact:
        parts.insert(3, Text.assemble((str(summary.in_flight), f"bold {palette.text}"), (" in flight", palette.muted)))
    line = Text(no_wrap=True, overflow="ellipsis")
    if not compact:
        line.append("mvtui", style=f"bold {palette.accent}")
        line.append_text(sep)
    line.append_text(Text(sep.plain).join(parts))
    if note:
        line.append_text(sep)
        line.append(note, style=f"bold {palette.busy}")
    address = router_url or "starting…"
    room = width - line.cell_len - len(sep.plain)
    if room >= len(address) + (0 if compact else 7):
        line.append_text(sep)
        if not compact:
            line.append("router ", style=palette.muted)
        line.append(address, style=f"underline {palette.text}")
    return line


# --- a server ---------------------------------------------------------------------------


def server_title(server: Server) -> str:
    """The pane's border title in Textual content markup (theme variables resolve there)."""
    role = state_role(server.state)
    name = _escape(server.name)
    url = _escape(server.display_url)
    return f"[bold $state-{role}]{ROLE_GLYPHS[role]} {server.state}[/]  [bold]{name}[/]  [$foreground-muted]{url}[/]"


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def server_body(server: Server, width: int, palette: Palette, *, detailed: bool) -> Text:
    return _detailed_body(server, width, palette) if detailed else _compact_body(server, width, palette)


def _load_text(server: Server, palette: Palette) -> Text:
    load = server.load
    color = palette.text if load < 1 else palette.busy if load < 1.5 else palette.down
    return _pair("load", f"{load:.2f}", palette, color)


def _kv_percent(server: Server) -> str:
    usage = server.metrics.kv_cache_usage
    return "n/a" if usage is None else f"{usage * 100:.0f}%"


def _compact_body(server: Server, width: int, palette: Palette) -> Text:
    bar_width = 10 if width >= 74 else 6
    fields = Text(no_wrap=True).join(
        [
            _pair("run", f"{count(server.running)}/{server.capacity}", palette),
            Text("  ") + _pair("wait", count(server.waiting), palette),
            Text("  ") + _pair("fly", str(server.in_flight), palette),
            Text("  ") + _load_text(server, palette),
            Text("  KV ", style=palette.muted) + bar(server.metrics.kv_cache_usage, bar_width, palette),
            Text(f" {_kv_percent(server):>4}", style=palette.text),
        ]
    )
    models = _fit(", ".join(server.models) or "no models", max(4, width - fields.cell_len - 2))
    first = Text(models, style=f"bold {palette.text}", no_wrap=True)
    first.append(" " * max(2, width - len(models) - fields.cell_len))
    first.append_text(fields)
    spark_width = max(4, min(16, (width - 46) // 2))
    requests_now, tokens_now = current_rates(server)
    second = Text.assemble(
        ("req/s ", palette.muted),
        (f"{rate(requests_now):>5} ", palette.text),
        sparkline(server.stats.request_rate.values, spark_width, palette.spark_requests),
        ("  tok/s ", palette.muted),
        (f"{rate(tokens_now):>5} ", palette.text),
        sparkline(server.stats.token_rate.values, spark_width, palette.spark_tokens),
        ("  ttft ", palette.muted),
        (duration(server.stats.ttft_p50), palette.text),
        no_wrap=True,
    )
    lines = [first, second]
    if server.last_error:
        lines.append(_error_line(server, width, palette))
    return LINES.join(line[:width] if line.cell_len > width else line for line in lines)


def _error_line(server: Server, width: int, palette: Palette) -> Text:
    color = palette.down if not server.is_up else palette.muted
    return Text.assemble(("last error ", palette.muted), (_fit(server.last_error, width - 11), color), no_wrap=True)


def _detailed_body(server: Server, width: int, palette: Palette) -> Text:
    """Label-value lines; plain Text (no Rich table) because this is drawn several times a second."""
    label_width = 10
    value_width = max(24, width - label_width - 1)
    gauge = max(8, min(24, value_width - 36))
    stats = server.stats
    busy = server.running / server.capacity if server.capacity else None
    spark_width = max(8, value_width - 7)
    requests_now, tokens_now = current_rates(server)
    rows = [
        ("models", Text(_fit(", ".join(server.models) or "none yet", value_width), style=f"bold {palette.text}")),
        (
            "running",
            Text.assemble(
                bar(busy, gauge, palette),
                (f" {count(server.running):>3}/{server.capacity:<3}", palette.text),
                "  ",
                _pair("waiting", count(server.waiting), palette),
                "  ",
                _pair("in flight", str(server.in_flight), palette),
            ),
        ),
        (
            "KV cache",
            Text.assemble(bar(server.metrics.kv_cache_usage, gauge, palette), (f" {_kv_percent(server):>7}", palette.text), "  ", _load_text(server, palette)),
        ),
        ("req/s", Text.assemble((f"{rate(requests_now):>5} ", f"bold {palette.text}"), sparkline(stats.request_rate.values, spark_width, palette.spark_requests))),
        ("tok/s", Text.assemble((f"{rate(tokens_now):>5} ", f"bold {palette.text}"), sparkline(stats.token_rate.values, spark_width, palette.spark_tokens))),
        (
            "TTFT p50",
            Text.assemble(
                (f"{duration(stats.ttft_p50):<8}", palette.text),
                "  ",
                _pair("requests", str(stats.requests), palette),
                "  ",
                _pair("errors", str(stats.errors), palette, palette.down if stats.errors else ""),
                "  ",
                _pair("retries", str(stats.retries), palette, palette.busy if stats.retries else ""),
            ),
        ),
    ]
    if server.last_error:
        rows.append(("last error", Text(_fit(server.last_error, value_width), style=palette.down if not server.is_up else palette.muted)))
    lines = []
    for label, value in rows:
        value.truncate(value_width, overflow="ellipsis")
        lines.append(Text.assemble((f"{label:<{label_width}} ", palette.muted), value, no_wrap=True))
    return LINES.join(lines)


# --- GPUs -------------------------------------------------------------------------------


Owners = Callable[[Gpu], Sequence[str]]


def gpu_unavailable_line(snapshot: GpuSnapshot | None, palette: Palette) -> Text:
    why = "reading…" if snapshot is None else f"not available ({snapshot.unavailable})"
    return Text.assemble(("GPU: ", f"bold {palette.muted}"), (why, palette.muted), no_wrap=True, overflow="ellipsis")


def gpu_table(snapshot: GpuSnapshot, width: int, palette: Palette, owners: Owners) -> Text:
    """One line per GPU: name, memory bar, used of total, utilisation, temperature, owner."""
    names = [f"{gpu.index} {gpu.name.removeprefix('NVIDIA ')}" for gpu in snapshot.gpus]
    name_width = min(22, max(len(name) for name in names))
    gauge = max(8, min(30, width - name_width - 52))
    lines = []
    for gpu, name in zip(snapshot.gpus, names):
        owned = ", ".join(owners(gpu))
        line = Text.assemble(
            (f"{gpu.index} ", f"bold {palette.text}"),
            (f"{_fit(name[len(str(gpu.index)) + 1:], name_width - len(str(gpu.index)) - 1):<{name_width - len(str(gpu.index)) - 1}} ", palette.text),
            bar(gpu.memory_fraction, gauge, palette),
            (f" {_memory(gpu):>14}  ", palette.text),
            _pair("util", "N/A" if gpu.utilization is None else f"{gpu.utilization:>3}%", palette),
            (f"  {'N/A' if gpu.temperature is None else f'{gpu.temperature}°C':>5}  ", _temperature_color(gpu.temperature, palette)),
            (owned or _others(len(gpu.processes)), palette.accent if owned else palette.muted),
            no_wrap=True,
        )
        line.truncate(width, overflow="ellipsis")
        lines.append(line)
    return LINES.join(lines)


def _others(processes: int) -> str:
    if not processes:
        return "idle"
    return f"{processes} other process" + ("es" if processes > 1 else "")


def _memory(gpu: Gpu) -> str:
    if gpu.memory_used is None or gpu.memory_total is None:
        return "N/A"
    return f"{gpu.memory_used / GIB:.1f}/{gpu.memory_total / GIB:.0f} GiB"


def _temperature_color(temperature: int | None, palette: Palette) -> str:
    if temperature is None:
        return palette.muted
    return palette.text if temperature < 75 else palette.busy if temperature < 85 else palette.down


# --- logs -------------------------------------------------------------------------------


def events_text(events: Sequence[ClusterEvent], height: int, width: int, palette: Palette) -> Text:
    """The last events that fit, newest at the bottom."""
    shown = list(events)[-height:] if height > 0 else []
    if not shown:
        return Text("no events yet", style=palette.muted)
    lines = []
    for event in shown:
        role = _event_role(event.kind)
        lines.append(
            Text.assemble(
                (clock_time(event.at), palette.muted),
                "  ",
                (f"{_fit(event.server, 16):<16}", f"bold {palette.text}"),
                " ",
                (_fit(event.message, max(8, width - 28)), palette.role(role) if role != "idle" else palette.text),
                no_wrap=True,
            )
        )
    return LINES.join(lines)


EVENT_ROLES = {
    "down": "down",
    "error": "down",
    "config-error": "down",
    "drain": "busy",
    "removing": "busy",
    "stopping": "busy",
    "memory": "busy",
    "sleep": "asleep",
    "idle": "asleep",
    "wake": "starting",
    "starting": "starting",
    "up": "up",
    "running": "up",
}


def _event_role(kind: str) -> str:
    return EVENT_ROLES.get(kind, "idle")


def requests_table(records: Sequence[RequestRecord], height: int, width: int, palette: Palette) -> Text:
    """The last requests through the router that fit, newest at the bottom. On a narrow
    pane the TTFT column goes first, and a row never wraps."""
    fixed = 8 + 2 + 6 + 2 + 8 + 2 + 8 + 2 + 6  # time, status, latency, ttft, tokens and the gaps
    show_ttft = width - fixed - 4 >= 20
    flexible = max(12, width - fixed - 4 + (0 if show_ttft else 10))
    model_width = flexible * 3 // 5
    server_width = flexible - model_width

    def row(cells: tuple[str, str, str, str, str, str, str], styles: tuple[str, ...]) -> Text:
        time_, model, server, status, latency, ttft, tokens = cells
        line = Text.assemble(
            (f"{time_:<8}  ", styles[0]),
            (f"{_fit(model, model_width):<{model_width}}  ", styles[1]),
            (f"{_fit(server, server_width):<{server_width}}  ", styles[2]),
            (f"{status:>6}  ", styles[3]),
            (f"{latency:>8}  ", styles[4]),
            (f"{ttft:>8}  " if show_ttft else "", styles[5]),
            (f"{tokens:>6}", styles[6]),
            no_wrap=True,
        )
        line.truncate(width, overflow="crop")
        return line

    header = row(("time", "model", "server", "status", "latency", "ttft", "tokens"), (f"bold {palette.muted}",) * 7)
    lines = [header]
    for record in list(records)[-max(0, height - 1):] if height > 1 else []:
        status_color = palette.up if record.status < 400 else palette.busy if record.status < 500 else palette.down
        lines.append(
            row(
                (clock_time(record.at), record.model, record.server, str(record.status), duration(record.latency), duration(record.ttft), "–" if record.tokens is None else str(record.tokens)),
                (palette.muted, palette.text, palette.text, f"bold {status_color}", palette.text, palette.muted, palette.text),
            )
        )
    return LINES.join(lines)


# --- the key bar ------------------------------------------------------------------------


def key_bar(keys: Sequence[tuple[str, str, bool]], width: int, palette: Palette) -> Text:
    """`key description` pairs, enabled ones bright and the rest dimmed, wrapped to `width`."""
    lines: list[Text] = [Text(no_wrap=True)]
    for key, description, enabled in keys:
        item = Text.assemble(
            (key, f"bold {palette.accent}" if enabled else palette.disabled),
            " ",
            (description, palette.text if enabled else palette.disabled),
        )
        gap = 2 if lines[-1].cell_len else 0
        if lines[-1].cell_len + gap + item.cell_len > width and lines[-1].cell_len:
            lines.append(Text(no_wrap=True))
            gap = 0
        lines[-1].append(" " * gap)
        lines[-1].append_text(item)
    return LINES.join(lines)
