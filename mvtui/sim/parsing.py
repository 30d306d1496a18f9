"""Reading OpenAI-style request bodies, with vLLM's 400s for what is wrong in them."""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mvtui.sim import text
from mvtui.sim.config import SimConfig
from mvtui.sim.runtime import ApiError


@dataclass(frozen=True)
class Prompt:
    tokens: int
    key: bytes  # what prefix caching hashes: equal prompts share blocks
    bytes_per_token: int

    @classmethod
    def of_text(cls, value: str) -> Prompt:
        return cls(text.count_tokens(value), value.encode(), text.BYTES_PER_TOKEN)

    @classmethod
    def of_ids(cls, ids: list[int]) -> Prompt:
        return cls(len(ids), array("q", ids).tobytes(), 8)

    def followed_by(self, answer: str) -> Prompt:
        """The prompt with its answer after it: what the next turn of a chat starts with
        (a prompt of token ids has no text to continue: it stays as it is)."""
        if self.bytes_per_token != text.BYTES_PER_TOKEN:
            return self
        return Prompt(self.tokens + text.count_tokens(answer), self.key + answer.encode(), self.bytes_per_token)

    def block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of the full blocks, as vLLM's prefix cache keys them."""
        step = block_size * self.bytes_per_token
        hashes, previous = [], 0
        for start in range(0, len(self.key) - step + 1, step):
            previous = hash((previous, self.key[start : start + step]))
            hashes.append(previous)
        return hashes


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: Prompt
    max_tokens: int
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    seed: int | None


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return body


def require(body: dict[str, Any], name: str) -> Any:
    if body.get(name) is None:
        raise ApiError(400, f"Field required: {name}", param=name)
    return body[name]


def render_messages(messages: Any, param: str = "messages") -> str:
    """A chat template of sorts: role markers around each message's text."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"{param} must be a non-empty list of messages", param=param)
    lines = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role", "user"), str):
            raise ApiError(400, f"each item of {param} must be an object with a role", param=param)
        lines.append(f"<|{message.get('role', 'user')}|>\n{content_text(message.get('content'))}\n")
    return "".join(lines) + "<|assistant|>\n"


def content_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise ApiError(400, "message content must be a string or a list of parts", param="messages")


def completion_prompt(value: Any) -> Prompt:
    if isinstance(value, str):
        return Prompt.of_text(value)
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return Prompt.of_ids(value)
    if isinstance(value, list) and len(value) == 1:
        return completion_prompt(value[0])
    if isinstance(value, list) and len(value) > 1:
        raise ApiError(400, "the simulator serves one prompt per request", param="prompt")
    raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")


def parse_chat(body: dict[str, Any], config: SimConfig, model: str) -> GenerationRequest:
    prompt = Prompt.of_text(render_messages(require(body, "messages")))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return _generation(body, config, model, prompt, limit, "max_completion_tokens")


def parse_completion(body: dict[str, Any], config: SimConfig, model: str) -> GenerationRequest:
    prompt = completion_prompt(require(body, "prompt"))
    return _generation(body, config, model, prompt, body.get("max_tokens"), "max_tokens")


def parse_responses(body: dict[str, Any], config: SimConfig, model: str) -> GenerationRequest:
    given = require(body, "input")
    rendered = given if isinstance(given, str) else render_messages(given, "input")
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        rendered = f"<|system|>\n{instructions}\n{rendered}"
    prompt = Prompt.of_text(rendered)
    return _generation(body, config, model, prompt, body.get("max_output_tokens"), "max_output_tokens")


def _generation(body: dict[str, Any], config: SimConfig, model: str, prompt: Prompt, limit: Any, limit_name: str) -> GenerationRequest:
    max_tokens = output_budget(config, prompt.tokens, limit, limit_name)
    stream_options = body.get("stream_options") or {}
    seed = body.get("seed")
    return GenerationRequest(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=body.get("stream") is True,
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
        stop=stop_strings(body.get("stop")),
        seed=seed if isinstance(seed, int) else None,
    )


def output_budget(config: SimConfig, prompt_tokens: int, limit: Any, limit_name: str) -> int:
    """max_tokens, checked against the context window as vLLM does."""
    room = config.max_model_len - prompt_tokens
    if limit is None:
        if room < 1:
            raise ApiError(400, context_message(config, prompt_tokens, 1))
        return min(config.default_max_tokens, room)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ApiError(400, f"{limit_name} must be at least 1, got {limit}.", param=limit_name)
    if limit > room:
        raise ApiError(400, context_message(config, prompt_tokens, limit), param=limit_name)
    return limit


def context_message(config: SimConfig, prompt_tokens: int, max_tokens: int) -> str:
    return (
        f"This model's maximum context length is {config.max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
        "completion). Please reduce the length of the messages or completion."
    )


def stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ApiError(400, "stop must be a string or a list of strings", param="stop")
