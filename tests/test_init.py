"""`mvtui init`: a starter config that mvtui's own parser accepts, never written over an
existing file without --force. Run as a real `python -m mvtui` with private user folders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mvtui.config.schema import Config, load_config, parse_config
from mvtui.config.starter import example_file, starter_text
from tests.helpers import REPO_ROOT

OPTION_LINE = re.compile(r"(?m)^# (\[\[?[a-z_.]+\]\]?|[a-z_]+ = .+)$")


def run_init(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`mvtui init ARGS` with HOME and every XDG folder under `home`, no $MVTUI_CONFIG."""
    isolated = {key: value for key, value in os.environ.items() if key != "MVTUI_CONFIG"}
    isolated.update({"HOME": str(home), "PYTHONPATH": str(REPO_ROOT)})
    isolated.update({f"XDG_{kind}_HOME": str(home / kind.lower()) for kind in ("CONFIG", "STATE", "DATA", "CACHE")})
    return subprocess.run(
        [sys.executable, "-m", "mvtui", "init", *args],
        cwd=REPO_ROOT,
        env={**isolated, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_starter_parses_and_names_the_shipped_example() -> None:
    text = starter_text()
    assert parse_config(text) == Config()
    assert str(example_file()) in text and example_file().is_file()


def test_uncommenting_the_starter_s_options_still_parses() -> None:
    config = parse_config(OPTION_LINE.sub(r"\1", starter_text()))
    assert config.router == Config().router
    assert [instance.model for instance in config.instances] == ["meta-llama/Llama-3.1-8B-Instruct"]


def test_init_writes_to_the_default_config_path(tmp_path: Path) -> None:
    done = run_init(tmp_path)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "config" / "mvtui" / "servers.toml"
    assert done.stdout.strip() == str(written)
    assert load_config(written) == Config()


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "mine.toml"
    target.write_text('[servers]\nservers = [{ url = "http://gpu-1:8000" }]\n')
    done = run_init(tmp_path, str(target))
    assert done.returncode == 1
    assert "already exists" in done.stderr and "--force" in done.stderr and str(target) in done.stderr
    assert "gpu-1" in target.read_text()


def test_init_force_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "mine.toml"
    target.parent.mkdir()
    target.write_text("not toml at all [")
    done = run_init(tmp_path, str(target), "--force")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(target)
    assert target.read_text() == starter_text()
    assert load_config(target) == Config()


def test_init_follows_the_config_environment_variable(tmp_path: Path) -> None:
    target = tmp_path / "from-env.toml"
    done = run_init(tmp_path, env={"MVTUI_CONFIG": str(target)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(target) and load_config(target) == Config()


def test_init_prints_an_absolute_path_for_a_relative_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mvtui", "init", "relative.toml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "relative.toml")
    assert (tmp_path / "relative.toml").is_file()
