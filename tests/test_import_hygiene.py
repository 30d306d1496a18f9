"""The core lives without the TUI: every module outside mvtui/ui imports without Textual,
so `mvtui --no-ui` and the admin CLI never load it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO_ROOT

LIST_AND_IMPORT = """
import importlib, json, pkgutil, sys
import mvtui
names = sorted(
    module.name
    for module in pkgutil.walk_packages(mvtui.__path__, "mvtui.")
    if module.name != "mvtui.__main__" and not (module.name == "mvtui.ui" or module.name.startswith("mvtui.ui."))
)
for name in names + sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted(name for name in sys.modules if name == "textual" or name.startswith("textual."))
print(json.dumps({"imported": names, "textual": loaded}))
"""


def import_in_subprocess(*extra: str) -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", LIST_AND_IMPORT, *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_core_modules_import_without_textual() -> None:
    found = import_in_subprocess()
    assert {"mvtui.cli", "mvtui.cluster.state", "mvtui.runtime.wiring", "mvtui.runtime.headless", "mvtui.gpu", "mvtui.router.proxy"} <= set(
        found["imported"]
    )
    assert found["textual"] == [], f"a core module imported Textual: {found['textual'][:5]}"


def test_the_check_sees_textual_when_the_ui_is_imported() -> None:
    """The same probe does notice Textual, so the test above can fail."""
    assert "textual" in import_in_subprocess("mvtui.ui.app")["textual"]
