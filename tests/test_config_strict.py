"""The config parser refuses what would break mvtui later: nan and inf, URLs that cannot be
requested, one backend listed under several spellings, two servers with one name, a string
where a list belongs, and credentials beside an api_key. Every refusal is a ConfigError with
its place, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvtui.config.schema import (
    ADMIN_SCHEMA,
    INSTANCE_SCHEMA,
    ROUTER_SCHEMA,
    SERVER_SCHEMA,
    TIMING_SCHEMA,
    UI_SCHEMA,
    Check,
    ServerConfig,
    normalize_url,
    parse_config,
    redact_url,
    server_name_from_url,
)
from mvtui.errors import ConfigError
from tests.helpers import REPO_ROOT


def problems_of(text: str) -> list[tuple[str, int | None, int | None, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return [(problem.where, problem.line, problem.column, problem.message) for problem in caught.value.problems]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "mvtui", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)


def _numeric(schema: dict[str, Check]) -> list[str]:
    return [key for key, check in schema.items() if check(1.5) is None or check(3) is None]


NUMBER_PLACES = (
    [("[router]", key) for key in _numeric(ROUTER_SCHEMA)]
    + [("[config]", key) for key in _numeric(TIMING_SCHEMA)]
    + [("[admin]", key) for key in _numeric(ADMIN_SCHEMA)]
    + [("[ui]", key) for key in _numeric(UI_SCHEMA)]
    + [("server", key) for key in _numeric(SERVER_SCHEMA)]
    + [("instance", key) for key in _numeric(INSTANCE_SCHEMA)]
)


def _with_value(place: str, key: str, value: str) -> str:
    if place == "server":
        return f'[servers]\nservers = [{{ url = "http://a:1", {key} = {value} }}]\n'
    if place == "instance":
        return f'[[instances]]\nmodel = "m"\n{key} = {value}\n'
    return f"{place}\n{key} = {value}\n"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
@pytest.mark.parametrize(("place", "key"), NUMBER_PLACES)
def test_nan_and_inf_are_refused_for_every_number(place: str, key: str, value: str) -> None:
    assert len(NUMBER_PLACES) >= 20
    ((where, line, column, message),) = problems_of(_with_value(place, key, value))
    assert where.endswith(key) and line and column
    assert "finite" in message or "integer" in message


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://a:99999", "Port out of range"),
        ("http://a:port", "Port could not be cast"),
        ("http://a b:1", "spaces"),
        ("http://a:1/?x=1", "query"),
        ("http://a:1/#top", "fragment"),
        ("http://:80", "with a host"),
        ("ftp://a:1", "http:// or https://"),
    ],
)
def test_a_url_that_cannot_be_requested_is_a_problem_with_its_place(url: str, words: str) -> None:
    ((where, line, column, message),) = problems_of(f'\n[servers]\nservers = [{{ url = "{url}" }}]\n')
    assert (where, line, column) == ("servers[0].url", 3, 14)
    assert words in message


def test_a_broken_url_is_a_config_error_at_the_command_line_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "servers.toml"
    path.write_text('[servers]\nservers = [{ url = "http://[::1" }]\n')
    result = run_cli("--no-ui", "--port", "0", "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "line 2" in result.stderr and "Invalid IPv6 URL" in result.stderr


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("http://Host:80/", "http://host"),
        ("HTTP://host:80", "http://host"),
        ("http://host", "http://host"),
        ("https://HOST:443/v1/", "https://host/v1"),
        ("https://host:8443", "https://host:8443"),
        ("http://[::1]:80/", "http://[::1]"),
        ("http://User:PW@Host:8000/", "http://User:PW@host:8000"),
        ("  http://h:1//  ", "http://h:1"),
        ("http://[::1", "http://[::1"),  # not a URL: only stripped (the checks report it)
    ],
)
def test_urls_are_normalised(written: str, normal: str) -> None:
    assert normalize_url(written) == normal


def test_one_backend_spelled_three_ways_is_one_server_and_a_problem() -> None:
    text = '[servers]\nservers = [\n  { url = "http://Host:80/" },\n  { url = "http://host" },\n  { url = "HTTP://host:80" },\n]\n'
    problems = problems_of(text)
    assert [(where, line) for where, line, _, _ in problems] == [("servers[1].url", 4), ("servers[2].url", 5)]
    assert all("listed twice" in message and "servers[0]" in message for *_, message in problems)


def test_two_servers_with_one_name_are_a_problem() -> None:
    text = '[servers]\nservers = [\n  { url = "http://a:1", name = "gpu" },\n  { url = "http://b:1", name = "gpu" },\n]\n'
    ((where, line, _, message),) = problems_of(text)
    assert where == "servers" and line == 3 and "'gpu'" in message


def test_derived_names_clash_too() -> None:
    ((_, _, _, message),) = problems_of('[servers]\nservers = [{ url = "http://a:1" }, { url = "https://a:1" }]\n')
    assert "'a:1'" in message


def test_a_server_and_an_instance_cannot_share_a_name() -> None:
    text = '[servers]\nservers = [{ url = "http://a:1", name = "llama" }]\n\n[[instances]]\nmodel = "llama"\n'
    ((_, _, _, message),) = problems_of(text)
    assert "'llama'" in message


@pytest.mark.parametrize(
    ("entry", "where", "words"),
    [
        ('models = "abc"', "servers[0].models", "list of strings"),
        ('models = ["a", ""]', "servers[0].models", "non-empty"),
        ("models = [1]", "servers[0].models", "list of strings"),
        ("name = 3", "servers[0].name", "string"),
        ('drain = "yes"', "servers[0].drain", "true or false"),
        ('api_key = ["k"]', "servers[0].api_key", "string"),
        ("max_concurrent_requests = true", "servers[0].max_concurrent_requests", "integer"),
    ],
)
def test_every_server_field_is_checked_for_its_type(entry: str, where: str, words: str) -> None:
    ((found, _, _, message),) = problems_of(f'[servers]\nservers = [{{ url = "http://a:1", {entry} }}]\n')
    assert found == where and words in message


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ('[router]\napi_keys = ["good", ""]\n', "router.api_keys", "non-empty"),
        ('[router]\napi_keys = "good"\n', "router.api_keys", "list of strings"),
        ('[[instances]]\nmodel = ""\n', "instances[0].model", "empty"),
        ('[[instances]]\nmodel = "m"\nport_range = [true, 9]\n', "instances[0].port_range", "ports"),
        ('[[instances]]\nmodel = "m"\ngpu_memory_utilization = 1.5\n', "instances[0].gpu_memory_utilization", "at most 1"),
        ('[[instances]]\nmodel = "m"\ndevices = "0,\u00b2"\n', "instances[0].devices", "GPU indices"),
        ('[[instances]]\nmodel = "m"\nenv = { A = 1 }\n', "instances[0].env", "table of strings"),
    ],
)
def test_every_other_field_is_checked_the_same_way(text: str, where: str, words: str) -> None:
    ((found, _, _, message),) = problems_of(text)
    assert found == where and words in message


def test_credentials_in_a_url_and_an_api_key_are_a_problem() -> None:
    ((where, _, _, message),) = problems_of('[servers]\nservers = [{ url = "http://u:p@a:1", api_key = "k" }]\n')
    assert where == "servers[0].api_key" and "use one" in message


def test_credentials_never_appear_in_a_name_or_a_message() -> None:
    config = parse_config('[servers]\nservers = [{ url = "http://alice:pw@a:8000/v1" }]\n')
    server = config.servers[0]
    assert server.url == "http://alice:pw@a:8000/v1"  # the connection still uses them
    assert (server.label, server.display_url) == ("a:8000/v1", "http://a:8000/v1")
    text = '[servers]\nservers = [{ url = "http://alice:pw@a:8000" }, { url = "http://alice:pw@A:8000/" }]\n'
    assert "pw" not in str(problems_of(text))
    assert "pw" not in str(problems_of('[servers]\nservers = [{ url = "http://alice:pw@[::1" }]\n'))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:p@h:1/x", "http://h:1/x"),
        ("http://h:1", "http://h:1"),
        ("https://:secret@h", "https://h"),
        ("http://u:p@[::1", "http://[::1"),
        ("http://user:p@ss@h:1/x@y", "http://h:1/x@y"),  # an @ in the password is part of it
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_server_name_comes_from_its_url_without_credentials() -> None:
    assert server_name_from_url("http://u:p@h:8000") == "h:8000"
    assert ServerConfig(url="http://u:p@h:8000").label == "h:8000"
    assert ServerConfig(url="http://u:p@h:8000", name="gpu1").label == "gpu1"
