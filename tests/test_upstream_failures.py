"""Backends that fail a request the router forwarded: long generations, answers cut or hung
mid-body, redirects, 500 to everything, huge answers, a server that stops mid-generation."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import http
from tests.helpers import Proc, start_sim, wait_until
from tests.router_setup import (
    FAST,
    STEADY,
    chat,
    metric,
    peak_memory_kib,
    server_stats,
    set_faults,
    sim_state,
    start_router,
    wait_healthy,
    write_config,
)

MIB = 1024 * 1024


def stop_all(*procs: Proc | None) -> None:
    for proc in procs:
        if proc is not None:
            proc.stop()


def client_for(router: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0, timeout=30)


def test_a_non_streamed_generation_longer_than_request_timeout_is_answered_once(tmp_path: Path) -> None:
    """vLLM sends nothing until a non-streamed answer is done: request_timeout must not end it."""
    sim = start_sim("llama", extra=["--tokens-per-s", "10", "--ttft-ms", "5"])  # 20 tokens: about 2 s
    router = None
    try:
        router = start_router(
            write_config(tmp_path / "servers.toml", [sim.url], timing=STEADY.replace("request_timeout = 20", "request_timeout = 1"))
        )
        wait_healthy(router, 1)
        reply = client_for(router).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=20)
        assert reply.usage is not None and reply.usage.completion_tokens == 20
        assert sim_state(sim)["received"] == 1  # not restarted: one generation, not four
    finally:
        stop_all(router, sim)


def test_a_server_that_stops_mid_generation_is_left_for_a_peer(tmp_path: Path) -> None:
    """A non-streamed wait lasts while the server passes its health checks, not request_timeout."""
    sims = [start_sim("llama", extra=["--tokens-per-s", "10", "--ttft-ms", "5"]) for _ in range(2)]
    router = None
    frozen: Proc | None = None
    try:
        timing = FAST.replace("request_timeout = 20", "request_timeout = 600")
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url for sim in sims], timing=timing))
        wait_healthy(router, 2)
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(answer=http.post(router.url + "/v1/chat/completions", json=chat(max_tokens=20), timeout=60))
        )
        thread.start()
        frozen = wait_until(lambda: next((sim for sim in sims if sim_state(sim)["running"] == 1), None), what="the request running")
        os.killpg(frozen.pid, signal.SIGSTOP)
        thread.join(timeout=60)
        os.killpg(frozen.pid, signal.SIGCONT)
        peer = next(sim for sim in sims if sim is not frozen)
        assert result["answer"].status_code == 200, result["answer"].text
        assert sim_state(peer)["received"] == 1
        assert metric(router, "mvtui_upstream_errors_total", kind="down") == 1
    finally:
        if frozen is not None:
            os.killpg(frozen.pid, signal.SIGCONT)
        stop_all(router, *sims)


def test_an_answer_cut_mid_body_is_retried_on_a_peer_and_counted(tmp_path: Path) -> None:
    broken, healthy = start_sim("llama"), start_sim("llama")
    router = None
    try:
        set_faults(broken, cut_body=True)
        router = start_router(write_config(tmp_path / "servers.toml", [broken.url, healthy.url]))
        wait_healthy(router, 2)
        client = client_for(router)
        for _ in range(6):
            assert client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=2).choices
        cut = sim_state(broken)["cut"]
        assert cut >= 1
        assert server_stats(router, broken.url)["errors"] == cut
        assert metric(router, "mvtui_upstream_errors_total", kind="cut") == cut
        assert metric(router, "mvtui_retries_total") == cut
    finally:
        stop_all(router, broken, healthy)


@pytest.mark.parametrize("fault", ["cut_body", "stall_body"])
def test_an_answer_cut_or_hung_mid_body_with_no_peer_is_an_openai_502(tmp_path: Path, fault: str) -> None:
    sim = start_sim("llama")
    router = None
    try:
        set_faults(sim, **{fault: True})
        timing = STEADY.replace("request_timeout = 20", "request_timeout = 1")
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], timing=timing))
        wait_healthy(router, 1)
        answer = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert answer.status_code == 502
        assert "mid-answer" in answer.json()["error"]["message"]
        assert sim_state(sim)["received"] == 1  # the server that failed is not asked again
        assert metric(router, "mvtui_upstream_errors_total", kind="cut" if fault == "cut_body" else "timeout") == 1
        assert metric(router, "mvtui_requests_total", status="502") == 1
        assert "mid-answer" in server_stats(router, sim.url)["last_error"]
    finally:
        stop_all(router, sim)


@pytest.mark.parametrize("target", ["elsewhere", "itself"])
def test_a_redirect_from_a_backend_is_not_followed(tmp_path: Path, target: str) -> None:
    redirecting, elsewhere = start_sim("llama"), start_sim("llama")
    router = None
    try:
        location = (elsewhere if target == "elsewhere" else redirecting).url + "/v1/chat/completions"
        set_faults(redirecting, redirect_to=location)
        router = start_router(write_config(tmp_path / "servers.toml", [redirecting.url]))
        wait_healthy(router, 1)
        answer = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert answer.status_code == 502
        assert "redirect" in answer.json()["error"]["message"]
        assert sim_state(elsewhere)["received"] == 0
        assert sim_state(redirecting)["received"] == 1
        assert metric(router, "mvtui_upstream_errors_total", kind="redirect") == 1
    finally:
        stop_all(router, redirecting, elsewhere)


def test_a_backend_that_answers_500_to_everything_gets_one_try_per_request(tmp_path: Path) -> None:
    sims = [start_sim("llama", extra=["--fail-rate", "1.0"]) for _ in range(2)]
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url for sim in sims]))  # max_retries = 3
        wait_healthy(router, 2)
        answer = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert answer.status_code == 500
        assert answer.json()["error"]["message"]  # the last server's own answer, relayed
        assert [sim_state(sim)["received"] for sim in sims] == [1, 1]
        for sim in sims:
            assert server_stats(router, sim.url)["errors"] == 1
            assert server_stats(router, sim.url)["last_error"] == "answered 500"
        assert metric(router, "mvtui_upstream_errors_total", kind="status") == 2
    finally:
        stop_all(router, *sims)


def test_scrubbing_hides_upstream_error_bodies_and_server_names(tmp_path: Path) -> None:
    sim = start_sim("llama", extra=["--fail-rate", "1.0"])
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], "[router]\nscrub_upstream_errors = true\n"))
        wait_healthy(router, 1)
        failed = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert failed.status_code == 500
        assert failed.json()["error"]["message"] == "An upstream server answered 500"
        set_faults(sim, fail_rate=0.0, cut_body=True)
        cut = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
        assert cut.status_code == 502
        assert cut.json()["error"]["message"] == "An upstream server failed mid-answer"
        assert str(sim.port) not in failed.text + cut.text
        assert "not completed" in server_stats(router, sim.url)["last_error"]  # the operator still sees it all
    finally:
        stop_all(router, sim)


def test_a_huge_non_streamed_answer_is_relayed_in_bounded_memory(tmp_path: Path) -> None:
    sim = start_sim("llama")
    router = None
    try:
        padding = 96 * MIB
        set_faults(sim, pad_answer_bytes=padding)
        # the simulator's loop stalls while it writes such an answer: no health check may fail meanwhile
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url]))  # health checks 10 s apart
        wait_healthy(router, 1)
        before = peak_memory_kib(router)
        answer = http.post(router.url + "/v1/chat/completions", json=chat(), timeout=60)
        assert answer.status_code == 200
        body = json.loads(answer.content)
        assert len(body["padding"]) == padding and body["usage"]["completion_tokens"] == 4
        growth_mib = (peak_memory_kib(router) - before) / 1024
        assert growth_mib < 32, f"the router's peak memory grew by {growth_mib:.0f} MiB for a {padding // MIB} MiB answer"
        assert http.post(router.url + "/v1/chat/completions", json=chat(), timeout=60).status_code == 200
        assert metric(router, "mvtui_requests_total", status="200") == 2
    finally:
        stop_all(router, sim)
