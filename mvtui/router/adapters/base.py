"""What every protocol adapter shares: the `Adapter` protocol, the client of mvtui's own
OpenAI front door that adapters send their translated requests to, and the reader of its
streamed answers.

An adapter is a client of the router, not a part of its hot path: its handler reads the
foreign request (within `[limits]`), sends an OpenAI request to the router's own route over
loopback on the shared HTTP session, with the client's key, so that keys, the queue, circuit
breakers, retries, metrics and the request log apply to it as to any OpenAI client, and
turns the answer back into its own protocol. Generations are always streamed from the front
door (with usage), whatever the client asked for: one reader, and the time to the first token
is known.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mvtui.config.schema import Config
from mvtui.router.request_body import MIB, BodyError, json_object, read_body

ENTRY_POINT_GROUP = "mvtui.adapters"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
LOAD_STATS_PATH = "/load-stats"
KEY_HEADERS = ("Authorization", "x-api-key")  # the client's key travels with its request
MAX_EVENT_BYTES = 8 * MIB  # one SSE event of an answer; longer is a broken answer
MAX_ERROR_BYTES = 64 * 1024  # of an error answer, read to find its message
WILDCARD_HOSTS = {"", "0.0.0.0"}


class AdapterError(Exception):
    """A request that cannot be answered; each adapter writes it in its protocol's shape."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class StreamBroken(AdapterError):
    """The front door's answer failed or was cut after it had begun."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message)


class Adapter(Protocol):
    """A protocol served beside the OpenAI routes. `routes` is called once, when the router
    starts; its handlers use `door` to reach the router's own OpenAI routes."""

    name: str

    def routes(self, door: FrontDoorClient) -> list[web.RouteDef]: ...


def loopback_url(host: str, port: int) -> str:
    """The router's own address, as this process reaches it: a wildcard bind is reached on
    loopback (asyncio binds `::` to IPv6 only)."""
    if host in WILDCARD_HOSTS:
        return f"http://127.0.0.1:{port}"
    if host == "::":
        return f"http://[::1]:{port}"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class FrontDoorClient:
    """Requests to the router's own routes, on behalf of the client of `request`."""

    session: aiohttp.ClientSession
    base_url: Callable[[], str]  # asked at each request: the port is known once listening
    config: Callable[[], Config]

    async def read_json(self, request: web.Request) -> dict[str, Any]:
        """The client's body as a JSON object, read within `[limits]` like the proxy reads it."""
        limits = self.config().limits
        try:
            return json_object(await read_body(request, int(limits.max_body_mb * MIB), limits.body_timeout))
        except BodyError as error:
            raise AdapterError(error.status, error.message) from None

    async def get_json(self, request: web.Request, path: str) -> Any:
        """GET one of the router's routes; its error (a 401...) becomes an AdapterError."""
        try:
            async with self.session.get(self.base_url() + path, headers=key_headers(request)) as answer:
                if answer.status != 200:
                    raise await answer_error(answer)
                return await answer.json(content_type=None)
        except (aiohttp.ClientError, ValueError) as error:
            raise AdapterError(502, f"mvtui's own {path} failed: {error}") from None

    @asynccontextmanager
    async def stream(self, request: web.Request, path: str, payload: dict[str, Any]) -> AsyncIterator[OpenAIStream]:
        """POST `payload` to an OpenAI generation route as a stream with usage; an answer that
        is not a 200 is raised as an AdapterError with its status before anything is read."""
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter_ns()
        try:
            async with self.session.post(self.base_url() + path, json=payload, headers=key_headers(request)) as answer:
                if answer.status != 200:
                    raise await answer_error(answer)
                yield OpenAIStream(answer, started)
        except aiohttp.ClientError as error:
            raise AdapterError(502, f"mvtui's own {path} failed: {error}") from None


def key_headers(request: web.Request) -> dict[str, str]:
    return {name: request.headers[name] for name in KEY_HEADERS if name in request.headers}


