"""Property-based tests of the config parser: whatever the text, a ConfigError listing problems
or a Config that holds only usable values, never another exception."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import tomlkit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvtui.config.schema import (
    ADMIN_SCHEMA,
    INSTANCE_SCHEMA,
    ROUTER_SCHEMA,
    SERVER_SCHEMA,
    TIMING_SCHEMA,
    UI_SCHEMA,
    Config,
    ServerConfig,
    normalize_url,
    parse_config,
    redact_url,
)
from mvtui.errors import ConfigError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 8, 65535, 65536, 0.5, 1e308]),
    st.text(max_size=12),
)
urls = st.builds(
    lambda scheme, userinfo, host, port, tail: f"{scheme}{userinfo}{host}{port}{tail}",
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "", "http:/"]),
    st.sampled_from(["", "u:p@", "@", "a@b@"]),
    st.sampled_from(["a", "Host", "127.0.0.1", "[::1]", "[::1", "", "h o", "xn--d\u00e9j\u00e0"]),
    st.sampled_from(["", ":0", ":80", ":443", ":8000", ":99999", ":x", ":"]),
    st.sampled_from(["", "/", "/v1/", "//", "?q=1", "#f", " ", "/\n"]) | st.text(max_size=6),
)
values = st.recursive(
    scalars | urls, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6
)


def table(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Keys of the schema (and some unknown ones) with values of any type."""
    keys = st.sampled_from(sorted(schema)) | st.text(min_size=1, max_size=6)
    return st.dictionaries(keys, values | urls, max_size=4)


def server_entry() -> st.SearchStrategy[Any]:
    entry = st.fixed_dictionaries({"url": urls}, optional={key: values for key in SERVER_SCHEMA if key != "url"})
    return entry | values


documents = st.fixed_dictionaries(
    {},
    optional={
        "router": table(ROUTER_SCHEMA),
        "config": table(TIMING_SCHEMA),
        "admin": table(ADMIN_SCHEMA),
        "ui": table(UI_SCHEMA),
        "servers": st.fixed_dictionaries({"servers": st.lists(server_entry(), max_size=4)}) | values,
        "instances": st.lists(table(INSTANCE_SCHEMA), max_size=3),
        "extra": values,
    },
)


def dump(document: dict[str, Any]) -> str | None:
    try:
        return tomlkit.dumps(document)
    except Exception:  # a shape TOML cannot write (mixed arrays in old writers): not a config text
        return None


def check_usable(config: Config) -> None:
    for number in _numbers(config):
        assert math.isfinite(number)
    urls_seen = [server.url for server in config.servers]
    assert len(set(urls_seen)) == len(urls_seen)
    assert all(normalize_url(url) == url for url in urls_seen)
    labels = [server.label for server in config.servers]
    assert len(set(labels)) == len(labels)
    for server in config.servers:
        assert isinstance(server.models, tuple) and all(isinstance(model, str) and model for model in server.models)
    assert all(isinstance(key, str) and key for key in config.router.api_keys)


def _numbers(value: Any) -> list[float]:
    if dataclasses.is_dataclass(value):
        return [n for f in dataclasses.fields(value) for n in _numbers(getattr(value, f.name))]
    if isinstance(value, (tuple, list)):
        return [n for item in value for n in _numbers(item)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


def parses_or_explains(text: str) -> None:
    try:
        config = parse_config(text)
    except ConfigError as error:
        assert error.problems and all(problem.message for problem in error.problems)
        str(error)
        return
    check_usable(config)


@SETTINGS
@given(documents)
def test_any_document_gives_a_config_error_or_a_usable_config(document: dict[str, Any]) -> None:
    text = dump(document)
    if text is not None:
        parses_or_explains(text)


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list('[]{}="., \n#abcinfurlsev0123:/_-')) | st.characters(), max_size=200))
def test_any_text_gives_a_config_error_or_a_usable_config(text: str) -> None:
    parses_or_explains(text)


@SETTINGS
@given(st.lists(urls, max_size=5))
def test_server_lists_give_a_config_error_or_distinct_usable_servers(written: list[str]) -> None:
    text = dump({"servers": {"servers": [{"url": url} for url in written]}})
    assert text is not None
    parses_or_explains(text)


@SETTINGS
@given(st.text(alphabet=st.characters(blacklist_characters="/?#", blacklist_categories=("Cs",)), min_size=1, max_size=12), urls)
def test_credentials_never_survive_redaction(password: str, url: str) -> None:
    with_credentials = url.replace("://", f"://alice:{password}@", 1) if "://" in url else url
    shown = redact_url(with_credentials)
    assert f"alice:{password}" not in shown
    assert f"alice:{password}" not in ServerConfig(url=normalize_url(with_credentials)).label


@SETTINGS
@given(urls | st.text(max_size=30))
def test_normalize_url_is_total_and_idempotent(url: str) -> None:
    once = normalize_url(url)
    assert normalize_url(once) == once


numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-5, max_value=10**6)


@SETTINGS
@given(
    st.dictionaries(st.sampled_from(sorted(TIMING_SCHEMA)), numbers, max_size=5),
    st.dictionaries(st.sampled_from(["max_concurrent_requests"]), numbers),
    st.dictionaries(st.sampled_from(["gpu_memory_utilization", "idle_timeout", "startup_timeout", "max_model_len"]), numbers),
)
def test_numbers_are_finite_and_in_range_or_refused(timing: dict[str, Any], server: dict[str, Any], instance: dict[str, Any]) -> None:
    text = dump({"config": timing, "servers": {"servers": [{"url": "http://a:1", **server}]}, "instances": [{"model": "m", **instance}]})
    assert text is not None
    parses_or_explains(text)
