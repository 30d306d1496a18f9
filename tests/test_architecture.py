"""The layout is checked, not hoped for: import-linter's contracts (pyproject.toml) and no
import cycle between any two modules, imports under TYPE_CHECKING included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

from tests.helpers import REPO_ROOT


def lint_imports(config: Path) -> subprocess.CompletedProcess[str]:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([command, "--config", str(config)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept() -> None:
    result = lint_imports(REPO_ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_a_broken_layer_is_caught(tmp_path: Path) -> None:
    """The same check fails on a contract the code breaks, so the test above can fail."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "mvtui"\n\n'
        '[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\nlayers = ["mvtui.errors", "mvtui.control"]\n'
    )
    result = lint_imports(config)
    assert result.returncode != 0 and "BROKEN" in result.stdout


def cycles(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    """Each direct import a -> b where b also reaches a: a cycle through both."""
    found = []
    for importer in sorted(graph.modules):
        if not importer.startswith("mvtui"):
            continue
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported.startswith("mvtui") and graph.find_shortest_chain(importer=imported, imported=importer):
                found.append((importer, imported))
    return found


def test_no_module_imports_itself_back() -> None:
    graph = grimp.build_graph("mvtui", cache_dir=None)
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    graph = grimp.build_graph("mvtui", cache_dir=None)
    graph.add_import(importer="mvtui.errors", imported="mvtui.control.operator")
    assert ("mvtui.errors", "mvtui.control.operator") in cycles(graph)
