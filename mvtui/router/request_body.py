"""Reading a client's request body within bounds: its size (after decoding), the time it may
take, and the content codings the router understands.

aiohttp's own decoding is turned off on the front door (front_door.py): a coding it cannot
read, or a body that does not inflate, is answered here as an OpenAI 4xx, and inflating stops
at the size limit (a gzip bomb costs at most `max_body_mb`).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any, Protocol

import aiohttp
from aiohttp import web

MIB = 1024 * 1024
GZIP_WBITS = 16 + zlib.MAX_WBITS


class BodyError(Exception):
    """A request body the router does not take; the proxy answers it as an OpenAI error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Decoder(Protocol):
    def feed(self, data: bytes, room: int) -> bytes: ...

    def finish(self) -> None: ...


class _Identity:
    def feed(self, data: bytes, room: int) -> bytes:
        return data

    def finish(self) -> None:
        return None


IDENTITY = _Identity()


class _Inflate:
    """gzip or deflate (zlib-wrapped, or raw as some clients send it), bounded output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._inflater: zlib._Decompress | None = zlib.decompressobj(GZIP_WBITS) if name != "deflate" else None

    def feed(self, data: bytes, room: int) -> bytes:
        if self._inflater is None:  # deflate: the first byte tells zlib-wrapped from raw
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS if data[:1] and data[0] & 0x0F == 8 else -zlib.MAX_WBITS)
        try:
            return self._inflater.decompress(data, room + 1)  # more than `room` means too big
        except zlib.error as error:
            raise BodyError(400, f"The request body is not valid {self.name} data ({error})") from None

    def finish(self) -> None:
        if self._inflater is not None and not self._inflater.eof:
            raise BodyError(400, f"The request body ends inside its {self.name} data")


def decoder_for(content_encoding: str) -> _Decoder:
    if not content_encoding:
        return IDENTITY
    codings = [part.strip().lower() for part in content_encoding.split(",") if part.strip()]
    codings = [coding for coding in codings if coding != "identity"]
    if not codings:
        return _Identity()
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return _Inflate("deflate" if codings[0] == "deflate" else "gzip")
    raise BodyError(415, f"Content-Encoding {content_encoding!r} is not supported; use gzip, deflate or none")


async def read_body(request: web.Request, max_bytes: int, timeout: float) -> bytearray:
    """The whole body, decoded; BodyError for one too big (413), too slow (408) or unreadable."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise _too_big(max_bytes)
    body = _Body(decoder_for(request.headers.get("Content-Encoding", "")), max_bytes)
    content = request.content
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while not content.at_eof():
            # what has arrived already needs no timer: most bodies come with their headers
            body.add(content.read_nowait() or await _wait_for_more(content, deadline))
        return body.finish()
    except TimeoutError:
        raise BodyError(408, f"The request body did not arrive within {timeout:g} s") from None
    except (aiohttp.ClientPayloadError, web.RequestPayloadError, ValueError) as error:
        raise BodyError(400, f"The request body could not be read: {error}") from None


async def _wait_for_more(content: aiohttp.StreamReader, deadline: float) -> bytes:
    async with asyncio.timeout_at(deadline):
        return await content.readany()


class _Body:
    """The decoded body as it grows, never past `max_bytes` (nor its coded form)."""

    def __init__(self, decoder: _Decoder, max_bytes: int) -> None:
        self.decoder = decoder
        self.max_bytes = max_bytes
        self.data = bytearray()
        self.received = 0

    def add(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise _too_big(self.max_bytes)
        self.data += self.decoder.feed(chunk, self.max_bytes - len(self.data))
        if len(self.data) > self.max_bytes:
            raise _too_big(self.max_bytes)

    def finish(self) -> bytearray:
        self.decoder.finish()
        return self.data


def _too_big(max_bytes: int) -> BodyError:
    return BodyError(413, f"The request body is larger than the router's limit of {max_bytes / MIB:g} MiB ([limits] max_body_mb)")


def json_object(body: bytes | bytearray) -> dict[str, Any]:
    """The body as a JSON object; BodyError (400) for anything else, deep nesting included."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise BodyError(400, f"The request body is not valid JSON: {error}") from None
    except RecursionError:
        raise BodyError(400, "The request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BodyError(400, "The request body must be a JSON object")
    return payload
