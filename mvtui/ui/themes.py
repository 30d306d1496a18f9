"""Themes are TOML files turned into Textual themes.

mvtui ships a few (`themes/*.toml` at the repository root, packaged as `mvtui.themes`);
users drop their own into `<config dir>/themes/`. A file that does not parse or names an
unknown colour is reported as a problem (shown to the user as a notification) and skipped:
it never stops the app.

A theme file:

    name = "my-theme"            # required
    dark = true
    primary = "#4aa3ff"          # required; every other colour is optional
    secondary = "#8aa4ff"
    accent = "#ffb454"
    foreground = "#d8dee9"
    background = "#111418"
    surface = "#171b21"
    panel = "#1f252d"
    success = "#4ebf71"
    warning = "#e5b045"
    error = "#e05561"

    [variables]                  # optional: any Textual variable, plus mvtui's own
    state-up = "#4ebf71"         # state-{up,down,busy,asleep,starting,idle},
    bar-empty = "#2a3039"        # bar-{empty,low,mid,high}, spark-{requests,tokens},
    pane-border = "#5f6b78"      # pane-border, key-disabled

`contrast_problems` checks a theme's important pairs (text, borders, states, gauges, greyed
keys on their backgrounds) against WCAG contrast minimums; every shipped theme passes.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.theme import Theme

COLOR_KEYS = ("primary", "secondary", "accent", "foreground", "background", "surface", "panel", "boost", "success", "warning", "error")
OTHER_KEYS = ("name", "dark", "luminosity_spread", "text_alpha", "variables")
DEFAULT_THEME = "mvtui-dark"


@dataclass(frozen=True)
class ThemeProblem:
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


class ThemeError(ValueError):
    pass


def theme_from_toml(text: str) -> Theme:
    """One theme from TOML text; raises ThemeError naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ThemeError(f"not valid TOML: {error}") from None
    return theme_from_mapping(data)


