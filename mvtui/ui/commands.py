"""The command palette (Textual's, ctrl+p): every command for every server by name ("sleep
gpu-2", "drain big", "details small") and the dashboard's own (reload, theme, help...).

The palette runs what the keys run: each entry calls the dashboard's `run_on` (a server's
command, with the same checks and notifications as its key) or one of its actions. The
dashboard builds the list (`PaletteSource.palette_commands`) each time the palette opens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from textual.command import DiscoveryHit, Hit, Hits, Provider

from mvtui.cluster.state import Server

NOT_NOW_WEIGHT = 0.5  # a command that does not apply now ranks below one that does


@dataclass(frozen=True)
class ServerCommand:
    """A command on one server, as the palette names it."""

    verb: str  # "sleep": the palette shows "sleep gpu-2"
    action: str  # the dashboard's action name (what `applies` and the greyed reasons know)
    help: str
    args: tuple[Any, ...] = ()


SERVER_COMMANDS: tuple[ServerCommand, ...] = (
    ServerCommand("details", "details", "plots, requests, errors, config and log"),
    ServerCommand("chat", "chat", "talk to its model through the router (starts or wakes it first)"),
    ServerCommand("drain", "drain", "no new requests; those in flight finish (live, until restart)"),
    ServerCommand("undrain", "undrain", "take new requests again (live, until restart)"),
    ServerCommand("drain+save", "drain_save", "drain or undrain, and write it to the config file"),
    ServerCommand("sleep", "sleep", "asks level 1 or 2; drains first"),
    ServerCommand("wake", "wake", "wake it up"),
    ServerCommand("start", "start", "start the managed instance"),
    ServerCommand("stop", "stop", "stop the managed instance"),
    ServerCommand("capacity +1", "capacity", "one more request at once (live, until restart)", (1,)),
    ServerCommand("capacity -1", "capacity", "one request fewer at once (live, until restart)", (-1,)),
    ServerCommand("save", "save", "write its live drain and capacity to the config file"),
    ServerCommand("remove", "remove_server", "asks: until restart, or from the config file too"),
    ServerCommand("log", "instance_log", "the managed instance's log, followed live"),
)


@dataclass(frozen=True)
class PaletteCommand:
    text: str
    help: str
    run: Callable[[], Any]  # what the palette calls (a coroutine function or a plain one)
    ready: bool = True  # False: it does not apply now (`help` says why; running it says so too)


Applies = Callable[[str, Server], bool | None]  # True: applies; None: greyed; False: hidden
Why = Callable[[str, Server], str]
RunOn = Callable[..., Awaitable[None]]  # (action, server, *args)


def server_commands(servers: Iterable[Server], applies: Applies, why: Why, run_on: RunOn) -> list[PaletteCommand]:
    """Each command for each server, but those hidden now (drain on a drained server, whose
    undrain is listed instead)."""
    found = []
    for server in servers:
        for command in SERVER_COMMANDS:
            state = applies(command.action, server)
            if state is False:
                continue
            found.append(
                PaletteCommand(
                    f"{command.verb} {server.name}",
                    command.help if state else f"not now: {why(command.action, server)}",
                    _bound(run_on, command, server),
                    ready=bool(state),
                )
            )
    return found


def _bound(run_on: RunOn, command: ServerCommand, server: Server) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await run_on(command.action, server, *command.args)

    return run


class PaletteSource(Protocol):
    def palette_commands(self) -> list[PaletteCommand]: ...


class DashboardCommands(Provider):
    """Textual's palette provider over the dashboard's commands."""

    commands: list[PaletteCommand]

    async def startup(self) -> None:
        source: Any = self.app
        self.commands = source.palette_commands() if hasattr(source, "palette_commands") else []

    async def discover(self) -> Hits:
        """With nothing typed: what applies now."""
        for command in self.commands:
            if command.ready:
                yield DiscoveryHit(command.text, command.run, text=command.text, help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self.commands:
            score = matcher.match(command.text)
            if score > 0:
                weight = 1.0 if command.ready else NOT_NOW_WEIGHT
                yield Hit(score * weight, matcher.highlight(command.text), command.run, text=command.text, help=command.help)
