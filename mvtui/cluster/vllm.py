"""What mvtui knows of a vLLM server from outside: its metrics page and its control calls."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from mvtui.cluster.state import EngineMetrics
from mvtui.errors import VllmError
from mvtui.routing.speed import Latency

# Exact names only: a prefix match would count `num_requests_waiting_by_reason` as waiting.
_FIELD_BY_METRIC = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:request_success_total": "requests_finished",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
}
# Older vLLM (<= 0.10): read when the new name is absent.
_LEGACY_FIELD_BY_METRIC = {
    "vllm:gpu_prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:gpu_prefix_cache_hits_total": "prefix_cache_hits",
}
_KV_NEW = "vllm:kv_cache_usage_perc"
_KV_LEGACY = "vllm:gpu_cache_usage_perc"
_SLEEP_STATE = "vllm:engine_sleep_state"
# Latency histograms' sums and counts, per model: (which, sum or count). Inter-token latency
# is the newer name of time per output token; the older is read when the newer is absent.
_LATENCY_BY_METRIC = {
    "vllm:time_to_first_token_seconds_sum": ("ttft", "sum"),
    "vllm:time_to_first_token_seconds_count": ("ttft", "count"),
    "vllm:inter_token_latency_seconds_sum": ("itl", "sum"),
    "vllm:inter_token_latency_seconds_count": ("itl", "count"),
    "vllm:time_per_output_token_seconds_sum": ("tpot", "sum"),
    "vllm:time_per_output_token_seconds_count": ("tpot", "count"),
}
MAX_LATENCY_MODELS = 16  # models read from one page: a hostile page cannot grow the table
_WANTED = set(_FIELD_BY_METRIC) | set(_LEGACY_FIELD_BY_METRIC) | set(_LATENCY_BY_METRIC) | {_KV_NEW, _KV_LEGACY, _SLEEP_STATE}
# The most of an answer read from a poll: real /metrics pages are tens of kilobytes.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
_CHUNK_BYTES = 64 * 1024


@dataclass
class _Sums:
    values: dict[str, float] = field(default_factory=dict)
    legacy: dict[str, float] = field(default_factory=dict)
    kv_new: list[float] = field(default_factory=list)
    kv_legacy: list[float] = field(default_factory=list)
    sleep_state: str | None = None
    latency: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict)  # model -> parts


def parse_metrics(text: str, now: float = 0.0) -> EngineMetrics:
    """Read the numbers the router needs from a Prometheus text page.

    A line scanner instead of prometheus-client's parser: pages are tens of kilobytes of
    histogram buckets and only a dozen lines matter (see benchmarks/metrics_parse.py).
    Sums over `engine` and `model_name`; KV-cache use is averaged over engines.
    """
    sums = _Sums()
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        end = _name_end(line)
        name = line[:end]
        if end < 0 or name not in _WANTED:
            continue
        labels, value = _split_sample(line, end)
        if value is None:
            continue
        _accumulate(sums, name, labels, value)
    return _to_metrics(sums, now)


def _name_end(line: str) -> int:
    """Where the metric name ends (at `{` or the blank before the value); -1 when no value follows."""
    space = line.find(" ")
    if space < 0:
        space = line.find("\t")
    brace = line.find("{")
    if space < 0:
        return -1
    return brace if 0 <= brace < space else space


def _split_sample(line: str, name_end: int) -> tuple[str, float | None]:
    if line[name_end] == "{":
        close = line.rfind("}")
        labels, rest = line[name_end + 1 : close], line[close + 1 :]
    else:
        labels, rest = "", line[name_end:]
    parts = rest.split()
    try:
        value = float(parts[0])
    except (IndexError, ValueError):
        return labels, None
    # NaN, infinities and negative numbers measure nothing vLLM counts: the sample is absent.
    return labels, value if math.isfinite(value) and value >= 0 else None


def _label(labels: str, key: str) -> str:
    marker = key + '="'
    start = labels.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return labels[start : labels.find('"', start)]


def _accumulate(sums: _Sums, name: str, labels: str, value: float) -> None:
    if name == _KV_NEW:
        sums.kv_new.append(value)
    elif name == _KV_LEGACY:
        sums.kv_legacy.append(value)
    elif name == _SLEEP_STATE:
        if value >= 1:
            sums.sleep_state = _label(labels, "sleep_state")
    elif name in _FIELD_BY_METRIC:
        key = _FIELD_BY_METRIC[name]
        sums.values[key] = sums.values.get(key, 0.0) + value
    elif name in _LATENCY_BY_METRIC:
        _add_latency(sums, _label(labels, "model_name"), _LATENCY_BY_METRIC[name], value)
    else:
        key = _LEGACY_FIELD_BY_METRIC[name]
        sums.legacy[key] = sums.legacy.get(key, 0.0) + value


def _add_latency(sums: _Sums, model: str, part: tuple[str, str], value: float) -> None:
    parts = sums.latency.get(model)
    if parts is None:
        if len(sums.latency) >= MAX_LATENCY_MODELS:
            return
        parts = sums.latency[model] = {}
    parts[part] = parts.get(part, 0.0) + value


def _latencies(sums: _Sums) -> dict[str, Latency]:
    latencies = {}
    for model, parts in sums.latency.items():
        decode = "itl" if ("itl", "count") in parts else "tpot"
        latencies[model] = Latency(
            ttft_sum=_finite(parts.get(("ttft", "sum"), 0.0)),
            ttft_count=_finite(parts.get(("ttft", "count"), 0.0)),
            tpot_sum=_finite(parts.get((decode, "sum"), 0.0)),
            tpot_count=_finite(parts.get((decode, "count"), 0.0)),
        )
    return latencies


def _finite(value: float) -> float:
    """Sums of huge samples can overflow to infinity: absent too."""
    return value if math.isfinite(value) else 0.0


def _to_metrics(sums: _Sums, now: float) -> EngineMetrics:
    values = {key: _finite(value) for key, value in {**sums.legacy, **sums.values}.items()}
    kv = sums.kv_new or sums.kv_legacy
    kv_mean = sum(kv) / len(kv) if kv else math.nan
    return EngineMetrics(
        running=values.get("running", 0.0),
        waiting=values.get("waiting", 0.0),
        kv_cache_usage=kv_mean if math.isfinite(kv_mean) else None,
        prompt_tokens=values.get("prompt_tokens", 0.0),
        generation_tokens=values.get("generation_tokens", 0.0),
        requests_finished=values.get("requests_finished", 0.0),
        preemptions=values.get("preemptions", 0.0),
        prefix_cache_queries=values.get("prefix_cache_queries", 0.0),
        prefix_cache_hits=values.get("prefix_cache_hits", 0.0),
        sleep_state=sums.sleep_state,
        scraped_at=now,
        latency=_latencies(sums),
    )


SLEEP_LEVEL_BY_STATE = {"awake": 0, "weights_offloaded": 1, "discard_all": 2}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _json(body: bytes, path: str) -> Any:
    """The JSON in an answer, or VllmError saying why not (never another exception)."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise VllmError(200, f"{path} answered something that is not JSON ({_excerpt(body)}): {_first_line(error)}") from None


