"""A small blocking HTTP client on the standard library, for tests that need status codes,
raw bodies, early disconnects and read timeouts without a third-party client."""

from __future__ import annotations

import http.client
import json as jsonlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Response:
    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return jsonlib.loads(self.content)


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), path or "/"


def _send(
    method: str, url: str, *, json: Any = None, content: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> http.client.HTTPConnection:
    connection, path = _connect(url, timeout)
    body = jsonlib.dumps(json).encode() if json is not None else content
    all_headers = dict(headers or {})
    if body is not None and not any(name.lower() == "content-type" for name in all_headers):
        all_headers["Content-Type"] = "application/json"
    connection.request(method, path, body=body, headers=all_headers)
    return connection


def request(method: str, url: str, **options: Any) -> Response:
    connection = _send(method, url, **options)
    try:
        answer = connection.getresponse()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
    finally:
        connection.close()


def get(url: str, **options: Any) -> Response:
    return request("GET", url, **options)


def post(url: str, **options: Any) -> Response:
    return request("POST", url, **options)


@contextmanager
def stream(url: str, **options: Any) -> Iterator[tuple[int, Iterator[str]]]:
    """POST and yield (status, lines as they arrive); leaving the block disconnects."""
    connection = _send("POST", url, **options)
    try:
        answer = connection.getresponse()
        yield answer.status, (raw.decode().rstrip("\r\n") for raw in iter(answer.readline, b""))
    finally:
        connection.close()
