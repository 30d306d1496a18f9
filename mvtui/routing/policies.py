"""Routing policies: pure functions from the candidates' load to one choice.

No I/O, no aiohttp, no Textual. Every policy takes the candidates (already filtered to
servers that serve the model and may take new requests), a random source and a turn
counter, and returns the chosen candidate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar


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


T = TypeVar("T", bound=Loaded)
Policy = Callable[[Sequence[T], random.Random, int], T]


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


def balanced(candidates: Sequence[T], rng: random.Random, turn: int = 0) -> T:
    """The least loaded by `balanced_score`, ties at random. This is mvllm's "prefer servers
    under 50 %, then the least loaded": the least loaded is under 50 % whenever any server
    is. When every server is full it still gets the request: vLLM queues it."""
    return _lowest([(balanced_score(candidate), candidate) for candidate in candidates], rng)


def least_loaded(candidates: Sequence[T], rng: random.Random, turn: int = 0) -> T:
    """The fewest of the router's own requests in flight per unit of capacity (with a fleet's
    other replicas' requests added)."""
    return _lowest([(in_flight_score(candidate), candidate) for candidate in candidates], rng)


def round_robin(candidates: Sequence[T], rng: random.Random, turn: int = 0) -> T:
    return candidates[turn % len(candidates)]


def uniform(candidates: Sequence[T], rng: random.Random, turn: int = 0) -> T:
    """Any of them, at random: for servers whose load tells nothing."""
    return candidates[0] if len(candidates) == 1 else rng.choice(candidates)


def power_of_two(candidates: Sequence[T], rng: random.Random, turn: int = 0) -> T:
    """Two at random, the less loaded of them (by `balanced_score`: a server without /metrics
    is loaded by the router's own requests in flight)."""
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(list(candidates), 2)
    return first if _rank(balanced_score(first)) <= _rank(balanced_score(second)) else second


POLICIES: dict[str, Policy[Any]] = {
    "balanced": balanced,
    "least_loaded": least_loaded,
    "round_robin": round_robin,
    "power_of_two": power_of_two,
    "random": uniform,
}


class Chooser:
    """Holds the policy, the random source and the turn counter between requests."""

    def __init__(self, policy: str = "balanced", rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.turn = 0
        self.policy_name = policy
        self.policy: Policy[Any] = POLICIES[policy]

    def set_policy(self, policy: str) -> None:
        self.policy_name = policy
        self.policy = POLICIES[policy]

    def choose(self, candidates: Sequence[T], *, advance: bool = True) -> T | None:
        """One of `candidates`. A retry passes `advance=False`: it takes no turn from the
        requests that come after it (round-robin)."""
        if not candidates:
            return None
        if advance:
            self.turn += 1
        chosen: T = self.policy(candidates, self.rng, self.turn)
        return chosen
