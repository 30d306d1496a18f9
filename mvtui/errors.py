"""mvtui's own exceptions, in one place, and how a failed connection reads to people.

Front ends turn these into what their user sees: the router into OpenAI error JSON, the
admin API into its JSON errors, the dashboard into a notification.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import aiohttp


class MvtuiError(Exception):
    """Base of every error mvtui raises on purpose; the message is for the operator."""


class CommandError(MvtuiError):
    """An operator command that cannot be carried out."""


class UnknownServer(CommandError):
    """No server or instance answers to the name or URL given."""


class Unavailable(CommandError):
    """No server can take a request for a model now (all asleep, starting or drained)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FleetUnavailable(CommandError):
    """A change that every replica must share, refused while the shared store (Redis) cannot
    be reached: nothing was changed."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, where the parser could tell."""

    where: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        at = f"line {self.line}, column {self.column}: " if self.line else ""
        return f"{at}{self.where}: {self.message}"


class ConfigError(MvtuiError):
    """A config that cannot be used, with every problem found in it."""

    def __init__(self, path: Path | str | None, problems: list[Problem]) -> None:
        self.path = Path(path).absolute() if path else None
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{self.path}: " if self.path else ""
        count = len(self.problems)
        lines = [f"{head}{count} problem{'s' if count != 1 else ''} in the config"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


class ConfigEditError(MvtuiError):
    """An edit of the config file that was not made. The file is untouched."""


class ListenError(MvtuiError):
    """A socket mvtui must listen on cannot be opened; the message names the address, the
    reason and what to do, in one line."""


class VllmError(MvtuiError):
    """A vLLM server answered a control call with an error status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


# A server that cannot be reached, or whose answer broke off mid-body.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)


def describe_error(error: BaseException) -> str:
    """A connection failure in a few words."""
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect: {error.os_error.strerror or error.os_error}" if error.os_error else "cannot connect"
    return str(error) or type(error).__name__
