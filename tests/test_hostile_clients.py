"""Clients that send what they should not: bodies nested too deeply or coded wrongly, no key
or a wrong one; and what the router answers and records for them."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvtui.config.schema import parse_config
from mvtui.paths import AppPaths
from mvtui.router import headers
from mvtui.router.headers import key_matches
from mvtui.runtime.wiring import Services
from tests import http
from tests.helpers import Proc, eventually, start_sim
from tests.router_setup import chat, start_router, wait_healthy, write_config

KEYS = '[router]\napi_keys = ["first-key", "second-key"]\n'


@pytest.fixture(scope="module")
def sim() -> Iterator[Proc]:
    proc = start_sim("llama")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyed(sim: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    router = start_router(write_config(tmp_path_factory.mktemp("keyed") / "servers.toml", [sim.url], KEYS))
    try:
        wait_healthy(router, 1, key="second-key")
        yield router
    finally:
        router.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_load_stats_and_metrics_need_a_key_and_health_does_not(keyed: Proc) -> None:
    assert http.get(keyed.url + "/health").status_code == 200  # load balancers probe it bare
    for path in ("/load-stats", "/metrics", "/v1/models"):
        refused = http.get(keyed.url + path)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert http.get(keyed.url + path, headers=bearer("wrong")).status_code == 401, path
        assert http.get(keyed.url + path, headers=bearer("second-key")).status_code == 200, path


def test_open_endpoints_opens_status_endpoints_to_all(sim: Proc, tmp_path: Path) -> None:
    router = start_router(write_config(tmp_path / "servers.toml", [sim.url], KEYS + 'open_endpoints = ["/health", "/metrics"]\n'))
    try:
        assert http.get(router.url + "/metrics").status_code == 200
        assert http.get(router.url + "/load-stats").status_code == 401
    finally:
        router.stop()


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(headers.hmac, "compare_digest", compare)
    keys = ("first-key", "second-key", "third-ключ")
    assert key_matches("first-key", keys)  # a match on the first key still compares with all
    assert len(compared) == 3
    assert key_matches("third-ключ", keys)
    assert not key_matches("second", keys)
    assert not key_matches(None, keys)
    assert not key_matches("", ("",))  # no key sent never matches


def test_a_deeply_nested_body_gets_an_openai_400(keyed: Proc) -> None:
    deep = b'{"model": "llama", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    answer = http.post(keyed.url + "/v1/chat/completions", content=deep, headers=bearer("first-key"))
    assert answer.status_code == 400
    assert "nested too deeply" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("encoding", "status"),
    [("gzip", 400), ("deflate", 400), ("br", 415), ("zstd", 415), ("gzip, br", 415), ("whatever", 415)],
)
def test_a_body_the_router_cannot_decode_gets_an_openai_4xx(keyed: Proc, encoding: str, status: int) -> None:
    headers_ = {**bearer("first-key"), "Content-Encoding": encoding}
    answer = http.post(keyed.url + "/v1/chat/completions", content=b"this is not compressed", headers=headers_)
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["message"]


def test_a_truncated_gzip_body_gets_an_openai_400(keyed: Proc) -> None:
    body = gzip.compress(json.dumps(chat()).encode())[:-12]
    answer = http.post(keyed.url + "/v1/chat/completions", content=body, headers={**bearer("first-key"), "Content-Encoding": "gzip"})
    assert answer.status_code == 400
    assert "gzip" in answer.json()["error"]["message"]


def test_an_unknown_path_or_method_gets_an_openai_error(keyed: Proc) -> None:
    missing = http.get(keyed.url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    wrong = http.get(keyed.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]
    assert wrong.json()["error"]["message"]


async def test_requests_the_router_rejects_are_logged_and_counted(sim: Proc, tmp_path: Path) -> None:
    text = write_config(tmp_path / "servers.toml", [sim.url], KEYS + "[limits]\nmax_body_mb = 1\n").read_text()
    config = parse_config(text)
    config = dataclasses.replace(
        config, router=dataclasses.replace(config.router, host="127.0.0.1", port=0), admin=dataclasses.replace(config.admin, enabled=False)
    )
    paths = AppPaths(config_dir=tmp_path / "config", log_dir=tmp_path / "log", state_dir=tmp_path / "state")
    async with Services(config, paths=paths) as services:
        await eventually(lambda: services.cluster.summary().up == 1)
        url, key = services.router_url + "/v1/chat/completions", bearer("first-key")
        cases = [
            (401, {"json": chat()}),
            (404, {"json": chat(model="no-such-model"), "headers": key}),
            (400, {"content": b"{not json", "headers": key}),
            (413, {"content": b" " * (2 * 1024 * 1024), "headers": key}),
            (415, {"content": b"{}", "headers": {**key, "Content-Encoding": "br"}}),
        ]
        for status, options in cases:
            answer = await asyncio.to_thread(http.post, url, **options)
            assert answer.status_code == status, answer.text
        rejected = [record for record in services.cluster.request_log if record.server == "router"]
        assert sorted(record.status for record in rejected) == [400, 401, 404, 413, 415]
        assert next(record for record in rejected if record.status == 404).model == "no-such-model"
        assert services.cluster.summary().errors == 5
        metrics = (await asyncio.to_thread(http.get, services.router_url + "/metrics", headers=key)).text
        for status in (400, 401, 404, 413, 415):
            # a model name the router does not know never becomes a label
            assert f'mvtui_requests_total{{model="-",server="router",status="{status}"}} 1.0' in metrics, status
