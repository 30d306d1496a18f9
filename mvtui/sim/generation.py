"""Chat, completions and responses: a request becomes an engine sequence, streamed or not."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from mvtui.openai_errors import sse_error_event
from mvtui.sim import text
from mvtui.sim.config import SimConfig
from mvtui.sim.engine import Sequence
from mvtui.sim.formats import DONE, ChatFormat, CompletionFormat, GenerationFormat, ResponsesFormat, usage
from mvtui.sim.parsing import GenerationRequest, parse_chat, parse_completion, parse_responses, read_json
from mvtui.sim.runtime import ApiError, Runtime

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
Parser = Callable[[dict[str, Any], SimConfig, str], GenerationRequest]


def plan_sequence(runtime: Runtime, request: GenerationRequest, request_id: str) -> Sequence:
    """The whole output is drawn up front from the request's seed; the engine paces it."""
    seed = text.stable_seed(request.seed) if request.seed is not None else runtime.text_rng.getrandbits(64)
    words = text.sample_words(seed, request.max_tokens)
    stop_at = text.stop_position(words, request.stop)
    if stop_at is not None:
        # The stop word is generated (and billed) but not shown, like a matched stop string.
        return _sequence(request, request_id, words[: stop_at + 1], stop_at, "stop", runtime)
    return _sequence(request, request_id, words, len(words), "length", runtime)


def _sequence(request: GenerationRequest, request_id: str, words: list[int], visible: int, reason: str, runtime: Runtime) -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt_tokens=request.prompt.tokens,
        words=words,
        visible=visible,
        end_reason=reason,
        prefix_hashes=request.prompt.block_hashes(runtime.config.block_size),
        answer_hashes=lambda: request.prompt.followed_by(text.words_text(words[:visible])).block_hashes(runtime.config.block_size),
        max_tokens=request.max_tokens,
    )


class GenerationRoutes:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def register(self, router: web.UrlDispatcher) -> None:
        routes: list[tuple[str, Parser, type[GenerationFormat]]] = [
            ("/v1/chat/completions", parse_chat, ChatFormat),
            ("/v1/completions", parse_completion, CompletionFormat),
            ("/v1/responses", parse_responses, ResponsesFormat),
        ]
        for path, parser, format_class in routes:
            router.add_post(path, self._handler(parser, format_class))

    def _handler(self, parser: Parser, format_class: type[GenerationFormat]) -> Callable:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._generate(request, parser, format_class)

        return handle

    async def _generate(self, request: web.Request, parser: Parser, format_class: type[GenerationFormat]) -> web.StreamResponse:
        runtime = self._runtime
        runtime.counters.received += 1
        if runtime.faults.redirect_to is not None:
            raise web.HTTPTemporaryRedirect(runtime.faults.redirect_to)
        body = await read_json(request)
        model = runtime.resolve_model(body.get("model"))
        generation = parser(body, runtime.config, model)
        await runtime.admit()
        output = format_class(model, int(time.time()))
        seq = runtime.engine.submit(plan_sequence(runtime, generation, output.id))
        try:
            if generation.stream:
                return await self._stream(request, generation, seq, output)
            return await self._complete(request, generation, seq, output)
        except ConnectionResetError:  # the client (the router) went away mid-answer: an abort, as in vLLM
            raise asyncio.CancelledError() from None
        finally:
            runtime.engine.abort(seq)  # a no-op once finished; frees the slot on disconnect

    async def _stream(
        self, request: web.Request, generation: GenerationRequest, seq: Sequence, output: GenerationFormat
    ) -> web.StreamResponse:
        cut = self._runtime.faults.cut_after_tokens
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        # Like vLLM, headers go at once but the first event (the role chunk) waits for the
        # engine's first output, so time to first byte is the real time to first token.
        head = output.stream_head()
        sent = seen = 0
        while not seq.finished or sent < min(seq.generated, seq.visible):
            await seq.wait_progress(seen)
            if head:
                await response.write(head.encode())
                head = ""
            seen = seq.generated
            shown = min(seen, seq.visible)
            if cut is not None and shown > cut:
                await response.write(output.token_events(seq.words[sent:cut]).encode())
                return self._cut(request, response)
            if shown > sent:
                await response.write(output.token_events(seq.words[sent:shown]).encode())
                sent = shown
        await response.write(self._stream_end(generation, seq, output).encode())
        await response.write_eof()
        return response

    def _stream_end(self, generation: GenerationRequest, seq: Sequence, output: GenerationFormat) -> str:
        if seq.finish_reason == "abort":
            return sse_error_event(500, "the engine aborted the request").decode() + DONE
        text_out = text.words_text(seq.words[: seq.visible])
        return output.stream_tail(text_out, seq.end_reason, self._usage(seq), generation.include_usage)

    async def _complete(
        self, request: web.Request, generation: GenerationRequest, seq: Sequence, output: GenerationFormat
    ) -> web.StreamResponse:
        cut = self._runtime.faults.cut_after_tokens
        while not seq.finished and (cut is None or seq.generated <= cut):
            await seq.wait_progress(seq.generated)
        if cut is not None and min(seq.generated, seq.visible) > cut:
            return self._cut(request, web.Response())
        if seq.finish_reason == "abort":
            raise ApiError(500, "the engine aborted the request")
        text_out = text.words_text(seq.words[: seq.visible])
        payload = output.body(text_out, seq.end_reason, self._usage(seq))
        faults = self._runtime.faults
        if faults.pad_answer_bytes:  # first, so that the usage stays at the end as vLLM has it
            payload = {"padding": "x" * faults.pad_answer_bytes, **payload}
        if faults.cut_body or faults.stall_body:
            return await self._broken_body(request, json.dumps(payload).encode(), cut=faults.cut_body)
        return web.json_response(payload)

    async def _broken_body(self, request: web.Request, body: bytes, *, cut: bool) -> web.StreamResponse:
        """The cut_body and stall_body faults: headers and the first half of the body, then
        the connection closes, or nothing more comes until the client gives up."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if cut:
            return self._cut(request, response)
        self._runtime.counters.hung += 1
        await asyncio.get_running_loop().create_future()
        return response

    def _cut(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """The cut_after_tokens fault: what was written is flushed, then the socket closes."""
        self._runtime.counters.cut += 1
        if request.transport is not None:
            request.transport.close()
        return response

    @staticmethod
    def _usage(seq: Sequence) -> dict[str, int]:
        return usage(seq.prompt_tokens, seq.generated)