def theme_from_mapping(data: Mapping[str, Any]) -> Theme:
    problems = []
    unknown = [key for key in data if key not in COLOR_KEYS and key not in OTHER_KEYS]
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(COLOR_KEYS + OTHER_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append("`name` must be a non-empty string")
    if "primary" not in data:
        problems.append("`primary` colour is required")
    colors: dict[str, str] = {}
    for key in COLOR_KEYS:
        if key in data:
            problem = _color_problem(key, data[key])
            if problem:
                problems.append(problem)
            else:
                colors[key] = data[key]
    if not isinstance(data.get("dark", True), bool):
        problems.append("`dark` must be true or false")
    variables = data.get("variables", {})
    if not isinstance(variables, Mapping) or not all(isinstance(value, str) for value in variables.values()):
        problems.append("[variables] must be a table of strings")
        variables = {}
    if problems:
        raise ThemeError("; ".join(problems))
    extras = {key: float(data[key]) for key in ("luminosity_spread", "text_alpha") if isinstance(data.get(key), (int, float))}
    return Theme(name=name.strip(), dark=data.get("dark", True), variables=dict(variables), **colors, **extras)  # type: ignore[union-attr, arg-type]


def _color_problem(key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return f'`{key}` must be a colour string like "#4aa3ff"'
    try:
        Color.parse(value)
    except ColorParseError:
        return f"`{key}` = {value!r} is not a colour"
    return None


SOURCE_TREE_THEMES = Path(__file__).resolve().parents[2] / "themes"


def shipped_themes_folder() -> Traversable:
    """The shipped themes: package `mvtui.themes`, which is `themes/` at the repository root
    (pyproject.toml maps it); from a source tree that is not installed, that folder itself."""
    try:
        return resources.files("mvtui.themes")
    except ModuleNotFoundError:
        return SOURCE_TREE_THEMES


def shipped_theme_files() -> list[tuple[str, str]]:
    """(source, text) of each shipped theme, sorted by file name."""
    folder = shipped_themes_folder()
    found = [entry for entry in folder.iterdir() if entry.name.endswith(".toml")] if folder.is_dir() else []
    return [(f"themes/{entry.name}", entry.read_text(encoding="utf-8")) for entry in sorted(found, key=lambda entry: entry.name)]


def user_theme_files(folder: Path) -> tuple[list[tuple[str, str]], list[ThemeProblem]]:
    if not folder.is_dir():
        return [], []
    files, problems = [], []
    for path in sorted(folder.glob("*.toml")):
        try:
            files.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as error:
            problems.append(ThemeProblem(str(path), f"cannot read it: {error}"))
    return files, problems


def parse_themes(files: Iterable[tuple[str, str]]) -> tuple[list[Theme], list[ThemeProblem]]:
    """Themes in order; a later file with the same name replaces an earlier one."""
    themes: dict[str, Theme] = {}
    problems: list[ThemeProblem] = []
    for source, text in files:
        try:
            theme = theme_from_toml(text)
        except ThemeError as error:
            problems.append(ThemeProblem(source, str(error)))
            continue
        themes[theme.name] = theme
    return list(themes.values()), problems


def load_themes(user_folder: Path | None) -> tuple[list[Theme], list[ThemeProblem]]:
    """The shipped themes, then the user's (which may replace a shipped one by name)."""
    files = shipped_theme_files()
    problems: list[ThemeProblem] = []
    if user_folder is not None:
        user_files, problems = user_theme_files(user_folder)
        files += user_files
    themes, parse_problems = parse_themes(files)
    return themes, problems + parse_problems


# --- the remembered choice --------------------------------------------------------------


def read_ui_state(path: Path) -> dict[str, Any]:
    """What the dashboard remembered last time; a missing or broken file is an empty memory."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_ui_state(path: Path, updates: Mapping[str, Any]) -> None:
    """Merge `updates` into the file, replacing it atomically."""
    state = read_ui_state(path)
    state.update(updates)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(scratch, path)


def next_theme(names: list[str], current: str) -> str:
    if not names:
        return current
    if current not in names:
        return names[0]
    return names[(names.index(current) + 1) % len(names)]


def solid_colors(variables: Mapping[str, str]) -> dict[str, str]:
    """Every variable that is a colour, as #rrggbb with any transparency blended onto the
    background: Rich styles need solid colours."""
    background = _parse(variables.get("background", "")) or Color(0, 0, 0)
    solid: dict[str, str] = {}
    for name, value in variables.items():
        color = _parse(value)
        if color is not None:
            solid[name] = (background + color).hex if color.a < 1 else color.hex
    return solid


def _parse(value: str) -> Color | None:
    try:
        return Color.parse(value)
    except (ColorParseError, ValueError, TypeError):
        return None


# --- mvtui's own variables, for themes that do not set them ----------------------------------

DEFAULT_COLORS = {"background": "#121212", "foreground": "#e0e0e0"}


def base_variables(theme: Theme) -> dict[str, str]:
    """Textual's variables for `theme`, with the theme's own [variables] over them."""
    generated: dict[str, str] = {name: value for name, value in theme.to_color_system().generate().items() if value}
    return {**generated, **theme.variables}


def mvtui_defaults(theme: Theme) -> dict[str, str]:
    """mvtui's variables (state, gauge, border and greyed-key colours) from a theme's base
    colours: what a theme that does not set them gets (Textual's built-in themes)."""
    base = base_variables(theme)

    def pick(name: str, fallback: str) -> str:
        return base.get(name, fallback)

    background, foreground = pick("background", DEFAULT_COLORS["background"]), pick("foreground", DEFAULT_COLORS["foreground"])
    return {
        "state-up": pick("success", "#4ebf71"),
        "state-down": pick("error", "#e05561"),
        "state-busy": pick("warning", "#e5b045"),
        "state-asleep": pick("secondary", "#8aa4ff"),
        "state-starting": pick("primary", "#56b6c2"),
        "state-idle": pick("foreground-darken-2", "#8a8f98"),
        "bar-empty": pick("panel-lighten-1", "#3a3f4b"),
        "bar-low": pick("primary", "#4ebf71"),
        "bar-mid": pick("warning", "#e5b045"),
        "bar-high": pick("error", "#e05561"),
        "spark-requests": pick("primary", "#56b6c2"),
        "spark-tokens": pick("accent", "#c678dd"),
        "pane-border": blend(background, foreground, 0.5),
        "key-disabled": blend(background, foreground, 0.45),
    }


def theme_variables(theme: Theme) -> dict[str, str]:
    """Every variable the dashboard's CSS and panels see under `theme`, as Textual's
    `App.get_css_variables` composes them: mvtui's defaults under the theme's."""
    return {**mvtui_defaults(theme), **base_variables(theme)}


def blend(background: str, foreground: str, amount: float) -> str:
    return Color.parse(background).blend(Color.parse(foreground), amount).hex


# --- contrast (WCAG 2) -------------------------------------------------------------------------

TEXT_MIN = 4.5  # body text (WCAG AA)
GRAPHIC_MIN = 3.0  # borders, state words and glyphs (bold), gauges, greyed keys
TEXT_BACKGROUNDS = ("background", "surface", "panel")
STATE_ROLES = ("up", "down", "busy", "asleep", "starting", "idle")

# (colour, background it is drawn on, minimum ratio): what must stay readable in every theme.
CONTRAST_PAIRS: tuple[tuple[str, str, float], ...] = (
    *((text, background, TEXT_MIN) for text in ("foreground", "foreground-muted") for background in TEXT_BACKGROUNDS),
    ("accent", "panel", TEXT_MIN),  # the footer's keys, the top bar's name
    ("accent", "surface", TEXT_MIN),  # dialog titles; the selected pane's border
    ("pane-border", "background", GRAPHIC_MIN),  # log and GPU panes
    ("pane-border", "surface", GRAPHIC_MIN),  # server panes
    *((f"state-{role}", background, GRAPHIC_MIN) for role in STATE_ROLES for background in TEXT_BACKGROUNDS),
    *((f"bar-{level}", "bar-empty", GRAPHIC_MIN) for level in ("low", "mid", "high")),
    *((f"spark-{kind}", "surface", GRAPHIC_MIN) for kind in ("requests", "tokens")),
    ("key-disabled", "panel", GRAPHIC_MIN),
)


def relative_luminance(color: Color) -> float:
    def linear(channel: int) -> float:
        value = channel / 255
        return value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4

    return 0.2126 * linear(color.r) + 0.7152 * linear(color.g) + 0.0722 * linear(color.b)


def contrast_ratio(foreground: str, background: str) -> float:
    """WCAG's contrast ratio (1 to 21); a translucent foreground is blended onto the background."""
    back = Color.parse(background)
    front = Color.parse(foreground)
    if front.a < 1:
        front = back + front
    lighter, darker = sorted((relative_luminance(front), relative_luminance(back)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def contrast_problems(variables: Mapping[str, str]) -> list[str]:
    """Each important pair under its minimum, as `foreground-muted on panel: 3.9 < 4.5`."""
    found = []
    for foreground, background, minimum in CONTRAST_PAIRS:
        ratio = contrast_ratio(variables[foreground], variables[background])
        if ratio < minimum:
            found.append(f"{foreground} on {background}: {ratio:.2f} < {minimum}")
    return found
