"""Speed-aware routing, its pure parts: the learned speeds, vLLM's latency histograms, the
`fastest` policy, conversation keys and rendezvous hashing with a load bound, and the
admission holding a request for a busy fast server."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from mvtui.cluster.state import Cluster, EngineMetrics, Server
from mvtui.cluster.vllm import MAX_LATENCY_MODELS, parse_metrics
from mvtui.config.schema import Config, RouterConfig, ServerConfig, TimingConfig
from mvtui.router.breakers import Breakers
from mvtui.router.metrics import RouterMetrics
from mvtui.router.queue import Admission, Ask
from mvtui.routing import affinity
from mvtui.routing.policies import Chooser, Route, expected_times, fastest
from mvtui.routing.speed import MAX_SECONDS, AnswerLength, Latency, Speed

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-10, 10)

# --- learned speeds -----------------------------------------------------------------------------


def test_the_first_answer_sets_the_speed_and_later_ones_move_it_a_fifth_of_the_way() -> None:
    speed = Speed()
    speed.observe_answer(1.1, 101, ttft=0.1)  # 100 tokens after the first in 1.0 s
    assert speed.ttft == pytest.approx(0.1) and speed.tpot == pytest.approx(0.01)
    assert speed.tokens_per_s == pytest.approx(100)
    speed.observe(0.6, 0.06)
    assert speed.ttft == pytest.approx(0.2) and speed.tpot == pytest.approx(0.02)


def test_a_slowdown_is_learned_within_a_dozen_answers() -> None:
    speed = Speed(0.05, 0.005)
    for _ in range(12):
        speed.observe(0.05, 0.05)
    assert speed.tpot == pytest.approx(0.05, rel=0.1)


def test_a_whole_answer_teaches_the_decoding_speed_from_the_known_ttft() -> None:
    speed = Speed(ttft=0.5)
    speed.observe_answer(2.5, 100, ttft=None)
    assert speed.tpot == pytest.approx(0.02)
    unknown = Speed()
    unknown.observe_answer(2.5, 100, ttft=None)  # nothing to split it by: all of it is pace
    assert unknown.tpot == pytest.approx(0.025) and unknown.ttft is None and unknown.known


def test_a_histogram_delta_weighs_as_many_answers_as_it_covers_up_to_a_cap() -> None:
    one, many = Speed(1.0, 0.1), Speed(1.0, 0.1)
    one.observe(0.0, 0.0, count=1)
    many.observe(0.0, 0.0, count=1000)
    assert one.ttft == pytest.approx(0.8) and many.ttft == pytest.approx(0.2)


@SETTINGS
@given(st.lists(st.tuples(numbers, numbers, numbers), max_size=30))
def test_no_sample_makes_a_speed_negative_infinite_or_nan(samples: list[tuple[float, float, float]]) -> None:
    speed = Speed()
    for ttft, tpot, count in samples:
        speed.observe(ttft, tpot, count if math.isfinite(count) else 1)
        speed.observe_answer(ttft, int(count) if math.isfinite(count) and abs(count) < 1e9 else None, tpot)
    for value in (speed.ttft, speed.tpot):
        assert value is None or (math.isfinite(value) and 0 <= value <= MAX_SECONDS)
    assert math.isfinite(speed.seconds(1000))


def test_answer_lengths_average_and_ignore_nonsense() -> None:
    length = AnswerLength()
    for tokens in (100, None, 0, -5, 10**9):
        length.observe(tokens)
    assert length.mean == 100
    length.observe(200)
    assert length.mean == pytest.approx(110)


# --- vLLM's latency histograms --------------------------------------------------------------------

PAGE = """\
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 10.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="llama"} 1.0
vllm:time_to_first_token_seconds_count{engine="1",model_name="llama"} 5.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="llama"} 30.0
vllm:inter_token_latency_seconds_count{engine="0",model_name="llama"} 1500.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="llama"} 999.0
vllm:time_per_output_token_seconds_count{engine="0",model_name="llama"} 1.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="old"} 4.0
vllm:time_per_output_token_seconds_count{engine="0",model_name="old"} 100.0
"""


def test_latency_histograms_are_read_per_model_and_summed_over_engines() -> None:
    latency = parse_metrics(PAGE).latency
    assert latency["llama"] == Latency(3.0, 15.0, 30.0, 1500.0)  # inter-token latency wins over the old name
    assert latency["old"] == Latency(0.0, 0.0, 4.0, 100.0)  # the old name where the new is absent


def test_a_page_with_endless_models_keeps_a_bounded_table() -> None:
    lines = [f'vllm:time_to_first_token_seconds_count{{model_name="m{index}"}} 1' for index in range(1000)]
    assert len(parse_metrics("\n".join(lines)).latency) == MAX_LATENCY_MODELS


def test_the_means_between_two_scrapes_and_a_restart_counts_nothing() -> None:
    before, after = Latency(1.0, 10.0, 5.0, 500.0), Latency(3.0, 20.0, 10.0, 1000.0)
    assert after.since(before) == ((0.2, 10.0), (0.01, 500.0))
    assert before.since(after) == (None, None)  # counters went back: the server restarted
    assert before.since(before) == (None, None)


def test_a_server_learns_its_speed_from_two_scrapes() -> None:
    server = Server(ServerConfig(url="http://a:8000", models=("llama",)), TimingConfig())
    server.scraped(EngineMetrics(latency={"llama": Latency(1.0, 10.0, 5.0, 500.0), "other": Latency(1, 1, 1, 1)}), 0)
    assert server.speed is None  # one scrape is a total since the start, not a speed now
    server.scraped(EngineMetrics(latency={"llama": Latency(3.0, 20.0, 10.0, 1000.0), "other": Latency(2, 2, 2, 2)}), 0)
    speed = server.speed_of("llama")
    assert speed is not None and speed.ttft == pytest.approx(0.2) and speed.tpot == pytest.approx(0.01)
    assert set(server.speeds) == {"llama"}  # a model it does not serve is not learned


# --- the `fastest` policy ------------------------------------------------------------------------------


@dataclass(eq=False)
class Box:
    """A server as `fastest` sees it."""

    name: str
    slots: int
    tpot: float
    held: float = 0.0
    ttft: float = 0.05
    known: bool = True
    running: float = 0.0
    waiting: float = 0.0
    sent_since_scrape: int = 0
    total_in_flight: int = 0
    speeds: dict[str, Speed] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.slots

    @property
    def has_room(self) -> bool:
        return self.held < self.slots

    def speed_of(self, model: str) -> Speed | None:
        return Speed(self.ttft, self.tpot) if self.known else None


def cluster_of_three(held_a: float = 0, held_b: float = 0, held_c: float = 0) -> list[Box]:
    """The issue's cluster: A 4 slots at 20 ms/token, B 8 at 10 ms, C 16 at 5 ms."""
    return [Box("A", 4, 0.020, held_a), Box("B", 8, 0.010, held_b), Box("C", 16, 0.005, held_c)]


