"""Property-based tests of what mvtui reads from backends (/metrics, /v1/models, /is_sleeping)
and of the routing policies fed with it: any input gives a valid result or a VllmError that
says why, never another exception, never a number that is not finite."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, fields
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvtui.cluster.vllm import parse_is_sleeping, parse_metrics, parse_model_cards
from mvtui.errors import VllmError
from mvtui.routing.policies import BUILT_IN, Route, balanced_score
from mvtui.routing.speed import Speed

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting_by_reason",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:engine_sleep_state",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:prefix_cache_hits_total",
    "vllm:gpu_prefix_cache_queries_total",
    "vllm:",
    "other",
]
sample_values = st.sampled_from(
    ["NaN", "nan", "+Inf", "-Inf", "inf", "1e400", "-1e400", "-1", "0", "1", "2.5", "1.5e308", "", "x", "0x10"]
) | st.floats().map(repr)
labels = st.sampled_from(
    ["", '{engine="0",model_name="m"}', '{sleep_state="awake"}', '{sleep_state="discard_all"}', "{", "}", '{a="}"}', '{model_name="', "{}"]
)
separators = st.sampled_from([" ", "\t", "  ", ""])
lines = st.builds(lambda name, label, sep, value: f"{name}{label}{sep}{value}", st.sampled_from(NAMES), labels, separators, sample_values)


def check_metrics(text: str) -> None:
    metrics = parse_metrics(text, 1.0)
    for f in fields(metrics):
        value = getattr(metrics, f.name)
        if isinstance(value, float):
            assert math.isfinite(value) and value >= 0, (f.name, value)
    assert metrics.kv_cache_usage is None or math.isfinite(metrics.kv_cache_usage)
    assert metrics.sleep_state is None or isinstance(metrics.sleep_state, str)


@SETTINGS
@given(st.lists(lines | st.text(max_size=40), max_size=20))
def test_any_metrics_page_gives_finite_non_negative_numbers(page: list[str]) -> None:
    check_metrics("\n".join(page))


@SETTINGS
@given(st.text(max_size=300))
def test_any_text_as_metrics_gives_finite_numbers(text: str) -> None:
    check_metrics(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["id", "data", "object", "is_sleeping", "x"]) | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
cards = st.fixed_dictionaries({"id": json_values | st.text(max_size=8)}, optional={"object": json_values, "root": json_values})
model_lists = st.fixed_dictionaries({"data": st.lists(cards | json_values, max_size=4)}, optional={"object": json_values})
bodies = (
    (json_values | model_lists).map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=60)
    | st.sampled_from(
        [b"", b"<html></html>", b'{"data": [{"id": NaN}]}', b"[" * 5000 + b"]" * 5000, b'{"is_sleeping": Infinity}', b"\xff\xfe{\x00}\x00"]
    )
)


@SETTINGS
@given(bodies)
def test_any_model_list_answer_gives_cards_with_names_or_a_vllm_error(body: bytes) -> None:
    try:
        result = parse_model_cards(body)
    except VllmError as error:
        assert "/v1/models" in str(error)
        return
    assert isinstance(result, list)
    for card in result:
        assert isinstance(card, dict) and isinstance(card["id"], str) and card["id"].strip()


@SETTINGS
@given(bodies | st.sampled_from([b'{"is_sleeping": true}', b'{"is_sleeping": false}', b'{"is_sleeping": 1}']))
def test_any_is_sleeping_answer_gives_a_bool_or_a_vllm_error(body: bytes) -> None:
    try:
        result = parse_is_sleeping(body)
    except VllmError as error:
        assert "/is_sleeping" in str(error)
        return
    assert isinstance(result, bool)


@dataclass
class Candidate:
    running: float
    waiting: float
    capacity: int
    sent_since_scrape: int
    in_flight: int
    remote_in_flight: float = 0.0  # other routers' requests there (the fleet)
    held: float = 0.0
    has_room: bool = True
    speed: Speed | None = None

    @property
    def total_in_flight(self) -> float:
        return self.in_flight + self.remote_in_flight

    @property
    def slots(self) -> int:
        return self.capacity

    def speed_of(self, model: str) -> Speed | None:
        return self.speed


load = st.floats(allow_nan=True, allow_infinity=True)
speeds = st.none() | st.builds(Speed, st.none() | load, st.none() | load)
candidates = st.lists(
    st.builds(Candidate, load, load, st.integers(1, 64), st.integers(0, 100), st.integers(0, 100), load, load, st.booleans(), speeds),
    min_size=1,
    max_size=6,
)


@SETTINGS
@given(candidates, st.sampled_from(sorted(BUILT_IN)), st.integers(0, 1000), st.none() | st.integers(1, 10**6), load)
def test_every_policy_chooses_one_of_the_candidates_whatever_their_numbers(
    pool: list[Candidate], name: str, turn: int, tokens: int | None, waited: float
) -> None:
    route = Route(random.Random(turn), turn, model="m", tokens=tokens, ahead=turn % 5, waited=waited)
    chosen: Any = BUILT_IN[name](pool, route)
    assert any(chosen is candidate for candidate in pool)
    finite = [candidate for candidate in pool if math.isfinite(balanced_score(candidate))]
    if name == "balanced" and finite:
        assert chosen in finite
