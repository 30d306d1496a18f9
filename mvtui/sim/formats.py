"""Response bodies and SSE events of the three generation APIs, as vLLM writes them.

Streaming is the hot path: each format builds its per-token event from two precomputed halves
around a pre-encoded word, so a token costs string concatenation only.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from mvtui.sim.text import VOCABULARY_JSON

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


_MARKER = "\x00TOKEN\x00"


def _split_at_marker(payload: dict[str, Any]) -> tuple[str, str]:
    """The compact JSON of `payload` cut where the string `_MARKER` stands."""
    encoded = json.dumps(payload, separators=(",", ":"))
    head, tail = encoded.split(json.dumps(_MARKER), 1)
    return head, tail


class _ChunkStream:
    """Chat and text completions: `data: {chunk}` events, then `data: [DONE]`."""

    id_prefix = ""
    object_name = ""

    def __init__(self, model: str, created: int) -> None:
        self.id = new_id(self.id_prefix)
        self._model, self._created = model, created
        self._base = {"id": self.id, "object": self.object_name, "created": created, "model": model}
        head, tail = _split_at_marker(self._chunk(_MARKER, None))
        self._head, self._tail = "data: " + head, tail + "\n\n"

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {**self._base, "choices": [self._choice(text, finish_reason)]}

    def stream_head(self) -> str:
        return ""

    def token_events(self, words: Iterable[int]) -> str:
        head, tail = self._head, self._tail
        return "".join(head + VOCABULARY_JSON[w] + tail for w in words)

    def stream_tail(self, text: str, finish_reason: str, usage_: dict[str, int], include_usage: bool) -> str:
        events = [sse(self._chunk("", finish_reason))]
        if include_usage:
            events.append(sse({**self._base, "choices": [], "usage": usage_}))
        return "".join(events) + DONE


class ChatFormat(_ChunkStream):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion.chunk"

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        return choice

    def stream_head(self) -> str:
        chunk = self._chunk("", None)
        chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return sse(chunk)

    def body(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "tool_calls": [], "reasoning_content": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": [choice],
            "usage": usage_,
            "prompt_logprobs": None,
        }


class CompletionFormat(_ChunkStream):
    id_prefix = "cmpl-"
    object_name = "text_completion"

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}

    def body(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        chunk = self._chunk(text, finish_reason)
        chunk["choices"][0]["prompt_logprobs"] = None
        return {**chunk, "usage": usage_}


class ResponsesFormat:
    """The Responses API: typed SSE events with sequence numbers, no [DONE] at the end."""

    def __init__(self, model: str, created: int) -> None:
        self.id = new_id("resp_")
        self._item_id = new_id("msg_")
        self._model, self._created = model, created
        self._sequence = 0
        delta = {
            "type": "response.output_text.delta",
            "item_id": self._item_id,
            "output_index": 0,
            "content_index": 0,
            "delta": _MARKER,
            "logprobs": [],
            "sequence_number": 0,
        }
        head, tail = _split_at_marker(delta)
        self._head = "event: response.output_text.delta\ndata: " + head
        self._tail_before_number = tail.removesuffix("0}")

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
        return {"id": self._item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _response(
        self, status: str, output: list[dict[str, Any]], usage_: dict[str, Any] | None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self._created,
            "model": self._model,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": incomplete,
            "output": output,
            "usage": usage_,
            "error": None,
            "instructions": None,
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "top_p": 1.0,
        }

    def stream_head(self) -> str:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return "".join(
            [
                self._event("response.created", response=self._response("in_progress", [], None)),
                self._event("response.in_progress", response=self._response("in_progress", [], None)),
                self._event("response.output_item.added", output_index=0, item=self._message("", "in_progress")),
                self._event("response.content_part.added", item_id=self._item_id, output_index=0, content_index=0, part=part),
            ]
        )

    def token_events(self, words: Iterable[int]) -> str:
        events = []
        for word in words:
            events.append(f"{self._head}{VOCABULARY_JSON[word]}{self._tail_before_number}{self._sequence}}}\n\n")
            self._sequence += 1
        return "".join(events)

    def stream_tail(self, text: str, finish_reason: str, usage_: dict[str, int], include_usage: bool) -> str:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        message = self._message(text, "completed")
        return "".join(
            [
                self._event("response.output_text.done", item_id=self._item_id, output_index=0, content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=self._item_id, output_index=0, content_index=0, part=part),
                self._event("response.output_item.done", output_index=0, item=message),
                self._event("response.completed", response=self.body(text, finish_reason, usage_)),
            ]
        )

    def body(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        responses_usage = {
            "input_tokens": usage_["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage_["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage_["total_tokens"],
        }
        return self._response("completed", [self._message(text, "completed")], responses_usage, finish_reason)


GenerationFormat = ChatFormat | CompletionFormat | ResponsesFormat