def test_fastest_takes_the_fast_server_while_it_has_room() -> None:
    assert fastest(cluster_of_three(), Route(tokens=100)).name == "C"
    assert fastest(cluster_of_three(held_c=15), Route(tokens=100)).name == "C"


def test_a_fast_server_with_a_short_queue_beats_an_idle_slow_one() -> None:
    # C is full: one slot frees about every (0.05 + 128 * 0.005) / 16 = 0.04 s
    assert fastest(cluster_of_three(held_c=16), Route(tokens=100)).name == "C"
    # ...but not behind a long queue: then B, idle and twice as slow, ends it sooner
    assert fastest(cluster_of_three(held_c=16), Route(tokens=100, ahead=40)).name == "B"


def test_waiting_for_a_busy_server_stops_once_it_cannot_pay() -> None:
    servers = cluster_of_three(held_c=16)
    route = Route(tokens=100)
    times = expected_times(servers, route)
    gain = times[1] - times[2]
    assert gain > 0
    assert fastest(servers, Route(tokens=100, waited=gain * 0.9)).name == "C"
    assert fastest(servers, Route(tokens=100, waited=gain * 1.01)).name == "B"


def test_a_short_answer_goes_to_an_idle_slow_server_rather_than_wait() -> None:
    servers = [Box("slow", 4, 0.010), Box("fast", 4, 0.005, held=4)]
    assert fastest(servers, Route(tokens=2, mean_tokens=500)).name == "slow"
    assert fastest(servers, Route(tokens=500, mean_tokens=500)).name == "fast"


def test_an_unmeasured_server_is_tried_as_if_it_were_the_fastest() -> None:
    servers = [Box("measured", 8, 0.010, held=1), Box("new", 8, 0.0, known=False)]
    assert fastest(servers, Route(tokens=100)).name == "new"


