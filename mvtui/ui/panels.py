"""The dashboard's panels as plain functions from cluster state to Rich renderables.

Nothing here touches Textual or the network: a panel takes a server (or a GPU snapshot,
or the request log), the width it may use and a `Palette`, and returns text. That keeps
every panel testable by rendering it to a Rich console, and the widgets thin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from mvtui.cluster.fleet_status import FleetStatus
from mvtui.cluster.state import ClusterEvent, ClusterSummary, Health, RequestRecord, Server
from mvtui.config.schema import InstanceConfig, ServerConfig
from mvtui.errors import ConfigError
from mvtui.gpu import Gpu, GpuSnapshot
from mvtui.routing.speed import Speed

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
    def from_variables(cls, variables: Mapping[str, str]) -> Palette:
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


IRREGULAR_PLURALS = {"retry": "retries", "process": "processes", "is": "are", "was": "were"}


def plural(count: int, noun: str) -> str:
    """`1 server`, `2 servers`, `0 retries`: a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else IRREGULAR_PLURALS.get(noun, noun + 's')}"


def one_line(message: str) -> str:
    """A message of several lines (a config error) on one line, for a one-line-per-event pane."""
    return "; ".join(line.strip().removeprefix("- ") for line in message.splitlines() if line.strip())


NAME_SEPARATORS = ".:/@"


def distinct_labels(names: Iterable[str], width: int) -> dict[str, str]:
    """Each name cut to `width` characters so that names that differ still look different:
    whole when it fits; else from the part where it differs from its closest neighbour (the
    port of `127.0.0.1:31234`, the host of `gpu-7.lan:8000`), an ellipsis marking each cut."""
    unique = sorted(set(names))
    return {name: _distinct(name, unique, width) for name in unique}


def _distinct(name: str, names: Sequence[str], width: int) -> str:
    if len(name) <= width:
        return name
    start = max((_common_prefix(name, other) for other in names if other != name), default=0)
    while start > 0 and name[start - 1] not in NAME_SEPARATORS:
        start -= 1  # back to the start of the part it differs in
    if start == 0 or width < 3:
        return _fit(name, width)
    if len(name) - start < width:
        return "…" + name[-(width - 1) :]
    return "…" + name[start : start + width - 2] + "…"


def _common_prefix(first: str, second: str) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


# --- the cluster line -------------------------------------------------------------------


COUNTED_FIRST = ("up", "asleep", "down")


def server_group(server: Server) -> str:
    """What the top line counts a server as: up (awake and answering), asleep, down, or its
    managed instance's lifecycle (starting, stopping, stopped)."""
    lifecycle = server.lifecycle
    if lifecycle == "error":
        return "down"
    if lifecycle and lifecycle != "running":
        return lifecycle
    if server.asleep:
        return "asleep"
    return {Health.UP: "up", Health.DOWN: "down"}.get(server.health.state, "unknown")


def server_counts(servers: Iterable[Server]) -> dict[str, int]:
    """Servers by `server_group`: up, asleep and down always, then any other group there is."""
    counts = dict.fromkeys(COUNTED_FIRST, 0)
    for server in servers:
        group = server_group(server)
        counts[group] = counts.get(group, 0) + 1
    return counts


def _counts_text(counts: Mapping[str, int], palette: Palette, compact: bool) -> Text:
    """`2 up · 1 asleep · 0 down`; on a narrow line the groups with none are left out."""
    parts = []
    for group, number in counts.items():
        if compact and number == 0 and group != "up":
            continue
        role = "asleep" if group == "asleep" else state_role(group)
        color = palette.role(role) if number else palette.muted
        parts.append(Text.assemble((str(number), f"bold {color}"), (f" {group}", palette.muted)))
    return Text(" · ", style=palette.muted).join(parts)


def _health_color(counts: Mapping[str, int], palette: Palette) -> str:
    total = sum(counts.values())
    if total == 0:
        return palette.muted
    awake = counts.get("up", 0) + counts.get("asleep", 0)
    return palette.up if awake == total else palette.busy if awake else palette.down