def _excerpt(body: bytes, limit: int = 40) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(body) > limit else ""))


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:120]


def parse_model_cards(body: bytes) -> list[dict[str, Any]]:
    """`/v1/models`' cards; VllmError unless it is `{"data": [{"id": "name", ...}, ...]}`."""
    payload = _json(body, "/v1/models")
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise VllmError(200, f'/v1/models answered {_excerpt(body)}, not {{"data": [model cards]}}')
    for index, card in enumerate(data):
        model_id = card.get("id") if isinstance(card, dict) else None
        if not isinstance(model_id, str) or not model_id.strip():
            raise VllmError(200, f"/v1/models: card {index} has no model name as its id: {_excerpt(json.dumps(card).encode())}")
    return data


def parse_is_sleeping(body: bytes) -> bool:
    payload = _json(body, "/is_sleeping")
    sleeping = payload.get("is_sleeping") if isinstance(payload, dict) else None
    if not isinstance(sleeping, bool):
        raise VllmError(200, f'/is_sleeping answered {_excerpt(body)}, not {{"is_sleeping": true|false}}')
    return sleeping


async def read_bounded(response: aiohttp.ClientResponse, path: str, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The whole body, or VllmError once it passes `limit` bytes (a backend must not fill memory)."""
    too_big = VllmError(response.status, f"{path} answered more than {limit} bytes")
    if response.content_length is not None and response.content_length > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class VllmClient:
    """Calls to one vLLM server over the shared session."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_key: str | None = None, timeout: float = 5.0) -> None:
        self.session = session
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _get(self, path: str) -> tuple[int, bytes]:
        async with self.session.get(self.url + path, headers=self.headers, timeout=self.timeout) as response:
            return response.status, await read_bounded(response, path)

    async def _post(
        self, path: str, *, params: dict[str, str] | None = None, json: dict[str, Any] | None = None, timeout: float | None = None
    ) -> None:
        limit = aiohttp.ClientTimeout(total=timeout) if timeout else self.timeout
        async with self.session.post(self.url + path, headers=self.headers, params=params, json=json, timeout=limit) as response:
            body = await response.text()
            if response.status >= 400:
                raise VllmError(response.status, f"{path} answered {response.status}: {body[:200]}")

    async def health(self) -> int:
        status, _ = await self._get("/health")
        return status

    async def metrics_text(self) -> str:
        status, body = await self._get("/metrics")
        if status != 200:
            raise VllmError(status, f"/metrics answered {status}")
        return body.decode("utf-8", "replace")

    async def models(self) -> list[dict[str, Any]]:
        status, body = await self._get("/v1/models")
        if status != 200:
            raise VllmError(status, f"/v1/models answered {status}")
        return parse_model_cards(body)

    async def is_sleeping(self) -> bool:
        status, body = await self._get("/is_sleeping")
        if status != 200:
            raise VllmError(status, f"/is_sleeping answered {status}")
        return parse_is_sleeping(body)

    async def sleep(self, level: int, timeout: float = 120.0) -> None:
        await self._post("/sleep", params={"level": str(level)}, timeout=timeout)

    async def wake_up(self, timeout: float = 300.0) -> None:
        await self._post("/wake_up", timeout=timeout)

    async def reload_weights(self, timeout: float = 300.0) -> None:
        await self._post("/collective_rpc", json={"method": "reload_weights"}, timeout=timeout)

    async def reset_prefix_cache(self) -> None:
        await self._post("/reset_prefix_cache")
