"""Routing policies are pure functions: tested on plain objects, no network."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from mvtui.routing.policies import BUILT_IN, Chooser, Route, balanced, balanced_score, least_loaded, power_of_two, round_robin


@dataclass
class Fake:
    name: str
    running: float = 0
    waiting: float = 0
    capacity: int = 4
    sent_since_scrape: int = 0
    in_flight: int = 0

    @property
    def total_in_flight(self) -> int:  # a router alone: its own requests are all there are
        return self.in_flight


def test_balanced_score_is_mvllms_formula_plus_fresh_sends() -> None:
    server = Fake("a", running=2, waiting=2, capacity=6, sent_since_scrape=1)
    assert balanced_score(server) == pytest.approx((2 + 0.5 * 2 + 1) / 6)


def test_balanced_prefers_servers_under_half_load() -> None:
    busy = Fake("busy", running=3, capacity=4)
    light = Fake("light", running=1, capacity=4)
    assert balanced([busy, light], Route(random.Random(0))) is light


def test_balanced_counts_requests_sent_since_the_last_scrape() -> None:
    # Both scraped idle, but the router already sent three to the first one.
    first = Fake("first", sent_since_scrape=3)
    second = Fake("second")
    assert balanced([first, second], Route(random.Random(0))) is second


def test_balanced_weighs_by_capacity() -> None:
    small = Fake("small", running=2, capacity=2)
    big = Fake("big", running=4, capacity=16)
    assert balanced([small, big], Route(random.Random(0))) is big


def test_every_server_full_still_chooses_the_least_loaded() -> None:
    a = Fake("a", running=4, waiting=6, capacity=4)
    b = Fake("b", running=4, waiting=2, capacity=4)
    assert balanced([a, b], Route(random.Random(0))) is b


def test_ties_are_broken_at_random() -> None:
    servers = [Fake("a"), Fake("b"), Fake("c")]
    rng = random.Random(1)
    picks = Counter(balanced(servers, Route(rng)).name for _ in range(300))
    assert set(picks) == {"a", "b", "c"}
    assert min(picks.values()) > 50


def test_least_loaded_uses_the_routers_own_in_flight_per_capacity() -> None:
    small = Fake("small", in_flight=2, capacity=2, running=0)
    big = Fake("big", in_flight=4, capacity=16, running=50)
    assert least_loaded([small, big], Route(random.Random(0))) is big


def test_round_robin_takes_turns() -> None:
    servers = [Fake("a"), Fake("b"), Fake("c")]
    assert [round_robin(servers, Route(turn=turn)).name for turn in range(6)] == list("abcabc")


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    servers = [Fake("idle"), Fake("half", running=2), Fake("full", running=4)]
    rng = random.Random(3)
    assert all(power_of_two(servers, Route(rng)).name != "full" for _ in range(200))


@pytest.mark.parametrize("policy", sorted(BUILT_IN))
def test_chooser_handles_no_candidates_and_one(policy: str) -> None:
    chooser = Chooser(policy, random.Random(0))
    assert chooser.choose([]) is None
    only = Fake("only")
    assert chooser.choose([only]) is only


def test_policy_can_change_live() -> None:
    chooser = Chooser("balanced", random.Random(0))
    chooser.set_policy("round_robin")
    servers = [Fake("a"), Fake("b")]
    assert [chooser.choose(servers).name for _ in range(4)] == ["b", "a", "b", "a"]


def test_routing_imports_neither_aiohttp_nor_textual() -> None:
    import subprocess
    import sys

    code = "import sys, mvtui.routing.policies; print(any(m.split('.')[0] in ('aiohttp', 'textual') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
