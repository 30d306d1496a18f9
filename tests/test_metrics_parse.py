"""The /metrics scanner against vLLM's names, both generations, and prometheus-client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mvtui.cluster.vllm import parse_metrics

NEW_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 1.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="llama",reason="capacity"} 40.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="llama",reason="deferred"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.25
# TYPE vllm:engine_sleep_state gauge
vllm:engine_sleep_state{engine="0",model_name="llama",sleep_state="awake"} 0.0
vllm:engine_sleep_state{engine="0",model_name="llama",sleep_state="weights_offloaded"} 1.0
vllm:engine_sleep_state{engine="0",model_name="llama",sleep_state="discard_all"} 0.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="llama"} 1200.0
vllm:prompt_tokens_created{engine="0",model_name="llama"} 1.7e9
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="llama"} 900.0
vllm:generation_tokens_total{engine="1",model_name="llama"} 100.0
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="llama"} 10.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="llama"} 5.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="llama"} 1.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 500.0
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 125.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="llama"} 0.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 16.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 1.6
"""

LEGACY_PAGE = """\
vllm:num_requests_running{model_name="old"} 1.0
vllm:num_requests_waiting{model_name="old"} 0.0
vllm:gpu_cache_usage_perc{model_name="old"} 0.75
vllm:gpu_prefix_cache_queries_total{model_name="old"} 80.0
vllm:gpu_prefix_cache_hits_total{model_name="old"} 20.0
"""


def test_sums_over_engines_and_reads_exact_names() -> None:
    metrics = parse_metrics(NEW_PAGE)
    assert metrics.running == 5
    assert metrics.waiting == 5  # not the 47 of num_requests_waiting_by_reason
    assert metrics.kv_cache_usage == 0.375  # a fraction, averaged over engines
    assert metrics.generation_tokens == 1000
    assert metrics.prompt_tokens == 1200  # the _created sample is not a value
    assert metrics.requests_finished == 16
    assert (metrics.prefix_cache_queries, metrics.prefix_cache_hits) == (500, 125)
    assert metrics.sleep_state == "weights_offloaded"


def test_reads_the_old_generation_when_the_new_is_absent() -> None:
    metrics = parse_metrics(LEGACY_PAGE)
    assert metrics.kv_cache_usage == 0.75
    assert (metrics.prefix_cache_queries, metrics.prefix_cache_hits) == (80, 20)
    assert metrics.sleep_state is None


def test_prefers_the_new_generation_when_both_are_present() -> None:
    metrics = parse_metrics(NEW_PAGE + LEGACY_PAGE.replace('model_name="old"', 'model_name="llama"'))
    assert metrics.kv_cache_usage == 0.375
    assert metrics.prefix_cache_queries == 500


def test_no_kv_metric_means_unknown_not_zero() -> None:
    assert parse_metrics('vllm:num_requests_running{model_name="m"} 1\n').kv_cache_usage is None


def test_agrees_with_prometheus_clients_parser() -> None:
    samples = [sample for family in text_string_to_metric_families(NEW_PAGE) for sample in family.samples]

    def total(name: str) -> float:
        return sum(sample.value for sample in samples if sample.name == name)

    running, waiting = total("vllm:num_requests_running"), total("vllm:num_requests_waiting")
    generated = total("vllm:generation_tokens_total")
    metrics = parse_metrics(NEW_PAGE)
    assert (metrics.running, metrics.waiting, metrics.generation_tokens) == (running, waiting, generated)


def test_garbage_lines_are_skipped() -> None:
    page = 'vllm:num_requests_running{model_name="m"} not-a-number\nvllm:num_requests_waiting 2\n'
    metrics = parse_metrics(page)
    assert (metrics.running, metrics.waiting) == (0, 2)
