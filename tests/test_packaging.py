"""What `pip install` puts in place: every sub-package, the themes from the top-level
`themes/` folder (as `mvtui.themes`) and the example config."""

from __future__ import annotations

import importlib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from mvtui.config.starter import EXAMPLE_NAME
from tests.helpers import REPO_ROOT

THEME_FILES = {"mvtui-dark.toml", "mvtui-high-contrast.toml", "mvtui-light.toml"}


def setuptools_table() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return table


def source_packages() -> set[str]:
    """Every folder of mvtui/ with an __init__.py, as a dotted name."""
    found = {init.parent.relative_to(REPO_ROOT) for init in (REPO_ROOT / "mvtui").rglob("__init__.py")}
    return {".".join(Path(folder).parts) for folder in found}


def test_every_sub_package_is_listed_for_the_wheel() -> None:
    listed = set(setuptools_table()["packages"])
    assert source_packages() - listed == set()
    assert listed - source_packages() == {"mvtui.themes"}


def test_the_top_level_themes_folder_is_packaged_as_mvtui_themes() -> None:
    table = setuptools_table()
    assert table["package-dir"] == {"mvtui.themes": "themes"}
    assert table["package-data"]["mvtui.themes"] == ["*.toml"]
    assert {path.name for path in (REPO_ROOT / "themes").glob("*.toml")} == THEME_FILES
    assert not (REPO_ROOT / "mvtui" / "themes").exists()


def test_the_installed_package_has_the_themes_and_the_example() -> None:
    """Needs mvtui installed (`pip install -e .`, as the README and .ci/run do)."""
    importlib.import_module("mvtui.themes")
    shipped = {entry.name for entry in resources.files("mvtui.themes").iterdir()}
    assert THEME_FILES <= shipped
    assert resources.files("mvtui.config").joinpath(EXAMPLE_NAME).is_file()
    assert f"config/{EXAMPLE_NAME}" in setuptools_table()["package-data"]["mvtui"]
