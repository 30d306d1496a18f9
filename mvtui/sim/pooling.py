"""Pooling, scoring and tokenizer endpoints.

Pooling requests pass the engine as prefill-only sequences, so they take a slot and KV blocks
for their prefill time and show in /metrics like vLLM's. Outputs are deterministic functions of
the input text (same text, same vector; shared words, higher score).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mvtui.sim import text
from mvtui.sim.engine import Sequence
from mvtui.sim.formats import new_id, usage
from mvtui.sim.parsing import read_json, render_messages, require
from mvtui.sim.runtime import ApiError, Runtime

DEFAULT_EMBEDDING_DIM = 384
CLASS_LABELS = ("negative", "positive")
Handler = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class PoolingInput:
    key: str  # what the output is derived from
    tokens: int


def pooling_inputs(value: Any, param: str) -> list[PoolingInput]:
    """A string, a list of strings, a list of token ids, or a list of those lists."""
    if isinstance(value, str):
        return [PoolingInput(value, text.count_tokens(value))]
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return [PoolingInput(f"ids:{value}", len(value))]
    if isinstance(value, list) and value:
        return [item for element in value for item in pooling_inputs(element, param)]
    raise ApiError(400, f"{param} must be a string, a list of strings or token ids", param=param)


def document_text(document: Any) -> str:
    if isinstance(document, str):
        return document
    if isinstance(document, dict) and isinstance(document.get("text"), str):
        return document["text"]
    raise ApiError(400, "each document must be a string or an object with text", param="documents")


def text_list(value: Any, param: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ApiError(400, f"{param} must be a string or a non-empty list of strings", param=param)
    return values


def score_pairs(body: dict[str, Any]) -> list[tuple[str, str]]:
    """vLLM's pairing rules: one-to-one, or one query against many documents."""
    firsts = text_list(require(body, "text_1"), "text_1")
    seconds = text_list(require(body, "text_2"), "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ApiError(400, "text_1 and text_2 must have the same length, or text_1 a single text")
    return list(zip(firsts, seconds, strict=True))


class PoolingRoutes:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def register(self, router: web.UrlDispatcher) -> None:
        inference: dict[str, Handler] = {
            "/v1/embeddings": self._embeddings,
            "/pooling": self._pooling,
            "/classify": self._classify,
            "/score": self._score,
            "/v1/score": self._score,
            "/rerank": self._rerank,
            "/v1/rerank": self._rerank,
            "/v2/rerank": self._rerank,
        }
        for path, handler in inference.items():
            router.add_post(path, self._inference(handler))
        router.add_post("/tokenize", self._tokenize)
        router.add_post("/detokenize", self._detokenize)

    def _inference(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            self._runtime.counters.received += 1
            body = await read_json(request)
            model = self._runtime.resolve_model(body.get("model"))
            return web.json_response(await handler(body, model))

        return handle

    async def _prefill(self, token_counts: list[int]) -> int:
        """Run the inputs' prefill through the engine; returns their total tokens once done."""
        runtime, limit = self._runtime, self._runtime.config.max_model_len
        if max(token_counts) > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {max(token_counts)} tokens in the input for embedding generation.",
            )
        await runtime.admit()
        # vLLM runs one engine request per input; one sequence of at most a context's worth stands in.
        total = sum(token_counts)
        seq = Sequence(request_id=new_id("pool-"), prompt_tokens=min(total, limit), words=(), visible=0, end_reason="stop")
        runtime.engine.submit(seq)
        try:
            await seq.wait_finished()
        finally:
            runtime.engine.abort(seq)
        if seq.finish_reason == "abort":
            raise ApiError(500, "the engine aborted the request")
        return total

    def _envelope(self, prefix: str, model: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
        return {
            "id": new_id(prefix),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": usage(tokens, 0),
        }

    async def _embeddings(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        inputs = pooling_inputs(require(body, "input"), "input")
        dimensions = body.get("dimensions") or DEFAULT_EMBEDDING_DIM
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise ApiError(400, "dimensions must be a positive integer", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        tokens = await self._prefill([item.tokens for item in inputs])
        data = []
        for index, item in enumerate(inputs):
            vector = text.embedding(item.key, dimensions)
            data.append({"index": index, "object": "embedding", "embedding": text.embedding_base64(vector) if as_base64 else vector})
        return self._envelope("embd-", model, data, tokens)

    async def _pooling(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        inputs = pooling_inputs(require(body, "input"), "input")
        tokens = await self._prefill([item.tokens for item in inputs])
        data = [{"index": i, "object": "pooling", "data": text.embedding(item.key, DEFAULT_EMBEDDING_DIM)} for i, item in enumerate(inputs)]
        return self._envelope("pool-", model, data, tokens)

    async def _classify(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        inputs = pooling_inputs(require(body, "input"), "input")
        tokens = await self._prefill([item.tokens for item in inputs])
        data = []
        for index, item in enumerate(inputs):
            positive = text.relevance("good great fast ready", item.key)
            probs = [round(1.0 - positive, 6), positive]
            data.append({"index": index, "label": CLASS_LABELS[probs[1] >= 0.5], "probs": probs, "num_classes": len(CLASS_LABELS)})
        return self._envelope("classify-", model, data, tokens)

    async def _score(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        pairs = score_pairs(body)
        tokens = await self._prefill([text.count_tokens(a) + text.count_tokens(b) for a, b in pairs])
        data = [{"index": i, "object": "score", "score": text.relevance(a, b)} for i, (a, b) in enumerate(pairs)]
        return self._envelope("score-", model, data, tokens)

    async def _rerank(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        query = text_list(require(body, "query"), "query")[0]
        documents = require(body, "documents")
        if not isinstance(documents, list) or not documents:
            raise ApiError(400, "documents must be a non-empty list", param="documents")
        texts = [document_text(d) for d in documents]
        top_n = body.get("top_n") or len(texts)
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
            raise ApiError(400, "top_n must be a non-negative integer", param="top_n")
        tokens = await self._prefill([text.count_tokens(query) + text.count_tokens(t) for t in texts])
        results = [{"index": i, "document": {"text": t}, "relevance_score": text.relevance(query, t)} for i, t in enumerate(texts)]
        results.sort(key=lambda r: float(r["relevance_score"]), reverse=True)  # type: ignore[arg-type]
        if body.get("return_documents") is False:
            for result in results:
                result["document"] = None
        return {"id": new_id("rerank-"), "model": model, "usage": {"total_tokens": tokens}, "results": results[:top_n]}

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        self._runtime.resolve_model(body.get("model"))
        if body.get("messages") is not None:
            source = render_messages(body["messages"])
        else:
            source = require(body, "prompt")
            if not isinstance(source, str):
                raise ApiError(400, "prompt must be a string", param="prompt")
        ids = text.encode(source)
        strings = text.token_strings(ids) if body.get("return_token_strs") else None
        return web.json_response(
            {"count": len(ids), "max_model_len": self._runtime.config.max_model_len, "tokens": ids, "token_strs": strings}
        )

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        self._runtime.resolve_model(body.get("model"))
        ids = require(body, "tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "tokens must be a list of token ids", param="tokens")
        try:
            return web.json_response({"prompt": text.decode(ids)})
        except ValueError as exc:
            raise ApiError(400, str(exc), param="tokens") from None
