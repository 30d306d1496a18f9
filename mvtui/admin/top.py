"""`mvtui top`: what the dashboard shows, once, as plain text, from the admin API's answers.

For scripts and for terminals where the dashboard cannot run (an ssh session without a full
terminal, a log file). Cells hold no spaces (but a state such as `sleeping L1`), so `awk`
reads the columns. Standard library only, like the rest of the CLI.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

Row = Sequence[str]

# TTFT-EWMA and TOK/S/SEQ: what the router learned of its first model's speed (for routing).
SERVER_NUMBERS = ("RUN/CAP", "WAIT", "LOAD", "KV", "IN-FLIGHT", "REQ/S", "TOK/S", "TTFT-P50", "TTFT-EWMA", "TOK/S/SEQ")
SERVER_COLUMNS = ("NAME", "STATE", "MODELS", *SERVER_NUMBERS)
GPU_COLUMNS = ("GPU", "NAME", "MEMORY", "UTIL", "TEMP")
NUMERIC = {*SERVER_NUMBERS, "GPU", "MEMORY", "UTIL", "TEMP"}
GIB = 1024**3


def format_top(info: dict[str, Any], servers: list[dict[str, Any]]) -> str:
    """The header lines, the servers' table, then the GPUs (or why there are none)."""
    parts = [header(info, servers), servers_table(servers) if servers else "no servers (add [servers] or [[instances]] to the config)"]
    parts.append(gpus_text(info.get("gpus") or {}))
    return "\n\n".join(parts)


def header(info: dict[str, Any], servers: list[dict[str, Any]]) -> str:
    totals = (
        f"{states_phrase(servers)}; {info['in_flight']} in flight, "
        f"{rate(sum(server.get('request_rate') or 0 for server in servers))} req/s, "
        f"{rate(sum(server.get('token_rate') or 0 for server in servers))} tok/s, "
        f"{counted(sum(server['errors'] for server in servers), 'error')}, "
        f"{counted(sum(server['retries'] for server in servers), 'retry', 'retries')}"
    )
    lines = [f"mvtui {info['version']}  router {info['router_url']}  policy {info['policy']}", totals]
    if info.get("config_error"):
        lines.append(f"config error (the last good config stays in force): {info['config_error']}")
    return "\n".join(lines)


def states_phrase(servers: list[dict[str, Any]]) -> str:
    """`3 servers: 2 up, 1 sleeping L1`: awake, asleep and down counted apart."""
    states = Counter(server["state"] for server in servers)
    shown = ", ".join(f"{number} {state}" for state, number in states.items())
    return counted(len(servers), "server") + (f": {shown}" if shown else "")


def servers_table(servers: list[dict[str, Any]]) -> str:
    return aligned(SERVER_COLUMNS, [server_row(server) for server in servers])


def server_row(server: dict[str, Any]) -> Row:
    return (
        server["name"],
        server["state"],
        ",".join(server["models"]) or "-",
        f"{amount(server['running'])}/{server['capacity']}",
        amount(server["waiting"]),
        f"{server['load']:.2f}",
        "n/a" if server.get("kv_cache_usage") is None else f"{server['kv_cache_usage'] * 100:.0f}%",
        str(server["in_flight"]),
        rate(server.get("request_rate") or 0),
        rate(server.get("token_rate") or 0),
        duration(server.get("ttft_p50")),
        duration(server.get("ttft_s")),
        "-" if server.get("tokens_per_s_per_seq") is None else rate(server["tokens_per_s_per_seq"]),
    )


def gpus_text(gpus: dict[str, Any]) -> str:
    devices = gpus.get("devices")
    if not devices:
        return f"GPUs: not available ({gpus.get('unavailable') or 'unknown'})"
    return aligned(GPU_COLUMNS, [gpu_row(gpu) for gpu in devices])


def gpu_row(gpu: dict[str, Any]) -> Row:
    used, total = gpu.get("memory_used"), gpu.get("memory_total")
    memory = "n/a" if used is None or total is None else f"{used / GIB:.1f}/{total / GIB:.0f}GiB"
    utilization, temperature = gpu.get("utilization"), gpu.get("temperature")
    return (
        str(gpu["index"]),
        str(gpu["name"]).removeprefix("NVIDIA "),
        memory,
        "n/a" if utilization is None else f"{utilization}%",
        "n/a" if temperature is None else f"{temperature}C",
    )


def aligned(header: Row, rows: Sequence[Row]) -> str:
    """Columns two spaces apart; numbers right-aligned, words left-aligned."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(row: Row) -> str:
        cells = (cell.rjust(width) if name in NUMERIC else cell.ljust(width) for cell, width, name in zip(row, widths, header, strict=True))
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in [header, *rows])


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`1 server`, `2 servers`, `0 retries`."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def amount(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def rate(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"
