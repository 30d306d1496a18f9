"""A vLLM look-alike whose every answer a test can replace: NaN metrics, garbage or huge JSON,
HTML where JSON belongs, non-string model ids, missing endpoints. In the test's own event loop
(`async with HostileBackend() as backend`) or on a thread of its own for a router process
(`with backend.threaded() as url`)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"


def json_answer(payload: Any, status: int = 200) -> Answer:
    return Answer(status, json.dumps(payload).encode())


def html_answer(status: int = 200) -> Answer:
    return Answer(status, b"<!doctype html><html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")


def metrics_page(model: str, running: str = "0", waiting: str = "0", kv: str = "0.1") -> Answer:
    """vLLM's gauges with the values written as given ("NaN", "+Inf", "1e400" ...)."""
    labels = f'engine="0",model_name="{model}"'
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{labels}}} {running}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} {waiting}",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{labels}}} {kv}",
    ]
    return Answer(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")


def completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class HostileBackend:
    def __init__(self, model: str = "demo") -> None:
        self.model = model
        self.answers: dict[str, Answer] = {
            "/health": Answer(200, b"", "text/plain"),
            "/v1/models": json_answer({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "vllm"}]}),
            "/metrics": metrics_page(model),
            "/is_sleeping": json_answer({"is_sleeping": False}),
            "/v1/chat/completions": json_answer(completion(model)),
        }
        self.hits: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []  # of the generation requests, in order
        # Paths whose requests wait until the test sets the event (a held answer).
        self.gates: dict[str, threading.Event] = {}
        self.key: str | None = None  # set: /v1 paths answer 401 without `Bearer KEY`, like vLLM --api-key
        self.in_flight = 0  # generation requests being answered now
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, path: str, answer: Answer) -> None:
        self.answers[path] = answer

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if request.method == "POST":
            self.headers.append(dict(request.headers))
            await request.read()
        if self.key is not None and request.path.startswith("/v1") and request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": {"message": "Unauthorized", "type": "AuthenticationError", "code": 401}}, status=401)
        self.in_flight += request.method == "POST"
        try:
            gate = self.gates.get(request.path)
            while gate is not None and not gate.is_set():
                await asyncio.sleep(0.01)
        finally:
            self.in_flight -= request.method == "POST"
        answer = self.answers.get(request.path, Answer(404, b'{"detail":"Not Found"}'))
        return web.Response(status=answer.status, body=answer.body, headers={"Content-Type": answer.content_type})

    def hold(self, path: str) -> threading.Event:
        """Requests to `path` wait until the returned event is set."""
        gate = self.gates[path] = threading.Event()
        return gate

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HostileBackend:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @contextmanager
    def threaded(self) -> Iterator[str]:
        """Serve from a thread with its own loop (for a router in another process); yields the URL.
        `answer()` may be called meanwhile: a dict assignment is atomic."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(target=self._serve_forever, args=(loop, ready), daemon=True)
        thread.start()
        ready.wait(10)
        try:
            yield self.url
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    def _serve_forever(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self.start())
        ready.set()
        loop.run_forever()
