"""Routing policies from installed packages (`mvtui.policies` entry points): the README's
example, installed as a real distribution on a path of its own, chosen by the config and
used by a real router."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvtui.config.schema import parse_config
from mvtui.errors import ConfigError
from mvtui.routing.policies import ENTRY_POINT_GROUP, installed_policies
from tests import http
from tests.helpers import REPO_ROOT, Proc, free_port, start_mvtui, start_sim
from tests.router_setup import FAST, sim_state, wait_healthy


def readme_example() -> tuple[str, dict[str, str]]:
    """The README's example plugin: its module's source and its entry points."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("<!-- plugin-example -->")[1].split("<!-- /plugin-example -->")[0]
    source = re.search(r"```python\n(.*?)```", block, re.S)
    project = re.search(r"```toml\n(.*?)```", block, re.S)
    assert source and project, "the README's plugin example lost its code blocks"
    points = tomllib.loads(project.group(1))["project"]["entry-points"][ENTRY_POINT_GROUP]
    return source.group(1), points


def install(site: Path) -> str:
    """The example as an installed distribution under `site`; returns the policy's name."""
    source, points = readme_example()
    ((name, target),) = points.items()
    module = target.split(":")[0]
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {target}\n")
    return name


def test_the_readme_example_is_about_twenty_lines() -> None:
    source, _ = readme_example()
    assert len(source.strip().splitlines()) <= 20


def test_an_installed_policy_is_offered_and_the_config_accepts_only_installed_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = install(tmp_path)
    assert name not in installed_policies()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name in installed_policies() and "fastest" in installed_policies()
    assert parse_config(f'[router]\npolicy = "{name}"\n').router.policy == name
    with pytest.raises(ConfigError) as refused:
        parse_config('[router]\npolicy = "nonesuch"\n')
    assert name in str(refused.value) and "fastest" in str(refused.value)


def test_a_broken_plugin_is_left_out_and_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    info = tmp_path / "broken_policy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-policy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = broken_policy:nowhere\nfastest = os:getcwd\n")
    (tmp_path / "broken_policy.py").write_text("raise ImportError('its own bug')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    policies = installed_policies()
    assert "broken" not in policies and policies["fastest"].__module__ == "mvtui.routing.policies"
    said = caplog.text
    assert "broken" in said and "its own bug" in said and "the name is taken" in said


@pytest.fixture
def started() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()


def test_a_router_routes_with_an_installed_policy(tmp_path: Path, started: list[Proc]) -> None:
    name = install(tmp_path / "site")
    sims = [start_sim("llama"), start_sim("llama")]
    started.extend(sims)
    entries = ",\n".join(
        f'  {{ url = "{sim.url}", name = "s{index}", max_concurrent_requests = 4 }}' for index, sim in enumerate(reversed(sims))
    )
    config = tmp_path / "servers.toml"
    config.write_text(f'[servers]\nservers = [\n{entries}\n]\n{FAST}\n[router]\npolicy = "{name}"\n')
    port = free_port()
    site = os.pathsep.join([str(tmp_path / "site"), str(REPO_ROOT)])
    args = ["--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    router = start_mvtui(args, port=port, env={"PYTHONPATH": site})
    started.append(router)
    wait_healthy(router, 2)
    for _ in range(6):
        answer = http.post(router.url + "/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
    first_by_name = sims[1]  # named s0
    assert sim_state(first_by_name)["received"] == 6 and sim_state(sims[0])["received"] == 0
