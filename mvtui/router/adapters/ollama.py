"""Ollama's HTTP API in front of the cluster, for the tools that speak it (the `ollama` Python
and JS clients, Open WebUI, editor plugins).

`/api/chat` and `/api/generate` become OpenAI chat (or, with `raw`, text) completions sent to
the router's own routes; their answer comes back as Ollama's NDJSON stream (Ollama streams
unless `"stream": false`) with its field names and final statistics. `/api/tags`, `/api/ps`
and `/api/show` are read from the router's `/v1/models` and `/load-stats`, with the client's
key. Errors are Ollama's `{"error": "..."}` with the status the router gave.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from mvtui import __version__
from mvtui.router.adapters.base import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    LOAD_STATS_PATH,
    MODELS_PATH,
    AdapterError,
    Delta,
    FrontDoorClient,
    OpenAIStream,
    StreamBroken,
)

# The Ollama version /api/version reports, for clients that check a minimum one.
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
NEVER = "9999-12-31T23:59:59Z"  # /api/ps `expires_at`: mvtui unloads on its own policy, not per request
# Ollama's `options` that have an OpenAI (or vLLM) sampling field; the others are ignored.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repetition_penalty",
}
IMAGE_TYPES = {"iVBOR": "image/png", "/9j/": "image/jpeg", "R0lGO": "image/gif", "UklGR": "image/webp"}


class OllamaAdapter:
    name = "ollama"

    def routes(self, door: FrontDoorClient) -> list[web.RouteDef]:
        api = OllamaApi(door)
        return [
            web.get("/api/version", api.version),
            web.get("/api/tags", api.tags),
            web.get("/api/ps", api.ps),
            web.post("/api/show", api.show),
            web.post("/api/chat", api.chat),
            web.post("/api/generate", api.generate),
        ]


class OllamaApi:
    def __init__(self, door: FrontDoorClient) -> None:
        self.door = door

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_API_VERSION, "mvtui": __version__})

    async def tags(self, request: web.Request) -> web.Response:
        try:
            cards = await self._cards(request)
        except AdapterError as error:
            return error_response(error)
        return web.json_response({"models": [model_entry(card) for card in cards.values()]})

    async def ps(self, request: web.Request) -> web.Response:
        try:
            stats = await self.door.get_json(request, LOAD_STATS_PATH)
            cards = await self._cards(request)
        except AdapterError as error:
            return error_response(error)
        return web.json_response({"models": running_models(stats, cards)})

    async def show(self, request: web.Request) -> web.Response:
        try:
            body = await self.door.read_json(request)
            name = body.get("model") or body.get("name")  # `name`: older clients
            card = (await self._cards(request)).get(name) if isinstance(name, str) else None
        except AdapterError as error:
            return error_response(error)
        if card is None:
            return error_response(AdapterError(404, f"model '{name}' not found"))
        return web.json_response(model_details(card))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=False)

    async def _generation(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await self.door.read_json(request)
            model = model_name(body)
            target = chat_request(body, model) if chat else generate_request(body, model)
            if target is None:  # nothing to generate: Ollama's way to load a model
                return await self._load(request, chat, model)
            async with self.door.stream(request, *target) as answer:
                if body.get("stream") is False:
                    return web.json_response(final(chat, model, answer, await answer.collect()))
                return await stream_ndjson(request, chat, model, answer)
        except AdapterError as error:
            return error_response(error)

    async def _load(self, request: web.Request, chat: bool, model: str) -> web.Response:
        """Said done at once for a model the cluster serves: mvtui starts or wakes a model on its
        first request, and keeps it by its own policy, not `keep_alive`."""
        if model not in await self._cards(request):
            raise AdapterError(404, f"model '{model}' not found")
        return web.json_response(loaded(chat, model))

    async def _cards(self, request: web.Request) -> dict[str, dict[str, Any]]:
        listing = await self.door.get_json(request, MODELS_PATH)
        data = listing.get("data") if isinstance(listing, dict) else None
        return {str(card["id"]): card for card in data or [] if isinstance(card, dict) and "id" in card}


def error_response(error: AdapterError) -> web.Response:
    return web.json_response({"error": error.message}, status=error.status, headers=error.headers)


# --- requests: Ollama's shape to OpenAI's ---------------------------------------------------


def model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not model or not isinstance(model, str):
        raise AdapterError(400, "model is required")
    return model


def chat_request(body: dict[str, Any], model: str) -> tuple[str, dict[str, Any]] | None:
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise AdapterError(400, "messages must be a list")
    if not messages:
        return None
    payload = {
        "model": model,
        "messages": openai_messages(messages),
        **sampling(body.get("options")),
        **response_format(body.get("format")),
    }
    if body.get("tools"):
        payload["tools"] = body["tools"]  # Ollama's tool definitions are OpenAI's
    return CHAT_PATH, payload


def generate_request(body: dict[str, Any], model: str) -> tuple[str, dict[str, Any]] | None:
    prompt, system = body.get("prompt") or "", body.get("system")
    if not isinstance(prompt, str) or not isinstance(system, str | None):
        raise AdapterError(400, "prompt and system must be strings")
    if body.get("suffix"):
        raise AdapterError(400, "suffix (fill-in-the-middle) is not supported by mvtui's Ollama API")
    if not prompt and not body.get("images"):
        return None
    options = {**sampling(body.get("options")), **response_format(body.get("format"))}
    if body.get("raw"):  # the prompt as it is, no chat template
        return COMPLETIONS_PATH, {"model": model, "prompt": prompt, **options}
    turns: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": prompt, "images": body.get("images")})
    return CHAT_PATH, {"model": model, "messages": openai_messages(turns), **options}


def sampling(options: Any) -> dict[str, Any]:
    """Ollama's `options` as OpenAI sampling fields; a negative `num_predict` (no limit, fill
    the context) leaves the server's own limit."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise AdapterError(400, "options must be an object")
    fields = {OPTIONS[name]: value for name, value in options.items() if name in OPTIONS and value is not None}
    if isinstance(fields.get("max_tokens"), int) and fields["max_tokens"] < 0:
        del fields["max_tokens"]
    return fields