def cluster_line(
    summary: ClusterSummary,
    router_url: str | None,
    palette: Palette,
    width: int,
    note: str = "",
    counts: Mapping[str, int] | None = None,
    fleet: FleetStatus | None = None,
) -> Text:
    """The line on top: servers up, asleep and down, rates, errors, retries, the router's address."""
    compact = width < 110
    counts = counts if counts is not None else {"up": summary.up, "down": summary.total - summary.up}
    sep = Text("  " if compact else "   ")
    parts = [
        Text.assemble(("● ", _health_color(counts, palette)), _counts_text(counts, palette, compact)),
        Text.assemble((rate(summary.request_rate), f"bold {palette.text}"), (" req/s", palette.muted)),
        Text.assemble((rate(summary.token_rate), f"bold {palette.text}"), (" tok/s", palette.muted)),
        _count_part(summary.errors, "err" if compact else "error", palette.down, palette),
        _count_part(summary.retries, "retry", palette.busy, palette),
    ]
    if summary.queued:
        parts.append(Text.assemble((str(summary.queued), f"bold {palette.busy}"), (" queued", palette.muted)))
    if fleet is not None:
        parts.append(fleet_part(fleet, palette))
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


def fleet_part(fleet: FleetStatus, palette: Palette) -> Text:
    """`fleet r2 · 3 replicas`, or that Redis is away (then this replica works on its own)."""
    if fleet.degraded:
        return Text.assemble(("fleet ", palette.muted), (f"{fleet.name} · Redis away", f"bold {palette.busy}"))
    return Text.assemble(("fleet ", palette.muted), (f"{fleet.name} · {plural(len(fleet.replicas), 'replica')}", f"bold {palette.text}"))


