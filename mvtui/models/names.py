"""Near names for a model that is not there: difflib over full ids and their last part,
case left aside, and names that contain what was typed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

CUTOFF = 0.6


def near_names(wanted: str, known: Iterable[str], count: int = 5) -> list[str]:
    """Up to `count` of `known` that look like `wanted`, the closest first."""
    names = list(dict.fromkeys(known))
    keys: dict[str, list[str]] = {}
    for name in names:
        for key in {name.lower(), name.rsplit("/", 1)[-1].lower()}:
            keys.setdefault(key, []).append(name)
    typed = wanted.lower()
    close = difflib.get_close_matches(typed, list(keys), n=count * 2, cutoff=CUTOFF)
    close += difflib.get_close_matches(typed.rsplit("/", 1)[-1], list(keys), n=count * 2, cutoff=CUTOFF)
    found = [name for key in close for name in keys[key]]
    found += [name for name in names if typed in name.lower()]
    return list(dict.fromkeys(found))[:count]


def unknown_model(wanted: str, known: Iterable[str], where: str) -> str:
    """`unknown model 'qwen2'` (where), did you mean ... / the models there are."""
    names = sorted(set(known))
    near = near_names(wanted, names)
    if near:
        return f"unknown model {wanted!r} ({where}); did you mean {_listed(near)}?"
    if names:
        return f"unknown model {wanted!r} ({where}); there are: {_listed(names[:12])}{' ...' if len(names) > 12 else ''}"
    return f"unknown model {wanted!r} ({where}, which has none)"


def _listed(names: list[str]) -> str:
    return ", ".join(names)
