"""The config file: parsing, every problem with its place, the CLI's answer to a broken file,
the documented example, and edits that keep the operator's formatting."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mvtui.config.edit import (
    add_server,
    remove_server,
    set_server_value,
    unset_server_value,
)
from mvtui.config.file import apply_edit, edited_text
from mvtui.config.schema import (
    AdminConfig,
    Config,
    InstanceConfig,
    RouterConfig,
    ServerConfig,
    TimingConfig,
    UiConfig,
    parse_config,
)
from mvtui.config.starter import example_file
from mvtui.errors import ConfigEditError, ConfigError
from mvtui.files import write_atomic
from tests.helpers import REPO_ROOT

# mvllm's servers.example.toml as published (xerrors/mvllm), comments included.
MVLLM_EXAMPLE = """\
[servers]
servers = [
    { url = "http://localhost:8801", max_concurrent_requests = 10 },
    { url = "http://localhost:8802", max_concurrent_requests = 3 },
    { url = "http://localhost:8803", max_concurrent_requests = 4 },
]

[config]
health_check_interval = 10
config_reload_interval = 30
request_timeout = 30
health_check_timeout = 5
max_retries = 3
failure_threshold = 2
auto_recovery_threshold = 60

# \u4e3b\u52a8\u5065\u5eb7\u68c0\u67e5\u914d\u7f6e
enable_active_health_check = true
health_check_max_response_time = 10.0
health_check_min_success_rate = 0.8
health_check_window_size = 10
health_check_consecutive_failures = 3
"""

BROKEN = """\
# my cluster
[router]
prot = 8080
policy = "quickest"

[admin]
port = "x"

[servers]
servers = [
    { url = "http://a:1", max_concurrent_requests = "three" },
    { url = "ftp://b:2", max_concurrrent_requests = 3 },
]