def _count_part(number: int, noun: str, alarm: str, palette: Palette) -> Text:
    """`0 errors`, `1 retry`: the number bold, in `alarm` colour when it is not zero."""
    words = noun if noun == "err" else plural(number, noun).split(" ", 1)[1]
    return Text.assemble((str(number), f"bold {alarm if number else palette.text}"), (f" {words}", palette.muted))


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
    spark_width = max(4, min(16, (width - 28 - SPEED_WIDTH) // 2))  # labels, rates and gaps: 28 cells
    requests_now, tokens_now = server.current_rates()
    second = Text.assemble(
        ("req/s ", palette.muted),
        (f"{rate(requests_now):>5} ", palette.text),
        sparkline(server.stats.request_rate.values, spark_width, palette.spark_requests),
        ("  tok/s ", palette.muted),
        (f"{rate(tokens_now):>5} ", palette.text),
        sparkline(server.stats.token_rate.values, spark_width, palette.spark_tokens),
        "  ",
        speed_text(server.speed, palette, "ttft"),
        no_wrap=True,
    )
    lines = [first, second, *_router_view(server, palette)]
    if server.last_error:
        lines.append(_error_line(server, width, palette))
    return LINES.join(line[:width] if line.cell_len > width else line for line in lines)


# The longest `speed_text` with its label: `ttft 999 ms · 9.9k tok/s/seq`.
SPEED_WIDTH = 28


def speed_text(speed: Speed | None, palette: Palette, label: str = "TTFT") -> Text:
    """`TTFT 120 ms · 48 tok/s/seq`: the router's learned time to first token and one sequence's
    decoding speed (routing/speed.py), `–` for what it has not learned yet."""
    per_sequence = speed.tokens_per_s if speed is not None else None
    return Text.assemble(
        (f"{label} ", palette.muted),
        (duration(speed.ttft if speed is not None else None), palette.text),
        (" · ", palette.muted),
        ("–" if per_sequence is None else rate(per_sequence), palette.text),
        (" tok/s/seq", palette.muted),
        no_wrap=True,
    )


def learned_speeds(server: Server) -> list[tuple[str, Speed]]:
    """Its models whose speed the router has learned something of, in its order."""
    speeds = ((model, server.speed_of(model)) for model in server.models)
    return [(model, speed) for model, speed in speeds if speed is not None and (speed.ttft is not None or speed.tpot is not None)]


def _router_view(server: Server, palette: Palette) -> list[Text]:
    """What the router knows beyond the server's own numbers: its breaker, and that it has
    no /metrics (so the zeros above are not readings: load comes from requests in flight)."""
    lines = []
    state = server.breaker_state
    if state == "open":
        wait = server.breaker.retry_in(time.monotonic())
        lines.append(Text.assemble(("breaker ", palette.muted), (f"open, retry in {wait:.0f} s", f"bold {palette.down}")))
    elif state == "half-open":
        lines.append(Text.assemble(("breaker ", palette.muted), ("half-open (probing)", f"bold {palette.busy}")))
    if server.has_metrics is False:
        lines.append(
            Text.assemble(("no metrics", f"bold {palette.muted}"), (" from this server: load from requests in flight", palette.muted))
        )
    return lines


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
    requests_now, tokens_now = server.current_rates()
    rows = [
        ("models", _models_and_speed(server, value_width, palette)),
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
            Text.assemble(
                bar(server.metrics.kv_cache_usage, gauge, palette),
                (f" {_kv_percent(server):>7}", palette.text),
                "  ",
                _load_text(server, palette),
            ),
        ),
        (
            "req/s",
            Text.assemble(
                (f"{rate(requests_now):>5} ", f"bold {palette.text}"),
                sparkline(stats.request_rate.values, spark_width, palette.spark_requests),
            ),
        ),
        (
            "tok/s",
            Text.assemble(
                (f"{rate(tokens_now):>5} ", f"bold {palette.text}"), sparkline(stats.token_rate.values, spark_width, palette.spark_tokens)
            ),
        ),
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
    rows += [("router", line) for line in _router_view(server, palette)]
    if server.last_error:
        rows.append(("last error", Text(_fit(server.last_error, value_width), style=palette.down if not server.is_up else palette.muted)))
    lines = []
    for label, value in rows:
        value.truncate(value_width, overflow="ellipsis")
        lines.append(Text.assemble((f"{label:<{label_width}} ", palette.muted), value, no_wrap=True))
    return LINES.join(lines)


def _models_and_speed(server: Server, width: int, palette: Palette) -> Text:
    """Its models, and on the right what the router learned of its (first model's) speed."""
    speed = speed_text(server.speed, palette, "learned TTFT")
    models = _fit(", ".join(server.models) or "none yet", max(12, width - speed.cell_len - 2))
    line = Text(models, style=f"bold {palette.text}", no_wrap=True)
    line.append(" " * max(2, width - len(models) - speed.cell_len))
    line.append_text(speed)
    return line


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
    for gpu, name in zip(snapshot.gpus, names, strict=True):
        owned = ", ".join(owners(gpu))
        line = Text.assemble(
            (f"{gpu.index} ", f"bold {palette.text}"),
            (
                f"{_fit(name[len(str(gpu.index)) + 1 :], name_width - len(str(gpu.index)) - 1):<{name_width - len(str(gpu.index)) - 1}} ",
                palette.text,
            ),
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


EVENT_SERVER_WIDTH = 16


def events_text(events: Sequence[ClusterEvent], height: int, width: int, palette: Palette) -> Text:
    """The last events that fit, newest at the bottom, one line each (a config error in full
    is in the banner under the top line)."""
    shown = list(events)[-height:] if height > 0 else []
    if not shown:
        return Text("no events yet", style=palette.muted)
    names = distinct_labels({event.server for event in events}, EVENT_SERVER_WIDTH)  # apart from every name in the list
    lines = []
    for event in shown:
        role = _event_role(event.kind)
        lines.append(
            Text.assemble(
                (clock_time(event.at), palette.muted),
                "  ",
                (f"{names[event.server]:<{EVENT_SERVER_WIDTH}}", f"bold {palette.text}"),
                " ",
                (_fit(one_line(event.message), max(8, width - 28)), palette.role(role) if role != "idle" else palette.text),
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


REQUEST_FIXED_WIDTH = 8 + 2 + 6 + 2 + 8 + 2 + 8 + 2 + 6  # time, status, latency, ttft, tokens and the gaps


def requests_table(records: Sequence[RequestRecord], height: int, width: int, palette: Palette, *, server_column: bool = True) -> Text:
    """The last requests through the router that fit, newest at the bottom. The server column
    is as wide as its longest name where the models leave room, and a name cut to fit keeps
    the part that tells it from the others in the log (the port of `127.0.0.1:31234`). On a narrow pane
    the TTFT column goes first, and a row never wraps."""
    shown = list(records)[-max(0, height - 1) :] if height > 1 else []
    show_ttft = width - REQUEST_FIXED_WIDTH - 4 >= 20
    flexible = max(12, width - REQUEST_FIXED_WIDTH - 4 + (0 if show_ttft else 10))
    server_width = _server_column_width(shown, flexible) if server_column else 0
    model_width = flexible - server_width - (0 if server_column else 2)
    names = distinct_labels({record.server for record in records}, server_width)  # apart from every name in the log

    def row(cells: tuple[str, str, str, str, str, str, str], styles: tuple[str, ...]) -> Text:
        time_, model, server, status, latency, ttft, tokens = cells
        line = Text.assemble(
            (f"{time_:<8}  ", styles[0]),
            (f"{_fit(model, model_width):<{model_width}}  ", styles[1]),
            (f"{names.get(server, server):<{server_width}}  " if server_column else "", styles[2]),
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
    for record in shown:
        status_color = palette.up if record.status < 400 else palette.busy if record.status < 500 else palette.down
        lines.append(
            row(
                (
                    clock_time(record.at),
                    record.model,
                    record.server,
                    str(record.status),
                    duration(record.latency),
                    duration(record.ttft),
                    "–" if record.tokens is None else str(record.tokens),
                ),
                (palette.muted, palette.text, palette.text, f"bold {status_color}", palette.text, palette.muted, palette.text),
            )
        )
    return LINES.join(lines)


def _server_column_width(records: Sequence[RequestRecord], flexible: int) -> int:
    """As wide as the longest server name, but leaving the models at least as much room as
    their longest name needs, and the servers at least two fifths."""
    longest_server = max((len(record.server) for record in records), default=0)
    longest_model = max((len(record.model) for record in records), default=0)
    return min(max(len("server"), longest_server), max(flexible * 2 // 5, flexible - max(longest_model, len("model"))))


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


# --- the banner under the top line: what is broken now ----------------------------------------


def problems_banner(
    config_error: ConfigError | None, admin_problem: str | None, palette: Palette, reload_key: str = "r", fleet: FleetStatus | None = None
) -> Table | None:
    """A broken config file (its path and every problem), an admin API that is off and a fleet
    whose Redis is away, each in full and wrapped; None when nothing is wrong."""
    fleet_away = fleet is not None and fleet.degraded
    if config_error is None and admin_problem is None and not fleet_away:
        return None
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(no_wrap=True, width=1)
    grid.add_column(ratio=1)
    if config_error is not None:
        grid.add_row(Text("✕", style=f"bold {palette.down}"), config_error_head(config_error, palette, reload_key))
        grid.add_row("", _bullets([str(problem) for problem in config_error.problems], palette))
    if admin_problem is not None:
        grid.add_row(
            Text("!", style=f"bold {palette.busy}"),
            Text.assemble(("admin API off: ", f"bold {palette.busy}"), (admin_problem, palette.text)),
        )
    if fleet is not None and fleet.degraded:
        grid.add_row(Text("!", style=f"bold {palette.busy}"), fleet_away_text(fleet, palette))
    return grid


def fleet_away_text(fleet: FleetStatus, palette: Palette) -> Text:
    since = clock_time(fleet.since) if fleet.since else "now"
    return Text.assemble(
        (f"Redis {fleet.redis} unreachable since {since}", f"bold {palette.busy}"),
        (f" ({fleet.problem})" if fleet.problem else "", palette.text),
        (": routing on the last known shared state; drain, capacity, sleep and wake are refused until it is back", palette.text),
    )


def config_error_head(error: ConfigError, palette: Palette, reload_key: str = "r") -> Text:
    """`config file broken: PATH (2 problems)`, and what happens until it is fixed."""
    where = str(error.path) if error.path else "the config"
    return Text.assemble(
        ("config file broken: ", f"bold {palette.down}"),
        (where, f"bold {palette.text}"),
        (f" ({plural(len(error.problems), 'problem')}). ", palette.text),
        (
            f"The last good config stays in force until the file is fixed; it is read again when saved, or now with {reload_key}.",
            palette.muted,
        ),
    )


def _bullets(items: Sequence[str], palette: Palette) -> RenderableType:
    """One item a line, wrapped under its own text (a hanging indent)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, style=palette.muted)
    grid.add_column(style=palette.text)
    for item in items:
        grid.add_row("-", item)
    return grid


# --- a server's config entry, TOML-ish, without its secrets -------------------------------------

HIDDEN = "(set, not shown)"
SECRET_WORDS = ("key", "token", "secret", "password", "passwd")


def config_entry(config: ServerConfig | InstanceConfig, url: str, palette: Palette) -> Text:
    """`key = value` lines of a [servers] entry (every field) or an [[instances]] entry (the
    model and what differs from the defaults). The URL is shown without credentials, an
    api_key never, nor an environment variable or argument that looks like a secret."""
    rows: list[tuple[str, str]] = [("url", _toml(url))]
    for item in fields(config):
        value = getattr(config, item.name)
        derived = item.metadata.get("derived", False)  # not a key of the file
        if derived or item.name == "url" or (isinstance(config, InstanceConfig) and item.name != "model" and value == item.default):
            continue
        rows.append((item.name, _shown_value(item.name, value)))
    width = max(len(key) for key, _ in rows)
    return LINES.join(Text.assemble((f"{key:<{width}}", palette.muted), " = ", (value, palette.text)) for key, value in rows)


def _shown_value(name: str, value: object) -> str:
    if name == "api_key":
        return HIDDEN if value else "none"
    if name == "env" and isinstance(value, tuple):
        pairs = ", ".join(f"{key} = {_toml(HIDDEN if _secret(key) else text)}" for key, text in value)
        return f"{{ {pairs} }}"
    if name in ("command", "extra_args") and isinstance(value, tuple):
        return _toml(redact_args(value))
    return _toml(value)


def redact_args(args: Sequence[str]) -> tuple[str, ...]:
    """Command-line arguments with the value of any secret-looking option hidden
    (`--api-key X`, `--hf-token=X`)."""
    shown: list[str] = []
    hide_next = False
    for arg in args:
        flag, equals, _ = arg.partition("=")
        if hide_next:
            shown.append(HIDDEN)
        elif arg.startswith("-") and equals and _secret(flag):
            shown.append(f"{flag}={HIDDEN}")
        else:
            shown.append(arg)
        hide_next = arg.startswith("-") and not equals and _secret(arg)
    return tuple(shown)


def _secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# --- the details screen's parts ------------------------------------------------------------------


def details_head(server: Server, palette: Palette, width: int) -> Text:
    """Its models, its numbers now and its learned speed, wrapped between the pairs, never inside one."""
    stats = server.stats
    parts = [
        _pair("models", ", ".join(server.models) or "none yet", palette, f"bold {palette.text}"),
        _pair("running", f"{count(server.running)}/{server.capacity}", palette),
        _pair("waiting", count(server.waiting), palette),
        _pair("in flight", str(server.in_flight), palette),
        _load_text(server, palette),
        _pair("KV cache", _kv_percent(server), palette),
        _pair("requests", str(stats.requests), palette),
        _pair("errors", str(stats.errors), palette, palette.down if stats.errors else ""),
        _pair("retries", str(stats.retries), palette, palette.busy if stats.retries else ""),
        *_details_speeds(server, palette),
    ]
    return wrapped(parts, width, gap=3)


def _details_speeds(server: Server, palette: Palette) -> list[Text]:
    """The learned speed of its first model, or of each model when it has learned several."""
    learned = learned_speeds(server)
    if len(learned) < 2:
        return [speed_text(server.speed, palette, "learned TTFT")]
    return [speed_text(speed, palette, f"learned {model} TTFT") for model, speed in learned]


def wrapped(items: Sequence[Text], width: int, gap: int = 2) -> Text:
    """Items on lines of at most `width` cells, `gap` spaces apart, a line broken only between items."""
    lines: list[Text] = [Text(no_wrap=True)]
    for item in items:
        if lines[-1].cell_len and lines[-1].cell_len + gap + item.cell_len > width:
            lines.append(Text(no_wrap=True))
        if lines[-1].cell_len:
            lines[-1].append(" " * gap)
        lines[-1].append_text(item)
    return LINES.join(lines)


def server_events(server: Server, events: Sequence[ClusterEvent], palette: Palette) -> RenderableType:
    """Its last error, then its events, newest at the bottom, each in full (wrapped)."""
    if not (server.last_error or events):
        return Text("no events for it yet", style=palette.muted)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style=palette.muted)
    grid.add_column()
    if server.last_error:
        grid.add_row("last error", Text(server.last_error, style=palette.down if not server.is_up else palette.muted))
    for event in events:
        role = _event_role(event.kind)
        grid.add_row(clock_time(event.at), Text(event.message, style=palette.role(role) if role != "idle" else palette.text))
    return grid


def log_tail(lines: Sequence[str], palette: Palette) -> Text:
    if not lines:
        return Text("no output yet", style=palette.muted)
    return Text("\n".join(line.rstrip() for line in lines), style=palette.text, no_wrap=True, overflow="ellipsis")


def span_text(seconds: float) -> str:
    """`42 s`, `3 min`, `1 min 30 s`."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    return f"{minutes} min" + (f" {rest} s" if rest and minutes < 5 else "")
