"""vLLM's Prometheus page for one simulated server (one registry per server).

The engine bumps plain numbers and lock-free histograms (cheap on the token path); a custom
collector turns them into vLLM's metric families at scrape time.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from mvtui.sim.config import SimConfig

# Bucket bounds as vLLM defines them (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error")
SLEEP_STATES = {0: "awake", 1: "weights_offloaded", 2: "discard_all"}


def one_two_five_buckets(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`, vLLM's token-count buckets."""
    bounds: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > limit:
                return tuple(bounds)
            bounds.append(float(value))
        exponent += 1


class Histogram:
    """A histogram without locks: the simulator touches it from one event loop only."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return buckets


class CountedRequest(Protocol):
    """What the counters read of one request (the engine's Sequence)."""

    arrival: float
    prompt_tokens: int
    cached_tokens: int
    generated: int
    max_tokens: int
    scheduled_at: float | None
    first_token_at: float | None
    finished_at: float | None
    finish_reason: str | None


class SimEngineCounters:
    """Counters and histograms the simulated engine updates as requests move through it (what
    its /metrics reports; the router's view of a server is mvtui.cluster.state.EngineMetrics)."""

    def __init__(self, max_model_len: int) -> None:
        self.created = time.time()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.finished: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        token_buckets = one_two_five_buckets(max_model_len)
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.inter_token_latency = Histogram(ITL_BUCKETS)
        self.e2e_latency = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.inference_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prefill_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.decode_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = Histogram(token_buckets)
        self.request_generation_tokens = Histogram(token_buckets)
        self.request_max_tokens = Histogram(token_buckets)
        self.iteration_tokens = Histogram(one_two_five_buckets(max(8192, max_model_len)))

    def on_scheduled(self, seq: CountedRequest, now: float) -> None:
        self.queue_time.observe(now - seq.arrival)
        self.prompt_tokens += seq.prompt_tokens
        self.prefix_queries += seq.prompt_tokens
        self.prefix_hits += seq.cached_tokens

    def on_finished(self, seq: CountedRequest) -> None:
        assert seq.finish_reason is not None and seq.finished_at is not None
        self.finished[seq.finish_reason] = self.finished.get(seq.finish_reason, 0) + 1
        if seq.finish_reason == "abort":
            return
        end = seq.finished_at
        self.e2e_latency.observe(end - seq.arrival)
        self.request_prompt_tokens.observe(seq.prompt_tokens)
        self.request_generation_tokens.observe(seq.generated)
        self.request_max_tokens.observe(seq.max_tokens)
        if seq.scheduled_at is not None:
            self.inference_time.observe(end - seq.scheduled_at)
            first = seq.first_token_at if seq.first_token_at is not None else end
            self.prefill_time.observe(first - seq.scheduled_at)
            self.decode_time.observe(end - first)


@dataclass(frozen=True)
class LiveGauges:
    running: int
    waiting: int
    waiting_deferred: int
    kv_usage: float
    sleep_level: int


class SimCollector(Collector):
    def __init__(self, config: SimConfig, metrics: SimEngineCounters, read_gauges: Callable[[], LiveGauges]) -> None:
        self._config = config
        self._metrics = metrics
        self._read_gauges = read_gauges

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges(self._read_gauges())
        yield from self._counters()
        yield from self._histograms()

    def _labels(self) -> tuple[list[str], list[str]]:
        return ["model_name", "engine"], [self._config.model, "0"]

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        names, values = self._labels()
        family = GaugeMetricFamily(name, doc, labels=names)
        family.add_metric(values, value)
        return family

    def _gauges(self, live: LiveGauges) -> Iterator[Metric]:
        config = self._config
        names, values = self._labels()
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.", live.running)
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", live.waiting)
        kv_name = "vllm:gpu_cache_usage_perc" if config.legacy_metrics else "vllm:kv_cache_usage_perc"
        yield self._gauge(kv_name, "KV-cache usage. 1 means 100 percent usage.", live.kv_usage)
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"],
        )
        info.add_metric([str(config.block_size), str(config.kv_blocks), "True", "0"], 1.0)
        yield info
        if config.legacy_metrics:
            return  # vLLM <= 0.10 had neither of the gauges below
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason", "Number of requests waiting, by the reason they wait.", labels=[*names, "reason"]
        )
        by_reason.add_metric([*values, "capacity"], live.waiting - live.waiting_deferred)
        by_reason.add_metric([*values, "deferred"], live.waiting_deferred)
        yield by_reason
        if config.enable_sleep_mode:
            sleep = GaugeMetricFamily(
                "vllm:engine_sleep_state", "Engine sleep state; 1 marks the current one.", labels=[*names, "sleep_state"]
            )
            for level, state in SLEEP_STATES.items():
                sleep.add_metric([*values, state], 1.0 if live.sleep_level == level else 0.0)
            yield sleep

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        names, values = self._labels()
        family = CounterMetricFamily(name, doc, labels=names)
        family.add_metric(values, value, created=self._metrics.created)
        return family

    def _counters(self) -> Iterator[Metric]:
        m, legacy = self._metrics, self._config.legacy_metrics
        prefix_cache = "vllm:gpu_prefix_cache" if legacy else "vllm:prefix_cache"
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens)
        yield self._counter(f"{prefix_cache}_queries", "Prefix cache queries, in terms of tokens.", m.prefix_queries)
        yield self._counter(f"{prefix_cache}_hits", "Prefix cache hits, in terms of tokens.", m.prefix_hits)
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemptions.", m.preemptions)
        names, values = self._labels()
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*names, "finished_reason"]
        )
        for reason, count in m.finished.items():
            success.add_metric([*values, reason], count, created=m.created)
        yield success

    def _histograms(self) -> Iterator[Metric]:
        m = self._metrics
        families = [
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m.time_to_first_token),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m.inter_token_latency),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", m.e2e_latency),
            ("vllm:request_queue_time_seconds", "Time spent in WAITING phase for request.", m.queue_time),
            ("vllm:request_inference_time_seconds", "Time spent in RUNNING phase for request.", m.inference_time),
            ("vllm:request_prefill_time_seconds", "Time spent in PREFILL phase for request.", m.prefill_time),
            ("vllm:request_decode_time_seconds", "Time spent in DECODE phase for request.", m.decode_time),
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", m.request_prompt_tokens),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.", m.request_generation_tokens),
            ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", m.request_max_tokens),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", m.iteration_tokens),
        ]
        if self._config.legacy_metrics:
            families.append(("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", m.inter_token_latency))
        names, values = self._labels()
        for name, doc, histogram in families:
            family = HistogramMetricFamily(name, doc, labels=names)
            family.add_metric(values, histogram.cumulative_buckets(), histogram.total)
            yield family


def build_registry(collector: SimCollector) -> CollectorRegistry:
    """A registry of its own (never the global one) with the process metrics vLLM also shows."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
