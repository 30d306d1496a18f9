"""The core's lasting conditions (a broken config file, an admin API that is off or moved)
as notifications, each told once when it appears and once when it clears.

The dashboard's tick hands `Notices.changes` the core's current state; it answers with what
to notify now. The banner under the top line shows the same conditions for as long as they
last (panels.problems_banner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mvtui.errors import ConfigError
from mvtui.ui.core import AdminState
from mvtui.ui.panels import plural

Severity = Literal["information", "warning", "error"]


@dataclass(frozen=True)
class Notice:
    message: str  # plain text (not markup)
    title: str
    severity: Severity = "information"
    timeout: float = 8.0


class Notices:
    def __init__(self) -> None:
        self._config_error: str | None = None
        self._admin_problem: str | None = None
        self._admin_notice: str | None = None

    def changes(self, config_error: ConfigError | None, admin: AdminState | None) -> list[Notice]:
        return [*self._config(config_error), *self._admin(admin)]

    def _config(self, error: ConfigError | None) -> list[Notice]:
        said = str(error) if error is not None else None
        if said == self._config_error:
            return []
        was_broken, self._config_error = self._config_error is not None, said
        if error is None:
            return [Notice("the config file is valid again and in force", "config file fixed")] if was_broken else []
        return [Notice(config_error_message(error), "config file broken", "error", 30.0)]

    def _admin(self, admin: AdminState | None) -> list[Notice]:
        problem = admin.problem if admin is not None else None
        notice = admin.notice if admin is not None else None
        found = []
        if problem != self._admin_problem and problem is not None:
            found.append(Notice(f"admin API off: {problem}", "admin API", "warning", 30.0))
        if notice != self._admin_notice and notice is not None and admin is not None:
            found.append(Notice(f"admin API on {admin.url} ({notice})", "admin API", "information", 12.0))
        self._admin_problem, self._admin_notice = problem, notice
        return found


def config_error_message(error: ConfigError) -> str:
    """Where, how many problems, and where to read them: the banner under the top line has
    every one in full (a notification covering it would hide them on a small terminal)."""
    where = str(error.path) if error.path else "the config"
    return f"{where}: {plural(len(error.problems), 'problem')}, each in full under the top line. The last good config stays in force."


def still_broken(error: ConfigError) -> str:
    return f"the config file still has {plural(len(error.problems), 'problem')}, each under the top line"
