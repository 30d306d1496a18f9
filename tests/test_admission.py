"""The pure parts of overload handling: the breaker's state machine, the retry budget, the
`random` policy, turns that retries do not take, a server's slots, and their config keys."""

from __future__ import annotations

import random

import pytest

from mvtui.cluster.state import EngineMetrics, Server
from mvtui.config.schema import ServerConfig, TimingConfig, parse_config
from mvtui.errors import ConfigError
from mvtui.routing.breaker import Breaker, BreakerSettings, BreakerState
from mvtui.routing.policies import BUILT_IN, Chooser
from mvtui.routing.retry_budget import BACKOFF_MAX_S, MIN_RETRIES, RetryBudget, backoff

SETTINGS = BreakerSettings(enabled=True, failures=3, cooldown=5.0, max_cooldown=30.0)

# --- the breaker --------------------------------------------------------------------------------


def opened(now: float = 0.0) -> Breaker:
    breaker = Breaker()
    for _ in range(SETTINGS.failures):
        breaker.failed(now, SETTINGS)
    return breaker


def test_consecutive_failures_open_the_breaker_and_a_success_between_resets_the_count() -> None:
    breaker = Breaker()
    assert breaker.failed(0, SETTINGS) is None and breaker.failed(0, SETTINGS) is None
    breaker.succeeded()  # not consecutive any more
    assert breaker.failed(0, SETTINGS) is None and breaker.failed(0, SETTINGS) is None
    assert breaker.failed(0, SETTINGS) is BreakerState.OPEN
    assert breaker.opened == 1


def test_an_open_breaker_lets_exactly_one_probe_through_after_its_cooldown() -> None:
    breaker = opened()
    assert not breaker.allows(4.9) and breaker.retry_in(4.0) == pytest.approx(1.0)
    assert breaker.allows(5.0)
    assert breaker.dispatched() is BreakerState.HALF_OPEN  # this request is the probe
    assert not breaker.allows(5.0) and not breaker.allows(100.0)  # nobody else while it is out
    assert breaker.succeeded() is BreakerState.CLOSED
    assert breaker.allows(5.0) and breaker.failures == 0


def test_failed_probes_double_the_cooldown_up_to_the_cap() -> None:
    breaker, now, cooldowns = opened(), 0.0, []
    for _ in range(5):
        now = breaker.until
        breaker.dispatched()
        assert breaker.failed(now, SETTINGS) is BreakerState.OPEN
        cooldowns.append(breaker.cooldown)
    assert cooldowns == [10.0, 20.0, 30.0, 30.0, 30.0]
    assert breaker.opened == 6


def test_an_abandoned_probe_lets_the_next_request_probe() -> None:
    breaker = opened()
    breaker.dispatched()
    assert breaker.released(7.0) is BreakerState.OPEN
    assert breaker.allows(7.0) and breaker.cooldown == 5.0  # no verdict: the cool-down stays


def test_a_disabled_breaker_never_opens() -> None:
    breaker = Breaker()
    for _ in range(100):
        assert breaker.failed(0, BreakerSettings(enabled=False)) is None
    assert breaker.allows(0)


# --- the retry budget ---------------------------------------------------------------------------------


def test_retries_are_a_share_of_requests_with_a_floor() -> None:
    budget = RetryBudget(0.2)
    for _ in range(1000):
        budget.request(100.0)
    allowed = 0
    while budget.allows(100.5) and allowed < 10_000:
        budget.spend(100.5)
        allowed += 1
    assert allowed == 200
    quiet = RetryBudget(0.2)
    quiet.request(0.0)
    spent = 0
    while quiet.allows(0.0) and spent < 100:
        quiet.spend(0.0)
        spent += 1
    assert spent == MIN_RETRIES


def test_the_window_slides() -> None:
    budget = RetryBudget(0.0)
    for _ in range(MIN_RETRIES):
        budget.spend(0.0)
    assert not budget.allows(9.9)
    assert budget.allows(10.0)  # the second that held them has left the window


def test_backoff_is_jittered_doubling_and_capped() -> None:
    rng = random.Random(0)
    first = [backoff(0, rng) for _ in range(200)]
    assert 0.025 <= min(first) < max(first) <= 0.05
    assert all(0.05 <= backoff(1, rng) <= 0.1 for _ in range(50))
    assert all(backoff(20, rng) <= BACKOFF_MAX_S for _ in range(50))


# --- policies and turns -------------------------------------------------------------------------------


class Fake:
    def __init__(self, name: str) -> None:
        self.name = name
        self.running = self.waiting = 0.0
        self.capacity = 1
        self.sent_since_scrape = self.in_flight = self.total_in_flight = 0


def test_random_is_a_policy_and_spreads() -> None:
    candidates = [Fake("a"), Fake("b"), Fake("c")]
    chooser = Chooser("random", random.Random(1))
    chosen = {chooser.choose(candidates).name for _ in range(60)}  # type: ignore[union-attr]
    assert "random" in BUILT_IN and chosen == {"a", "b", "c"}


def test_a_retry_takes_no_turn() -> None:
    chooser = Chooser("round_robin")
    a, b = Fake("a"), Fake("b")
    assert chooser.choose([a, b]) is b  # turn 1
    assert chooser.choose([a], advance=False) is a  # the retry of that request
    assert chooser.choose([a, b]) is a  # turn 2: the next request's own turn


# --- a server's slots ---------------------------------------------------------------------------------


def server(**config: object) -> Server:
    return Server(ServerConfig(url="http://a:1", **config), TimingConfig())  # type: ignore[arg-type]


def test_a_stated_capacity_is_the_slot_limit() -> None:
    stated = server(max_concurrent_requests=2, capacity_set=True)
    assert stated.slot_limit == 2 and stated.has_room
    stated.request_started()
    stated.request_started()
    assert not stated.has_room


def test_without_a_stated_capacity_nothing_is_held_until_the_server_is_seen_queueing() -> None:
    learned = server(max_concurrent_requests=8)
    assert learned.slot_limit is None
    learned.scraped(EngineMetrics(running=64.0), 0, 0)
    assert learned.slot_limit is None  # it ran 64 at once without queueing: no limit known
    learned.scraped(EngineMetrics(running=48.0, waiting=3.0), 0, 0)
    assert learned.slot_limit == 64  # the most it was seen running


def test_other_clients_requests_take_slots_too() -> None:
    shared = server(max_concurrent_requests=4, capacity_set=True)
    shared.request_started()
    shared.scraped(EngineMetrics(running=3.0), shared.sent_total, shared.in_flight)  # 1 of ours, 2 of others
    assert shared.external == 2.0
    assert shared.has_room
    shared.request_started()
    assert not shared.has_room


def test_the_config_states_capacity_and_checks_the_new_keys() -> None:
    config = parse_config(
        '[servers]\nservers = [{ url = "http://a:1", max_concurrent_requests = 4 }, { url = "http://b:1" }]\n'
        "[router]\nqueue_size = 0\nqueue_timeout = 5\nbreaker = false\nretry_budget = 0.5\n[limits]\nmax_request_time = 30\n"
    )
    assert [server.capacity_set for server in config.servers] == [True, False]
    assert (config.router.queue_size, config.router.breaker, config.limits.max_request_time) == (0, False, 30)
    with pytest.raises(ConfigError) as error:
        parse_config("[router]\nqueue_timeout = 0\nbreaker_failures = 0\nbreaker_cooldown = 10\nbreaker_max_cooldown = 5\nqueue = 1\n")
    where = {problem.where for problem in error.value.problems}
    assert where == {"router.queue_timeout", "router.breaker_failures", "router.breaker_max_cooldown", "router.queue"}