def test_equal_servers_share_by_use() -> None:
    servers = [Box("a", 4, 0.01, held=2), Box("b", 4, 0.01, held=1)]
    assert fastest(servers, Route(tokens=100)).name == "b"


def test_a_plugin_policy_that_fails_is_replaced_by_balanced_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    def broken(candidates: list[Box], route: Route) -> Box:
        raise RuntimeError("plugin bug")

    def stranger(candidates: list[Box], route: Route) -> Box:
        return Box("not offered", 1, 0.01)

    servers = cluster_of_three()
    for policy in (broken, stranger):
        chooser = Chooser("mine", random.Random(0), {"mine": policy})
        assert chooser.choose(servers) in servers and chooser.choose(servers) in servers
    assert sum("routing policy mine" in record.getMessage() for record in caplog.records) == 2


# --- conversations and rendezvous hashing --------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are terse."}


def turn(question: str, *history: str) -> dict[str, object]:
    messages: list[dict[str, str]] = [SYSTEM]
    for index, text in enumerate(history):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    messages.append({"role": "user", "content": question})
    return {"model": "m", "messages": messages}


def key(payload: dict[str, object], headers: dict[str, str] | None = None) -> str | None:
    conversation = affinity.conversation_of(payload, headers or {})
    return None if conversation is None else conversation.key


def test_a_conversation_keeps_its_key_from_turn_to_turn_and_a_first_turn_has_none() -> None:
    assert key(turn("hello")) is None  # nothing to keep together yet: it goes where it is quickest
    second = key(turn("and then?", "hello", "hi"))
    assert second is not None and second == key(turn("why?", "hello", "hi", "and then?", "this"))
    assert key(turn("and then?", "bonjour", "salut")) != second


def test_a_session_header_or_user_names_the_conversation_from_its_first_turn() -> None:
    assert key(turn("hello"), {"x-session-id": "s1"}) == "session:s1"
    assert key({**turn("hello"), "user": "ann"}) == "user:ann"
    assert len(key({"user": "x" * 10_000}) or "") < 300
    long_prompt = "few-shot examples " * 100
    assert key({"prompt": long_prompt}) is not None and key({"prompt": long_prompt}) == key({"prompt": long_prompt + "more"})
    assert key({"prompt": "short"}) is None and key({"input": "embed me"}) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["messages", "prompt", "user", "model", "input"]) | st.text(max_size=5), json_values, max_size=5))
def test_any_request_body_gives_a_short_key_or_none(payload: dict[str, object]) -> None:
    conversation = affinity.conversation_of(payload, {})
    assert conversation is None or (isinstance(conversation.key, str) and len(conversation.key) < 300)


@dataclass(eq=False)
class Slot:
    url: str
    slots: int = 8
    held: float = 0.0


def test_rendezvous_spreads_conversations_by_slots_and_removal_moves_only_its_own() -> None:
    servers = [Slot("http://a"), Slot("http://b"), Slot("http://c", slots=16)]
    keys = [f"user:{index}" for index in range(4000)]
    homes = {key: affinity.rendezvous_order(servers, key)[0].url for key in keys}
    shares = Counter(homes.values())
    assert 0.2 < shares["http://a"] / len(keys) < 0.3 and 0.45 < shares["http://c"] / len(keys) < 0.55
    without_b = [servers[0], servers[2]]
    moved = [key for key in keys if affinity.rendezvous_order(without_b, key)[0].url != homes[key]]
    assert moved and all(homes[key] == "http://b" for key in moved)


def test_a_loaded_home_passes_the_conversation_to_the_next_in_its_order() -> None:
    servers = [Slot("http://a"), Slot("http://b"), Slot("http://c")]
    order = affinity.rendezvous_order(servers, "user:ann")
    assert affinity.home(servers, "user:ann", 1.25, lambda server: True) is order[0]
    order[0].held = 3  # half full: never "loaded"
    assert affinity.home(servers, "user:ann", 1.25, lambda server: True) is order[0]
    order[0].held = 6  # 6 + 1 > ceil(1.25 * 7 * 8 / 24) = 3, and over half its slots
    assert affinity.home(servers, "user:ann", 1.25, lambda server: True) is order[1]
    assert affinity.home(servers, "user:ann", 1.25, lambda server: server is order[2]) is order[2]
    assert affinity.home(servers, "user:ann", 1.25, lambda server: False) is None


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 64), numbers), min_size=1, max_size=6), st.text(max_size=20), st.floats(1, 4))
def test_bounded_load_never_breaks_on_any_numbers(loads: list[tuple[int, float]], key: str, bound: float) -> None:
    servers = [Slot(f"http://s{index}", slots, held) for index, (slots, held) in enumerate(loads)]
    chosen = affinity.home(servers, key, bound, lambda server: True)
    assert chosen is None or chosen in servers


