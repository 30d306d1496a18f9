"""`POST /generate`: the custom protocol of the vLLM serving framework some of mvtui's users
come from (a prompt, `system_info`, and the conversation so far as two lists).

The request becomes an OpenAI chat completion: `system_info` the system message, each
`history_input[i]`/`history_output[i]` pair a user and an assistant turn, `prompt` the last
user turn; every other field (`model`, `temperature`, `max_tokens`, vLLM's sampling fields...)
passes through unchanged. The answer is `{"text", "model", "usage", "finish_reason"}`, or with
`"stream": true` SSE events `{"text": delta}`, a last event with the finish reason and usage,
then `[DONE]`. Errors are in OpenAI's shape, as the router's own.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from mvtui.openai_errors import error_response, sse_error_event
from mvtui.router.adapters.base import CHAT_PATH, AdapterError, FrontDoorClient, OpenAIStream, StreamBroken

# The protocol's own fields (and those the adapter sets): everything else passes through.
OWN_FIELDS = frozenset({"prompt", "system_info", "history_input", "history_output", "stream", "stream_options", "messages"})
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class GenerateAdapter:
    name = "generate"

    def routes(self, door: FrontDoorClient) -> list[web.RouteDef]:
        return [web.post("/generate", GenerateApi(door).generate)]


class GenerateApi:
    def __init__(self, door: FrontDoorClient) -> None:
        self.door = door

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self.door.read_json(request)
            async with self.door.stream(request, CHAT_PATH, chat_payload(body)) as answer:
                if body.get("stream") is True:
                    return await stream_events(request, answer)
                whole = await answer.collect()
                return web.json_response(result(answer, whole.text, body.get("model")))
        except AdapterError as error:
            return error_response(error.status, error.message, headers=error.headers)


def chat_payload(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat request for a /generate body; a 400 for a malformed one."""
    prompt, system = body.get("prompt"), body.get("system_info")
    if not isinstance(prompt, str):
        raise AdapterError(400, "`prompt` is required and must be a string")
    if not isinstance(system, str | None):
        raise AdapterError(400, "`system_info` must be a string")
    inputs, outputs = history(body, "history_input"), history(body, "history_output")
    check_pairs(inputs, outputs)
    messages = [{"role": "system", "content": system}] if system else []
    for asked, answered in zip(inputs, outputs, strict=True):
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": prompt})
    passed = {name: value for name, value in body.items() if name not in OWN_FIELDS}
    return {**passed, "messages": messages}


def history(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AdapterError(400, f"`{name}` must be a list of strings")
    return value


def check_pairs(inputs: list[str], outputs: list[str]) -> None:
    """Each history_input[i] needs the history_output[i] that answered it."""
    if len(inputs) == len(outputs):
        return
    short = "history_output" if len(outputs) < len(inputs) else "history_input"
    raise AdapterError(
        400,
        f"`{short}` is short: history_input has {items(len(inputs))} and history_output has {items(len(outputs))}; "
        "each history_input[i] pairs with the history_output[i] that answered it",
    )


def items(count: int) -> str:
    return f"{count} item" if count == 1 else f"{count} items"


def result(answer: OpenAIStream, text: str, asked_model: Any) -> dict[str, Any]:
    return {"text": text, "model": answer.model or asked_model, "usage": answer.usage, "finish_reason": answer.finish_reason}


async def stream_events(request: web.Request, answer: OpenAIStream) -> web.StreamResponse:
    """`{"text": delta}` events as they come; a failure after the first ends the stream with
    an error event, as the router ends its own streams."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        try:
            async for delta in answer.deltas():
                await response.write(event({"text": delta.text, **({"thinking": delta.thinking} if delta.thinking else {})}))
            await response.write(event(result(answer, "", None)) + b"data: [DONE]\n\n")
        except StreamBroken as error:
            await response.write(sse_error_event(error.status, error.message))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left
    return response


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