def response_format(given: Any) -> dict[str, Any]:
    """`format`: "json", or a JSON schema the answer must follow."""
    if not given:
        return {}
    if given == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(given, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "response", "schema": given}}}
    raise AdapterError(400, 'format must be "json" or a JSON schema')


def openai_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: images as data URLs, tool calls with ids, and each
    tool's answer tied to the call it answers (Ollama names the tool, OpenAI cites the id)."""
    out: list[dict[str, Any]] = []
    open_calls: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise AdapterError(400, "each message must be an object with a role")
        item: dict[str, Any] = {"role": message["role"], "content": content(message)}
        if message.get("tool_calls"):
            item["tool_calls"] = [openai_tool_call(call, f"call_{len(out)}_{n}") for n, call in enumerate(message["tool_calls"])]
            open_calls = list(item["tool_calls"])  # answered ones leave this list, not the message
        if message["role"] == "tool":
            item["tool_call_id"] = answered_call(message.get("tool_name"), open_calls)
        out.append(item)
    return out


def content(message: dict[str, Any]) -> str | list[dict[str, Any]]:
    text = message.get("content") or ""
    if not isinstance(text, str):
        raise AdapterError(400, "message content must be a string")
    images = message.get("images") or []
    if not images:
        return text
    return [{"type": "text", "text": text}, *({"type": "image_url", "image_url": {"url": data_url(image)}} for image in images)]


def data_url(image: Any) -> str:
    """An Ollama image (base64, no header) as a data URL, its type told by its first bytes."""
    if not isinstance(image, str):
        raise AdapterError(400, "images must be base64 strings")
    if image.startswith("data:"):
        return image
    kind = next((kind for start, kind in IMAGE_TYPES.items() if image.startswith(start)), "image/png")
    return f"data:{kind};base64,{image}"


def openai_tool_call(call: Any, call_id: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise AdapterError(400, "each tool call must have a function")
    arguments = function.get("arguments") or {}
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call.get("id") or call_id, "type": "function", "function": {"name": function.get("name"), "arguments": text}}


def answered_call(tool_name: Any, open_calls: list[dict[str, Any]]) -> str:
    """The id of the call a tool message answers: the first open one of that tool, else the
    first open one; each is answered once."""
    if not open_calls:
        return "call_none"
    match = next((call for call in open_calls if call["function"]["name"] == tool_name), open_calls[0])
    open_calls.remove(match)
    return str(match["id"])


# --- answers: OpenAI's stream to Ollama's shape ---------------------------------------------


async def stream_ndjson(request: web.Request, chat: bool, model: str, answer: OpenAIStream) -> web.StreamResponse:
    """One JSON line per delta as it comes, then the last one with the statistics; a failure
    after the first line is an `{"error": ...}` line (Ollama's clients raise it)."""
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    try:
        try:
            async for delta in answer.deltas():
                await response.write(ndjson_line(piece(chat, model, delta)))
            await response.write(ndjson_line(final(chat, model, answer, Delta())))
        except StreamBroken as error:
            await response.write(ndjson_line({"error": error.message}))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left
    return response