# --- the admission holds a request for a busy fast server ------------------------------------------------


def two_servers(config: Config) -> tuple[Cluster, Server, Server]:
    cluster = Cluster(config.timing)
    slow = cluster.add(ServerConfig(url="http://slow:8000", max_concurrent_requests=1, capacity_set=True, models=("m",)))
    fast = cluster.add(ServerConfig(url="http://fast:8000", max_concurrent_requests=1, capacity_set=True, models=("m",)))
    for server, tpot in ((slow, 0.02), (fast, 0.002)):
        server.health.success()
        server.metrics_available = True
        server.learned_speed("m").observe(0.01, tpot)  # type: ignore[union-attr]
    return cluster, slow, fast


async def test_the_queue_keeps_a_request_for_the_fast_server_and_gives_up_when_waiting_cannot_pay() -> None:
    config = Config(router=RouterConfig(policy="fastest"))
    cluster, slow, fast = two_servers(config)
    admission = Admission(
        cluster, Chooser("fastest"), lambda: config, RouterMetrics(CollectorRegistry(), cluster), Breakers(cluster, lambda: config)
    )
    ask = Ask("m", tokens=100)
    assert admission.take(ask, [slow, fast], set(), retry=False, roomy_only=True) is fast
    assert admission.take(ask, [slow, fast], set(), retry=False, roomy_only=True) is None  # fast is busy: wait for it
    waiting = asyncio.ensure_future(admission.wait(ask, set(), set(), retry=False, timeout=5))
    await asyncio.sleep(0.02)
    assert not waiting.done() and slow.in_flight == 0  # the idle slow server is not worth it yet
    admission.release(fast)
    assert await waiting is fast
    # fast busy again: a request that waits past what waiting could save goes to the slow one
    late = await admission.wait(ask, set(), set(), retry=False, timeout=5)
    assert late is slow
    await admission.close()


def three_equal(config: Config) -> tuple[Cluster, list[Server]]:
    cluster = Cluster(config.timing)
    servers = [
        cluster.add(ServerConfig(url=f"http://s{index}:8000", max_concurrent_requests=2, capacity_set=True, models=("m",)))
        for index in range(3)
    ]
    for server in servers:
        server.health.success()
        server.metrics_available = True
        server.learned_speed("m").observe(0.01, 0.002)  # type: ignore[union-attr]
    return cluster, servers


async def test_a_conversation_waits_for_its_full_server_unless_it_is_far_slower() -> None:
    config = Config(router=RouterConfig(policy="fastest"))
    cluster, servers = three_equal(config)
    admission = Admission(
        cluster, Chooser("fastest"), lambda: config, RouterMetrics(CollectorRegistry(), cluster), Breakers(cluster, lambda: config)
    )
    chat = affinity.Conversation("chat:abc")
    home = affinity.rendezvous_order(servers, chat.key)[0]
    others = [server for server in servers if server is not home]
    for server in others:
        server.in_flight = 1  # the cluster holds 2 + 2 = 4: the full home is within its bound
    home.in_flight = 2
    assert admission.take(Ask("m", 10, chat), servers, set(), retry=False, roomy_only=True) is None  # waits for it
    assert admission.take(Ask("m", 10), servers, set(), retry=False, roomy_only=True) in others  # a one-off does not
    waiting = asyncio.ensure_future(admission.wait(Ask("m", 10, chat), set(), set(), retry=False, timeout=5))
    await asyncio.sleep(0.02)
    assert not waiting.done()
    admission.release(home)
    assert await waiting is home
    home.learned_speed("m").observe(5.0, 0.5, count=1000)  # type: ignore[union-attr]  # now far slower
    home.in_flight = 0
    assert admission.take(Ask("m", 10, chat), servers, set(), retry=False, roomy_only=True) in others
    await admission.close()