[config]
health_check_interval = -1
helth_check_interval = 5
"""


def problems_of(text: str) -> list[tuple[str, int | None, int | None, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return [(problem.where, problem.line, problem.column, problem.message) for problem in caught.value.problems]


# --- parsing -------------------------------------------------------------------------------


def test_mvllm_example_loads_unchanged() -> None:
    config = parse_config(MVLLM_EXAMPLE)
    assert [(server.url, server.max_concurrent_requests) for server in config.servers] == [
        ("http://localhost:8801", 10),
        ("http://localhost:8802", 3),
        ("http://localhost:8803", 4),
    ]
    assert (config.timing.health_check_interval, config.timing.request_timeout, config.timing.max_retries) == (10, 30, 3)


def test_mvllm_only_keys_are_still_checked_for_type() -> None:
    text = '[config]\nhealth_check_timeout = "soon"\n'
    assert problems_of(text) == [("config.health_check_timeout", 2, 1, "expected a number, got the string 'soon'")]


def test_every_problem_is_listed_in_file_order_with_line_and_column() -> None:
    found = [(where, line, column) for where, line, column, _ in problems_of(BROKEN)]
    assert found == [
        ("router.prot", 3, 1),
        ("router.policy", 4, 1),
        ("admin.port", 7, 1),
        ("servers[0].max_concurrent_requests", 11, 27),
        ("servers[1].url", 12, 7),
        ("servers[1].max_concurrrent_requests", 12, 26),
        ("config.health_check_interval", 16, 1),
        ("config.helth_check_interval", 17, 1),
    ]


def test_unknown_keys_get_a_did_you_mean() -> None:
    messages = {where: message for where, _, _, message in problems_of(BROKEN)}
    assert "did you mean 'port'?" in messages["router.prot"]
    assert "did you mean 'max_concurrent_requests'?" in messages["servers[1].max_concurrrent_requests"]
    assert "did you mean 'health_check_interval'?" in messages["config.helth_check_interval"]
    assert "balanced" in messages["router.policy"] and "'quickest'" in messages["router.policy"]
    (top,) = problems_of("[server]\nservers = []\n")
    assert top[0] == "server" and "did you mean 'servers'?" in top[3]


def test_a_key_is_located_in_its_own_table() -> None:
    text = '[router]\nport = 8080\n\n[admin]\nport = "x"\n'
    assert [(where, line) for where, line, _, _ in problems_of(text)] == [("admin.port", 5)]


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ("a = 1\n[servers]\nservers = = 1\n", 3, 11, "Unexpected character"),
        ('[servers]\nservers = [{ url = "http://a:1" },\n', 2, 1, "end of file"),
        ("[servers\nx = 1\n", 1, 9, "end of line"),
    ],
)
def test_toml_syntax_errors_have_a_one_based_line_and_column(text: str, line: int, column: int, words: str) -> None:
    ((where, found_line, found_column, message),) = problems_of(text)
    assert (where, found_line, found_column) == ("TOML", line, column)
    assert words in message


def test_a_url_listed_twice_is_a_problem() -> None:
    text = '[servers]\nservers = [{ url = "http://a:1" }, { url = "http://a:1/" }]\n'
    ((where, _, _, message),) = problems_of(text)
    assert where == "servers[1].url" and "listed twice" in message


# --- the CLI ----------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mvtui", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_exits_2_listing_every_problem_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BROKEN)
    result = run_cli("--no-ui", "--config", str(bad), "--port", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "8 problems" in result.stderr
    for place in ("line 3, column 1", "line 11, column 27", "line 12, column 26", "line 17, column 1"):
        assert place in result.stderr


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "no such config file"), (b"\xff\xfe[servers]", "not UTF-8"), (b"[servers\n", "line 1, column 9")],
)
def test_cli_exits_2_for_a_missing_unreadable_or_unparsable_file(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "servers.toml"
    if content is not None:
        path.write_bytes(content)
    result = run_cli("--no-ui", "--port", "0", "--config", str(path))
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "from-env.toml"
    path.write_text(BROKEN)
    result = run_cli("--no-ui", "--port", "0", env={"MVTUI_CONFIG": str(path)})
    assert result.returncode == 2
    assert str(path) in result.stderr and "8 problems" in result.stderr


# --- the documented example ---------------------------------------------------------------------

EXAMPLE = example_file()  # mvtui/config/servers.example.toml, shipped in the package
OPTION_LINE = re.compile(r"(?m)^# (\[\[?[a-z_.]+\]\]?|[a-z_]+ = .+)$")


def test_the_example_parses() -> None:
    config = parse_config(EXAMPLE.read_text(), EXAMPLE)
    assert len(config.servers) == 3


@pytest.mark.parametrize("schema", [RouterConfig, TimingConfig, AdminConfig, UiConfig, ServerConfig, InstanceConfig])
def test_the_example_documents_every_option(schema: type) -> None:
    text = EXAMPLE.read_text()
    options = [field.name for field in dataclasses.fields(schema) if not field.metadata.get("derived")]  # derived: not a key
    missing = [name for name in options if not re.search(rf"\b{name} = ", text)]
    assert missing == []


def test_the_example_shows_the_real_defaults() -> None:
    """Uncommenting every `# key = value` line gives a valid file whose values are the defaults."""
    uncommented = OPTION_LINE.sub(r"\1", EXAMPLE.read_text())
    config = parse_config(uncommented)
    defaults = Config()
    assert (config.router, config.timing, config.admin, config.ui) == (defaults.router, defaults.timing, defaults.admin, defaults.ui)
    (instance,) = config.instances
    assert dataclasses.replace(instance, model="x") == InstanceConfig(model="x")
    assert ServerConfig("http://x").max_concurrent_requests == 8  # the default the example states in prose


# --- edits keep everything else ---------------------------------------------------------------

MULTILINE = MVLLM_EXAMPLE
ONE_LINE = '# top\n[servers]\nservers = [{ url = "http://a:1", max_concurrent_requests = 3 }, {url="http://b:2"}]  # tail\n\n[config]\nmax_retries = 1\n'
TABLES = '# top\n[[servers.servers]]\nurl = "http://a:1" # the a\nmax_concurrent_requests = 3\n\n[[servers.servers]]\nurl = "http://b:2"\n\n[config]\nmax_retries = 1\n'
TABLES_LAST = '# top\n[config]\nmax_retries = 1\n\n[[servers.servers]]\nurl = "http://a:1" # the a\nmax_concurrent_requests = 3\n'
FIRST_URL = {MULTILINE: "http://localhost:8801", ONE_LINE: "http://a:1", TABLES: "http://a:1", TABLES_LAST: "http://a:1"}
STYLES = pytest.mark.parametrize(
    "text", [MULTILINE, ONE_LINE, TABLES, TABLES_LAST], ids=["multi-line", "one-line", "tables", "tables-at-the-end"]
)


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    return [(old, new) for old, new in zip(before.splitlines(), after.splitlines(), strict=False) if old != new]


@STYLES
def test_set_capacity_changes_only_the_value(text: str) -> None:
    url = FIRST_URL[text]
    old = parse_config(text).servers[0].max_concurrent_requests
    result = edited_text(text, set_server_value(url, "max_concurrent_requests", 17))
    assert result.text == text.replace(f"max_concurrent_requests = {old}", "max_concurrent_requests = 17", 1)
    assert result.config.servers[0].max_concurrent_requests == 17


@STYLES
def test_drain_then_undrain_gives_back_the_same_bytes(text: str) -> None:
    url = FIRST_URL[text]
    drained = edited_text(text, set_server_value(url, "drain", True))
    assert drained.config.servers[0].drain is True
    assert len(drained.text.splitlines()) - len(text.splitlines()) in (0, 1)  # the key, in place or on its own line
    assert "drain = true" in drained.text
    restored = edited_text(drained.text, unset_server_value(url, "drain", False))
    assert restored.text == text


def test_a_drain_key_is_added_in_the_entrys_own_spacing() -> None:
    drained = edited_text(MULTILINE, set_server_value("http://localhost:8801", "drain", True)).text
    assert changed_lines(MULTILINE, drained) == [
        (
            '    { url = "http://localhost:8801", max_concurrent_requests = 10 },',
            '    { url = "http://localhost:8801", max_concurrent_requests = 10, drain = true },',
        )
    ]


def test_an_operators_own_drain_in_the_middle_is_set_false_not_cut_out() -> None:
    text = '[servers]\nservers = [\n  { url = "http://a:1", drain = true, max_concurrent_requests = 3 },  # a\n]\n'
    result = edited_text(text, unset_server_value("http://a:1", "drain", False))
    assert result.text == text.replace("drain = true", "drain = false")


@STYLES
def test_add_then_remove_gives_back_the_same_bytes(text: str) -> None:
    added = edited_text(text, add_server(ServerConfig("http://new:9", 2, name="n")))
    assert added.config.servers[-1] == ServerConfig("http://new:9", 2, name="n")
    assert edited_text(added.text, remove_server("http://new:9")).text == text


def test_a_new_table_is_set_off_by_a_blank_line() -> None:
    added = edited_text(TABLES_LAST, add_server(ServerConfig("http://b:2", 3))).text
    assert added == TABLES_LAST + '\n[[servers.servers]]\nurl = "http://b:2"\nmax_concurrent_requests = 3\n'
    added = edited_text(TABLES, add_server(ServerConfig("http://c:3", 3))).text
    assert (
        '[[servers.servers]]\nurl = "http://b:2"\n\n[[servers.servers]]\nurl = "http://c:3"\nmax_concurrent_requests = 3\n\n[config]'
        in added
    )


def test_added_entries_follow_the_siblings_style() -> None:
    added = edited_text(MULTILINE, add_server(ServerConfig("http://new:9", 2))).text
    assert (
        '\n    { url = "http://localhost:8803", max_concurrent_requests = 4 },\n    { url = "http://new:9", max_concurrent_requests = 2 },\n]'
        in added
    )
    tight = '[servers]\nservers = [{url = "http://a:1"}]\n'
    assert edited_text(tight, add_server(ServerConfig("http://b:2", 3))).text == (
        '[servers]\nservers = [{url = "http://a:1"}, {url = "http://b:2", max_concurrent_requests = 3}]\n'
    )


def test_removing_keeps_comments_of_the_other_entries() -> None:
    text = '[servers]\nservers = [\n    { url = "http://a:1" },  # a\n    # b is the big one\n    { url = "http://b:2" },  # b\n]\n'
    result = edited_text(text, remove_server("http://a:1"))
    assert result.text == '[servers]\nservers = [\n    # b is the big one\n    { url = "http://b:2" },  # b\n]\n'


def test_removing_the_last_table_entry_leaves_no_stray_key() -> None:
    text = '# top\n[config]\nmax_retries = 1\n\n[[servers.servers]]\nurl = "http://a:1"\n'
    result = edited_text(text, remove_server("http://a:1"))
    assert result.config.servers == ()
    assert "servers" not in result.text


def test_the_first_server_creates_the_table() -> None:
    text = "# nothing yet\n[config]\nmax_retries = 1\n"
    result = edited_text(text, add_server(ServerConfig("http://a:1", 3)))
    assert result.text.startswith(text)
    assert result.config.servers == (ServerConfig("http://a:1", 3),)
    assert edited_text("", add_server(ServerConfig("http://a:1"))).config.servers == (ServerConfig("http://a:1"),)


def test_windows_line_endings_are_kept() -> None:
    text = '[servers]\r\nservers = [\r\n  { url = "http://a:1" },\r\n]\r\n'
    result = edited_text(text, add_server(ServerConfig("http://b:2")))
    assert result.text.count("\r\n") == text.count("\r\n") + 1
    assert "\n" not in result.text.replace("\r\n", "")


def test_a_broken_file_is_not_edited_and_an_invalid_result_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "servers.toml"
    path.write_text('[servers]\nservers = [{ url = "http://a:1" }\n')
    with pytest.raises(ConfigEditError, match="fix them first"):
        apply_edit(path, set_server_value("http://a:1", "max_concurrent_requests", 2))
    path.write_text(ONE_LINE)
    with pytest.raises(ConfigEditError, match="invalid"):
        apply_edit(path, set_server_value("http://a:1", "max_concurrent_requests", 0))
    with pytest.raises(ConfigEditError, match="already"):
        apply_edit(path, add_server(ServerConfig("http://a:1/")))
    with pytest.raises(ConfigEditError, match="not in the"):
        apply_edit(path, remove_server("http://nope:1"))
    assert path.read_text() == ONE_LINE
    assert [entry.name for entry in tmp_path.iterdir()] == ["servers.toml"]  # no temporary file left


def test_writing_keeps_the_mode_and_writes_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real" / "servers.toml"
    real.parent.mkdir()
    real.write_text(ONE_LINE)
    real.chmod(0o640)
    link = tmp_path / "servers.toml"
    link.symlink_to(real)
    apply_edit(link, set_server_value("http://a:1", "max_concurrent_requests", 5))
    assert link.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert parse_config(real.read_text()).servers[0].max_concurrent_requests == 5


def test_a_new_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "servers.toml"
    write_atomic(path, "[servers]\nservers = []\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