def ndjson_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode() + b"\n"


def piece(chat: bool, model: str, delta: Delta, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One object of the answer: a `message` for /api/chat, a `response` for /api/generate."""
    out: dict[str, Any] = {"model": model, "created_at": now()}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": delta.text}
        if delta.thinking:
            message["thinking"] = delta.thinking
        if tool_calls:
            message["tool_calls"] = tool_calls
        out["message"] = message
    else:
        out["response"] = delta.text
        if delta.thinking:
            out["thinking"] = delta.thinking
    out["done"] = False
    return out


def final(chat: bool, model: str, answer: OpenAIStream, whole: Delta) -> dict[str, Any]:
    """The last object: `whole` (all the text when not streamed), tool calls, and Ollama's
    statistics, durations in nanoseconds (until the first token counts as the prompt's)."""
    total, until_first, after_first = answer.durations()
    out = piece(chat, model, whole, ollama_tool_calls(answer))
    out.update(
        done=True,
        done_reason="length" if answer.finish_reason == "length" else "stop",
        total_duration=total,
        load_duration=0,
        prompt_eval_count=answer.prompt_tokens,
        prompt_eval_duration=until_first,
        eval_count=answer.completion_tokens,
        eval_duration=after_first,
    )
    return out


def loaded(chat: bool, model: str) -> dict[str, Any]:
    return {**piece(chat, model, Delta()), "done": True, "done_reason": "load"}


def ollama_tool_calls(answer: OpenAIStream) -> list[dict[str, Any]]:
    return [{"function": {"name": call.name, "arguments": arguments(call.arguments)}} for _, call in sorted(answer.tool_calls.items())]


def arguments(text: str) -> dict[str, Any]:
    """A tool call's arguments as the object Ollama sends (kept as text when not one)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# --- models: the cluster's, as Ollama lists them ---------------------------------------------


def model_entry(card: dict[str, Any]) -> dict[str, Any]:
    """One model of /api/tags; mvtui holds no blobs: no size, a digest of the name."""
    name = str(card["id"])
    return {
        "name": name,
        "model": name,
        "modified_at": timestamp(card.get("created")),
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": details(card),
    }


def details(card: dict[str, Any]) -> dict[str, Any]:
    parent = card.get("parent")
    return {
        "parent_model": parent if isinstance(parent, str) else "",
        "format": "",
        "family": "",
        "families": [],
        "parameter_size": "",
        "quantization_level": "",
    }


def running_models(stats: Any, cards: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """/api/ps: each model on a server that is up or asleep, with those servers (mvtui's
    `servers` field) and `state`: running when one of them is awake, else sleeping."""
    found: dict[str, dict[str, Any]] = {}
    servers = stats.get("servers") if isinstance(stats, dict) else None
    for server in servers or []:
        if not isinstance(server, dict) or not (server.get("healthy") or server.get("sleep_level")):
            continue
        for name in server.get("models") or []:
            entry = found.setdefault(name, running_entry(name, cards.get(name, {"id": name})))
            entry["servers"].append({"name": server.get("name"), "state": server.get("state"), "sleep_level": server.get("sleep_level")})
            if not server.get("sleep_level"):
                entry["state"] = "running"
    return list(found.values())


def running_entry(name: str, card: dict[str, Any]) -> dict[str, Any]:
    context = card.get("max_model_len")
    return {
        **model_entry({**card, "id": name}),
        "expires_at": NEVER,
        "size_vram": 0,
        "context_length": context if isinstance(context, int) else 0,
        "state": "sleeping",
        "servers": [],
    }


def model_details(card: dict[str, Any]) -> dict[str, Any]:
    """/api/show. vLLM does not say a model's architecture: it is named `vllm`, so that a
    client reading `model_info["<architecture>.context_length"]` finds the context length."""
    context = card.get("max_model_len")
    info: dict[str, Any] = {"general.architecture": "vllm", "general.basename": card["id"]}
    if isinstance(context, int):
        info["vllm.context_length"] = context
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details(card),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": timestamp(card.get("created")),
    }


def timestamp(seconds: Any) -> str:
    try:
        when = datetime.fromtimestamp(seconds if isinstance(seconds, int | float) else 0, UTC)
    except (OverflowError, OSError, ValueError):  # a card's `created` out of range
        when = datetime.fromtimestamp(0, UTC)
    return when.isoformat().replace("+00:00", "Z")
