"""The dashboard's keys, as data: every action once, with its default keys, its footer label
and its help text. The dashboard builds its bindings, its footer and its help screen from
this table, and the config parser checks `[ui.keys]` against it, so nothing is copied.

Key names are Textual's ("d", "D", "ctrl+d", "delete", "question_mark", "f5"); a single
character such as "?" or "+" is accepted and named as Textual names it. This module imports
neither Textual nor anything from mvtui: the config layer sits on top of it.
"""

from __future__ import annotations

import difflib
import string
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MODIFIERS = frozenset({"ctrl", "shift", "alt", "meta", "super", "hyper"})
UserKeys = tuple[tuple[str, tuple[str, ...]], ...]  # (action id, keys): a user's changes


@dataclass(frozen=True)
class KeyAction:
    id: str  # the name in [ui.keys]
    keys: tuple[str, ...]  # the default keys, Textual's names
    label: str  # in the footer
    help: str  # on the help screen
    call: str = ""  # the dashboard's action, with arguments ("capacity(1)"); default: the id
    alternate: str = ""  # a second action on the same keys, shown when the first is hidden
    footer: bool = True
    always: bool = False  # needs neither the core nor a selected server

    @property
    def action(self) -> str:
        return self.call or self.id

    @property
    def method(self) -> str:
        """The action's name without arguments: what `check_action` is asked about."""
        return self.action.split("(")[0]


ACTIONS: tuple[KeyAction, ...] = (
    KeyAction("select_previous", ("up", "k", "left"), "select", "select the previous server", "select(-1)", footer=False, always=True),
    KeyAction("select_next", ("down", "j", "right"), "select", "select the next server", "select(1)", footer=False, always=True),
    KeyAction(
        "drain",
        ("d",),
        "drain",
        "drain: no new requests, those in flight finish; again to undrain (live, until restart)",
        alternate="undrain",
    ),
    KeyAction("drain_save", ("D",), "drain+save", "drain or undrain, and write it to the config file", footer=False),
    KeyAction("sleep", ("s",), "sleep", "sleep the server (asks level 1 or 2)"),
    KeyAction("wake", ("w",), "wake", "wake a sleeping server"),
    KeyAction("start", ("S",), "start", "start a managed instance"),
    KeyAction("stop", ("X",), "stop", "stop a managed instance"),
    KeyAction("capacity_up", ("plus",), "+cap", "raise the server's capacity by one (live, until restart)", "capacity(1)"),
    KeyAction("capacity_down", ("minus",), "-cap", "lower the server's capacity by one (live, until restart)", "capacity(-1)"),
    KeyAction("save", ("p",), "save", "write the server's live drain and capacity to the config file", footer=False),
    KeyAction("add_server", ("a",), "add", "add a server (written to the config file)"),
    KeyAction(
        "remove_server",
        ("delete",),
        "remove",
        "remove the server, those in flight finish first: y until restart, Y from the config file too",
    ),
    KeyAction("reload", ("r",), "reload", "reload the config file now"),
    KeyAction("log", ("l",), "log", "the selected instance's log", "instance_log"),
    KeyAction(
        "details",
        ("enter",),
        "details",
        "the selected server's details: plots of the last 10 minutes, its requests, errors, config and log",
    ),
    KeyAction(
        "chat",
        ("c",),
        "chat",
        "chat with the selected server's model through the router, answers streamed (starts or wakes it)",
        footer=False,
    ),
    KeyAction(
        "models",
        ("M",),
        "models",
        "the models in the Hugging Face cache; Enter on one adds an [[instances]] entry and starts it",
        footer=False,
    ),
    KeyAction("requests", ("R",), "requests", "show or hide the request log (beside the events when wide)", "toggle_requests", always=True),
    KeyAction("filter", ("slash",), "filter", "filter servers by name, URL, model or state (Enter keeps it)", always=True),
    KeyAction("clear_filter", ("escape",), "clear", "clear the filter", footer=False, always=True),
    KeyAction("theme", ("t",), "theme", "next theme (remembered)", "cycle_theme", always=True),
    KeyAction(
        "palette",
        ("ctrl+p",),
        "commands",
        'the command palette: every command for every server, by name ("sleep gpu-2")',
        "command_palette",
        footer=False,
        always=True,
    ),
    KeyAction("help", ("question_mark",), "help", "this help", always=True),
    KeyAction("quit", ("q", "ctrl+c"), "quit", "quit: stop taking requests, let those in flight finish", always=True),
)
BY_ID: dict[str, KeyAction] = {action.id: action for action in ACTIONS}
DEFAULTS: dict[str, tuple[str, ...]] = {action.id: action.keys for action in ACTIONS}
# What `check_action` always allows: the keys that need neither the core nor a selection.
ALWAYS: frozenset[str] = frozenset(action.method for action in ACTIONS if action.always)


