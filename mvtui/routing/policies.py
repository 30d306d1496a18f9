"""Routing policies: pure functions from the candidates' load to one choice.

No I/O, no aiohttp, no Textual. Every policy takes the candidates (already filtered to
servers that serve the model and may take new requests) and a `Route` (what is known of the
request, a random source and a turn counter) and returns the chosen candidate. Packages add
policies through the `mvtui.policies` entry point group (`installed_policies`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar

from mvtui.routing.speed import Speed

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mvtui.policies"
# The answer length assumed before a model's first answer, when the request does not say.
DEFAULT_ANSWER_TOKENS = 128.0
# How much longer `fastest` expects an answer on a full server than on an idle one.
BUSY_SLOWDOWN = 0.25


class Loaded(Protocol):
    @property
    def running(self) -> float: ...
    @property
    def waiting(self) -> float: ...
    @property
    def capacity(self) -> int: ...
    @property
    def sent_since_scrape(self) -> int: ...
    @property
    def total_in_flight(self) -> int: ...  # the router's own requests in flight, plus its fleet's


class Timed(Loaded, Protocol):
    """What `fastest` reads: the learned speed, the requests there and the slots."""

    @property
    def held(self) -> float: ...  # requests it has now: the router's, the fleet's, other clients'
    @property
    def slots(self) -> int: ...  # how many it runs at once
    @property
    def has_room(self) -> bool: ...
    def speed_of(self, model: str) -> Speed | None: ...


@dataclass
class Route:
    """What a policy knows of the request it places."""

    rng: random.Random = field(default_factory=random.Random)
    turn: int = 0
    model: str = ""
    tokens: float | None = None  # the answer's expected length (its max_tokens), when known
    mean_tokens: float = DEFAULT_ANSWER_TOKENS  # the model's answers' mean length
    ahead: int = 0  # requests queued before it that wait for a server of the model too
    waited: float = 0.0  # seconds it has waited in the router's queue


T = TypeVar("T", bound=Loaded)
TT = TypeVar("TT", bound=Timed)
Policy = Callable[[Sequence[T], Route], T]


def balanced_score(server: Loaded) -> float:
    """mvllm's `(running + 0.5 * waiting) / capacity`, plus what the router sent since the
    last scrape so that requests between two polls do not all land on one 'idle' server."""
    return (server.running + 0.5 * server.waiting + server.sent_since_scrape) / server.capacity


def in_flight_score(server: Loaded) -> float:
    return server.total_in_flight / server.capacity


def _rank(score: float) -> float:
    """A score that is not a number (NaN, an infinity) ranks last, and never breaks a choice."""
    return score if math.isfinite(score) else math.inf


def _lowest(scored: Sequence[tuple[float, T]], rng: random.Random) -> T:
    """The candidate with the lowest score (each scored once, in the candidates' order)."""
    ranked = [(_rank(score), candidate) for score, candidate in scored]
    best = min(rank for rank, _ in ranked)
    tied = [candidate for rank, candidate in ranked if rank == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def balanced(candidates: Sequence[T], route: Route) -> T:
    """The least loaded by `balanced_score`, ties at random. This is mvllm's "prefer servers
    under 50 %, then the least loaded": the least loaded is under 50 % whenever any server
    is. When every server is full it still gets the request: vLLM queues it."""
    return _lowest([(balanced_score(candidate), candidate) for candidate in candidates], route.rng)


def least_loaded(candidates: Sequence[T], route: Route) -> T:
    """The fewest of the router's own requests in flight per unit of capacity (with a fleet's
    other replicas' requests added)."""
    return _lowest([(in_flight_score(candidate), candidate) for candidate in candidates], route.rng)


def round_robin(candidates: Sequence[T], route: Route) -> T:
    return candidates[route.turn % len(candidates)]


def uniform(candidates: Sequence[T], route: Route) -> T:
    """Any of them, at random: for servers whose load tells nothing."""
    return candidates[0] if len(candidates) == 1 else route.rng.choice(candidates)


def power_of_two(candidates: Sequence[T], route: Route) -> T:
    """Two at random, the less loaded of them (by `balanced_score`: a server without /metrics
    is loaded by the router's own requests in flight)."""
    if len(candidates) == 1:
        return candidates[0]
    first, second = route.rng.sample(list(candidates), 2)
    return first if _rank(balanced_score(first)) <= _rank(balanced_score(second)) else second


def expected_seconds(server: Timed, speed: Speed, route: Route) -> float:
    """When a request sent to `server` now would end: the wait for one of its slots (the
    requests beyond its slots leave one per mean answer time spread over its slots; on a busy
    server, those queued ahead wait for it too: they passed up the servers with room), then
    its own answer."""
    slots = max(1, server.slots)
    tokens = route.tokens if route.tokens is not None else route.mean_tokens
    beyond = server.held + (0 if server.has_room else route.ahead) - slots + 1
    wait = beyond * speed.seconds(route.mean_tokens) / slots if beyond > 0 else 0.0
    return wait + speed.seconds(tokens)


def _speeds(candidates: Sequence[TT], model: str) -> list[Speed]:
    """Each candidate's learned speed; one not yet measured is assumed as fast as the
    fastest measured (so that it is tried, and measured), or all alike when none is."""
    learned = [candidate.speed_of(model) for candidate in candidates]
    known = [speed for speed in learned if speed is not None and speed.known]
    optimistic = min(known, key=lambda speed: speed.seconds(DEFAULT_ANSWER_TOKENS)) if known else Speed(1.0, 0.01)
    return [speed if speed is not None and speed.known else optimistic for speed in learned]


def expected_times(candidates: Sequence[TT], route: Route) -> list[float]:
    """Each candidate's `expected_seconds` for the request, a busier one a little longer
    (BUSY_SLOWDOWN at full: vLLM decodes a bigger batch more slowly, and servers alike in
    speed then share the work); NaN and infinities rank last."""
    speeds = _speeds(candidates, route.model)
    return [
        _rank(expected_seconds(candidate, speed, route) * (1.0 + BUSY_SLOWDOWN * min(1.0, max(0.0, _usage(candidate)))))
        for candidate, speed in zip(candidates, speeds, strict=True)
    ]


def answer_times(candidates: Sequence[TT], route: Route) -> list[float]:
    """How long each candidate would take over the answer itself, once it starts."""
    tokens = route.tokens if route.tokens is not None else route.mean_tokens
    return [_rank(speed.seconds(tokens)) for speed in _speeds(candidates, route.model)]


def fastest(candidates: Sequence[TT], route: Route) -> TT:
    """The least expected completion time (`expected_seconds`), ties to the least used.

    The best may have no free slot: a fast server with a short queue beats an idle slow one.
    With the router's queue on, the request then waits for it (the admission does), but only
    while waiting can still pay: once it has waited as long as the best server with room
    would take longer, it goes there."""
    times = expected_times(candidates, route)
    ranked = sorted(range(len(candidates)), key=lambda index: (times[index], _rank(_usage(candidates[index]))))
    best = candidates[ranked[0]]
    if best.has_room:
        return best
    roomy = [index for index in ranked if candidates[index].has_room]
    if roomy and route.waited >= times[roomy[0]] - times[ranked[0]]:
        return candidates[roomy[0]]
    return best


def _usage(server: Timed) -> float:
    return server.held / max(1, server.slots)


fastest.may_wait = True  # type: ignore[attr-defined]

BUILT_IN: dict[str, Policy[Any]] = {
    "fastest": fastest,
    "balanced": balanced,
    "least_loaded": least_loaded,
    "round_robin": round_robin,
    "power_of_two": power_of_two,
    "random": uniform,
}


def may_wait(policy: Policy[Any]) -> bool:
    """The policy may choose a server without a free slot, for the request to wait for it."""
    return bool(getattr(policy, "may_wait", False))


def installed_policies() -> dict[str, Policy[Any]]:
    """The built-in policies and those packages add through the `mvtui.policies` entry
    points; a plugin that fails to load is logged and left out, never the router's end."""
    policies = dict(BUILT_IN)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in policies:
            log.warning("routing policy plugin %s (%s) ignored: the name is taken", point.name, point.value)
            continue
        try:
            loaded = point.load()
        except Exception as error:  # a plugin's own bug: reported, not raised
            log.warning("routing policy plugin %s (%s) failed to load: %s", point.name, point.value, error)
            continue
        if callable(loaded):
            policies[point.name] = loaded
        else:
            log.warning("routing policy plugin %s (%s) is not callable", point.name, point.value)
    return policies


class Chooser:
    """Holds the policy, the random source and the turn counter between requests."""

    def __init__(self, policy: str = "fastest", rng: random.Random | None = None, policies: dict[str, Policy[Any]] | None = None) -> None:
        self.rng = rng or random.Random()
        self.turn = 0
        self.policies = policies if policies is not None else dict(BUILT_IN)
        self.policy_name = policy
        self.policy: Policy[Any] = self.policies[policy]
        self._complained: set[str] = set()

    def set_policy(self, policy: str) -> None:
        if policy not in self.policies:  # installed since: the config was checked against it
            self.policies = installed_policies()
        self.policy_name = policy
        self.policy = self.policies[policy]

    @property
    def may_wait(self) -> bool:
        return may_wait(self.policy)

    def choose(self, candidates: Sequence[T], route: Route | None = None, *, advance: bool = True) -> T | None:
        """One of `candidates`. A retry passes `advance=False`: it takes no turn from the
        requests that come after it (round-robin)."""
        if not candidates:
            return None
        if advance:
            self.turn += 1
        route = route or Route()
        route.rng, route.turn = self.rng, self.turn
        try:
            chosen: T = self.policy(candidates, route)
        except Exception:  # a plugin's bug: said once, and the request still goes somewhere
            self._complain("raised an error", error=True)
            return balanced(candidates, route)
        if not any(chosen is candidate for candidate in candidates):
            self._complain("chose a server that was not offered")
            return balanced(candidates, route)
        return chosen

    def _complain(self, what: str, *, error: bool = False) -> None:
        if self.policy_name not in self._complained:
            self._complained.add(self.policy_name)
            log.error("routing policy %s %s; `balanced` chooses instead", self.policy_name, what, exc_info=error)