async def answer_error(answer: aiohttp.ClientResponse) -> AdapterError:
    """The router's error answer (OpenAI's shape) as an AdapterError: status, message, Retry-After."""
    raw = await answer.content.read(MAX_ERROR_BYTES)
    retry_after = answer.headers.get("Retry-After")
    return AdapterError(
        answer.status, error_message(raw) or answer.reason or "error", {"Retry-After": retry_after} if retry_after else None
    )


def error_message(raw: bytes) -> str:
    """The message of an OpenAI error body (`{"error": {"message": ...}}`), else its text."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw.decode(errors="replace").strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or body)


@dataclass
class Delta:
    """What one event of a generation added: answer text, reasoning text."""

    text: str = ""
    thinking: str = ""


@dataclass
class ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""  # JSON text, as it streamed in


@dataclass
class OpenAIStream:
    """A streamed chat or text completion, read as deltas of its first choice; what its end
    said (finish reason, usage, tool calls) is kept."""

    answer: aiohttp.ClientResponse
    started_ns: int
    first_token_ns: int | None = None
    finish_reason: str | None = None
    model: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    tool_calls: dict[int, ToolCall] = field(default_factory=dict)
    done: bool = False

    async def deltas(self) -> AsyncIterator[Delta]:
        """Each non-empty delta; StreamBroken when the answer fails or ends before `[DONE]`."""
        async for event in self._events():
            delta = self._take(event)
            if delta.text or delta.thinking:
                if self.first_token_ns is None:
                    self.first_token_ns = time.perf_counter_ns()
                yield delta
        if not self.done:
            raise StreamBroken("The answer ended before it was complete")

    async def collect(self) -> Delta:
        """The whole answer, for a client that did not ask for a stream."""
        whole = Delta()
        async for delta in self.deltas():
            whole.text += delta.text
            whole.thinking += delta.thinking
        return whole

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or 0)

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or 0)

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        data: list[str] = []
        async for line in self._lines():
            if line:
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                continue
            if not data:
                continue
            text, data = "\n".join(data), []
            if text.strip() == "[DONE]":
                self.done = True
                return
            yield _event(text)

    async def _lines(self) -> AsyncIterator[str]:
        pending = bytearray()
        try:
            async for chunk in self.answer.content.iter_any():
                pending += chunk
                *lines, rest = pending.split(b"\n")
                if len(rest) > MAX_EVENT_BYTES:
                    raise StreamBroken("An event of the answer is too long")
                pending = bytearray(rest)
                for line in lines:
                    yield line.rstrip(b"\r").decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise StreamBroken(f"The answer was cut short: {error or type(error).__name__}") from None
        yield pending.decode(errors="replace")
        yield ""  # an event not followed by its blank line still counts

    def _take(self, event: dict[str, Any]) -> Delta:
        if event.get("error") is not None:
            raise StreamBroken(error_message(json.dumps(event).encode()))
        self.model = event.get("model") or self.model
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                return self._choice(choice)
        return Delta()

    def _choice(self, choice: dict[str, Any]) -> Delta:
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        delta = choice.get("delta")
        if not isinstance(delta, dict):  # a text completion
            return Delta(text=str(choice.get("text") or ""))
        for call in delta.get("tool_calls") or []:
            self._tool_call(call)
        thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
        return Delta(text=str(delta.get("content") or ""), thinking=str(thinking))

    def _tool_call(self, call: dict[str, Any]) -> None:
        """Tool calls stream in pieces, by index: the id and name first, then the arguments."""
        tool = self.tool_calls.setdefault(int(call.get("index", len(self.tool_calls))), ToolCall())
        function = call.get("function") or {}
        tool.id = call.get("id") or tool.id
        tool.name = function.get("name") or tool.name
        tool.arguments += function.get("arguments") or ""

    def durations(self) -> tuple[int, int, int]:
        """Nanoseconds: the whole request, until the first token, from the first token on."""
        now = time.perf_counter_ns()
        first = self.first_token_ns or now
        return now - self.started_ns, first - self.started_ns, now - first


def _event(text: str) -> dict[str, Any]:
    try:
        event = json.loads(text)
    except ValueError:
        raise StreamBroken(f"The answer sent an event that is not JSON: {text[:80]!r}") from None
    if not isinstance(event, dict):
        raise StreamBroken("The answer sent an event that is not a JSON object")
    return event