# --- key names ----------------------------------------------------------------------------

_RENAMED = {
    "solidus": "slash",
    "reverse_solidus": "backslash",
    "commercial_at": "at",
    "hyphen_minus": "minus",
    "plus_sign": "plus",
    "low_line": "underscore",
}
_SHOWN = {
    "enter": "↵",
    "up": "↑",
    "down": "↓",
    "left": "←",
    "right": "→",
    "delete": "del",
    "escape": "esc",
    "pageup": "pgup",
    "pagedown": "pgdn",
}


def _character_name(character: str) -> str:
    """Textual's name for one typed character: '?' -> 'question_mark', 'x' -> 'x'."""
    if character.isalnum():
        return character
    name = unicodedata.name(character, character).lower().replace("-", "_").replace(" ", "_")
    return _RENAMED.get(name, name)


_PUNCTUATION = {_character_name(character): character for character in string.punctuation}


def key_name(key: str) -> str:
    """A key as Textual names it: single characters by name, modifiers kept ('ctrl+/' -> 'ctrl+slash')."""
    key = key.strip()
    if len(key) == 1:
        return _character_name(key)
    modifiers, plus, base = key.rpartition("+")
    return f"{modifiers}{plus}{_character_name(base) if len(base) == 1 else base}"


def key_label(key: str) -> str:
    """A key as people read it: 'question_mark' -> '?', 'delete' -> 'del', 'ctrl+c' stays."""
    modifiers, plus, base = key.rpartition("+")
    return f"{modifiers}{plus}{_SHOWN.get(base) or _PUNCTUATION.get(base, base)}"


def keys_label(keys: Iterable[str]) -> str:
    return " ".join(key_label(key) for key in keys)


# --- a user's [ui.keys] ------------------------------------------------------------------


def resolve(user: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Every action's keys: the user's where given, else the defaults."""
    return {action.id: tuple(user.get(action.id, action.keys)) for action in ACTIONS}


def changes(raw: Mapping[str, Any]) -> UserKeys:
    """The valid entries of a `[ui.keys]` table that differ from the defaults, keys named as
    Textual names them (no duplicates), in the file's order."""
    chosen = _valid(raw)
    return tuple((action, keys) for action, keys in chosen.items() if keys != DEFAULTS[action])


def problems(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(action id, message) for each entry of a `[ui.keys]` table that is wrong: an unknown
    action, a value that is not a key or a list of keys, or a key another action has."""
    found = [(action, message) for action, value in raw.items() if (message := _entry_problem(action, value))]
    return found + _clashes(_valid(raw))


def _valid(raw: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    return {action: _names(value) for action, value in raw.items() if _entry_problem(action, value) is None}


def _names(value: str | list[str]) -> tuple[str, ...]:
    keys = [value] if isinstance(value, str) else value
    return tuple(dict.fromkeys(key_name(key) for key in keys))


def _entry_problem(action: str, value: Any) -> str | None:
    if action not in BY_ID:
        guess = difflib.get_close_matches(action, list(BY_ID), n=1, cutoff=0.6)
        hint = f"did you mean {guess[0]!r}?" if guess else f"actions: {', '.join(BY_ID)}"
        return f"unknown action {action!r}; {hint}"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(key, str) for key in value):
        return 'expected a key or a list of keys, like "x" or ["x", "ctrl+d"]'
    return next(filter(None, map(_key_problem, value)), None)


def _key_problem(key: str) -> str | None:
    name = key_name(key)
    modifiers, _, base = name.rpartition("+")
    if not base or any(character.isspace() or character == "," for character in name):
        return f'{key!r} is not a key name: one key per string, like "x", "D", "ctrl+d", "f5" or "?"'
    unknown = [part for part in modifiers.split("+") if part and part not in MODIFIERS]
    if unknown:
        return f"{key!r}: unknown modifier {unknown[0]!r}; modifiers: {', '.join(sorted(MODIFIERS))}"
    return None


def _clashes(user: Mapping[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """A user's key that another action has too, after the user's map is laid over the
    defaults: one problem per user entry and key."""
    owners: dict[str, list[str]] = {}
    for action, keys in resolve(user).items():
        for key in keys:
            owners.setdefault(key, []).append(action)
    found = []
    for action, keys in user.items():
        for key in keys:
            for other in owners[key]:
                if other != action:
                    found.append((action, _clash_message(key, other, other in user)))
    return found


def _clash_message(key: str, other: str, other_rebound: bool) -> str:
    if other_rebound:
        return f"key {key_label(key)!r} is bound to {other} too; give one of them another key"
    return f"key {key_label(key)!r} is already {other}'s (by default); rebind {other} too, or choose another key"
