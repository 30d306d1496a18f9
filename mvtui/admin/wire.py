"""One HTTP/1.1 exchange over a plain socket, for the admin CLI.

The admin API listens on loopback and answers small JSON bodies. `urllib.request` would
import `http.client`, the email parser, `ssl` and `hashlib` on every CLI call, which costs
more than the call itself; this is the part of HTTP the CLI uses: one request with
`Connection: close`, a body read by Content-Length, chunks or to the end.
"""

from __future__ import annotations

import socket
import urllib.parse
from typing import NamedTuple

MAX_HEADER_BYTES = 64 * 1024


class WireError(Exception):
    """The answer is not HTTP the CLI can read."""


class Answer(NamedTuple):
    status: int
    reason: str
    body: bytes


def exchange(url: str, method: str, headers: dict[str, str], body: bytes | None, timeout: float) -> Answer:
    """Send one request to an http:// URL and read the whole answer. OSError (refused,
    reset, TimeoutError) when the connection fails; WireError when the answer is garbled."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise WireError(f"not an http:// URL: {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout) as sock:
        sock.sendall(_request(method, target, parts.netloc, headers, body))
        return _answer(_read_all(sock))


def _request(method: str, target: str, host: str, headers: dict[str, str], body: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", "Accept: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(raw: bytes) -> Answer:
    head, separator, rest = raw.partition(b"\r\n\r\n")
    if not separator or len(head) > MAX_HEADER_BYTES:
        raise WireError("the answer has no complete HTTP header")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, status_reason = status_line.partition(" ")
    code, _, reason = status_reason.partition(" ")
    if not version.startswith("HTTP/") or not code.isdigit():
        raise WireError(f"not an HTTP status line: {status_line[:80]!r}")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return Answer(int(code), reason, _body(rest, headers))


def _body(rest: bytes, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _unchunked(rest)
    length = headers.get("content-length")
    if length is None:
        return rest  # read to the end of the connection
    if not length.isdigit() or len(rest) < int(length):
        raise WireError("the answer ended before its Content-Length")
    return rest[: int(length)]


def _unchunked(data: bytes) -> bytes:
    body = bytearray()
    while True:
        size_line, separator, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise WireError("a garbled chunk size") from None
        if not separator or len(data) < size:
            raise WireError("the answer ended inside a chunk")
        if size == 0:
            return bytes(body)
        body += data[:size]
        data = data[size + 2 :]
