"""What a client may hold of the router's port ([limits]): idle and slow connections, slow and
large bodies, and more connections than it allows, with a router process in front of a
simulator and raw sockets as the clients."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests import http as client
from tests.helpers import Proc, start_sim, wait_until
from tests.router_setup import chat, metric, start_router, wait_healthy, write_config

LIMITS = """
[limits]
keepalive_timeout = 30
header_timeout = 1
body_timeout = 1
max_body_mb = 1
"""
WAIT_S = 10.0  # the longest any test here waits for the router to act


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    sim = start_sim("llama")
    router = None
    try:
        router = start_router(write_config(tmp_path_factory.mktemp("door") / "servers.toml", [sim.url], LIMITS))
        wait_healthy(router, 1)
        yield router
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


def connect(router: Proc) -> socket.socket:
    return socket.create_connection(("127.0.0.1", router.port), timeout=WAIT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the router sends until it closes the connection (WAIT_S at most)."""
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the router kept the connection open for {WAIT_S} s; got {received[:200]!r}") from None
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def error_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def test_an_idle_kept_alive_connection_is_closed_after_keepalive_timeout(tmp_path: Path) -> None:
    sim = start_sim("llama")
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], "[limits]\nkeepalive_timeout = 1\n"))
        with connect(router) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 ")  # answered and kept alive...
            assert b"Connection: close" not in first
            read_until_closed(sock)  # ...then closed once idle
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


@pytest.mark.parametrize("kept_alive", [False, True])
def test_headers_that_do_not_arrive_within_header_timeout_get_408(door: Proc, kept_alive: bool) -> None:
    with connect(door) as sock:
        if kept_alive:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 ")
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        status, error = error_of(read_until_closed(sock))
    assert status == 408
    assert "header_timeout" in error["message"]


def test_headers_dripped_slowly_are_cut_off(door: Proc) -> None:
    """Slowloris: a header line now and then keeps no connection open for long."""
    with connect(door) as sock:
        sock.settimeout(0.2)
        for number in range(int(WAIT_S / 0.2)):
            try:
                sock.sendall(b"X-Drip-%d: x\r\n" % number)
                sock.recv(65536)
                break  # an answer, or the end of the connection
            except TimeoutError:
                continue
            except OSError:
                break
        else:
            raise AssertionError("the router kept a dripping connection open")


def test_a_body_that_stops_coming_gets_408_after_body_timeout(door: Proc) -> None:
    with connect(door) as sock:
        sock.sendall(
            b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model"'
        )
        raw = sock.recv(65536)
    status, error = error_of(raw)
    assert status == 408
    assert error["message"].startswith("The request body did not arrive")


def test_a_body_over_max_body_mb_gets_an_openai_413(door: Proc) -> None:
    answer = client.post(door.url + "/v1/chat/completions", content=b" " * (2 * 1024 * 1024))
    assert answer.status_code == 413
    assert answer.headers["content-type"].startswith("application/json")
    assert "max_body_mb" in answer.json()["error"]["message"]


def test_a_chunked_body_over_max_body_mb_gets_413(door: Proc) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", door.port, timeout=WAIT_S)
    try:
        chunks = (b" " * 65536 for _ in range(40))  # 2.5 MiB, no Content-Length
        connection.request("POST", "/v1/chat/completions", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True)
        answer = connection.getresponse()
        assert answer.status == 413
        assert "max_body_mb" in json.loads(answer.read())["error"]["message"]
    finally:
        connection.close()


def test_a_gzip_bomb_is_inflated_only_up_to_max_body_mb(door: Proc) -> None:
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]")  # 64 MiB from about 64 KiB
    answer = client.post(door.url + "/v1/chat/completions", content=bomb, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 413
    assert answer.json()["error"]["message"]


def test_a_gzipped_body_is_understood(door: Proc) -> None:
    body = gzip.compress(json.dumps(chat()).encode())
    answer = client.post(door.url + "/v1/chat/completions", content=body, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"]


def test_connections_over_max_connections_get_503_and_the_rest_are_served(tmp_path: Path) -> None:
    sim = start_sim("llama")
    router = None
    try:
        limits = "[limits]\nmax_connections = 4\nheader_timeout = 60\n"
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url], limits))
        wait_healthy(router, 1)
        with ExitStack() as idle:
            held = [idle.enter_context(connect(router)) for _ in range(4)]
            refused = client.get(router.url + "/health")
            assert refused.status_code == 503
            assert refused.headers["retry-after"]
            assert "too many connections" in refused.json()["error"]["message"]
            held.pop().close()
            wait_until(lambda: client.get(router.url + "/health").status_code == 200, timeout=WAIT_S)
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


def test_a_connection_flood_never_starves_the_router_of_file_descriptors(tmp_path: Path) -> None:
    """More connections than the open-file limit: the excess get 503 or are dropped, the
    backend is still polled (it stays up, no poll fails) and the log holds no traceback."""
    sim = start_sim("llama")
    router = None
    try:
        router = start_router(write_config(tmp_path / "servers.toml", [sim.url]), open_files=256)
        wait_healthy(router, 1)
        with ExitStack() as flood:
            for _ in range(400):
                flood.enter_context(socket.create_connection(("127.0.0.1", router.port), timeout=WAIT_S))
            wait_until(lambda: _refused_with_503(router), timeout=WAIT_S, what="a 503 for one more connection")
        wait_until(lambda: _answers(router), timeout=WAIT_S, what="the router answering again")
        stats = client.get(router.url + "/load-stats").json()
        assert stats["healthy_servers"] == 1
        assert metric(router, "mvtui_poll_errors_total") == 0
        log = router.log_tail(400)
        assert "Traceback" not in log and "Too many open files" not in log, log
    finally:
        for proc in (router, sim):
            if proc is not None:
                proc.stop()


def _refused_with_503(router: Proc) -> bool:
    try:
        answer = client.get(router.url + "/health", timeout=2)
    except OSError:
        return False  # dropped: too many refusals were still being delivered
    return answer.status_code == 503 and "too many connections" in answer.json()["error"]["message"]


def _answers(router: Proc) -> bool:
    try:
        return client.get(router.url + "/health", timeout=2).status_code == 200
    except OSError:
        return False
