"""Conversation affinity: the turns of one conversation go to the server that holds its prefix.

vLLM caches the KV of prompts it has seen (automatic prefix caching), and each turn of a chat
re-sends the whole history: on the server of the previous turns most of the prompt is
cached. A conversation is known by its `x-session-id` header, its `user` field, or the hash of
its first messages (a long completion prompt: its start). Only requests that continue one (a
chat with an earlier answer in it, or one that names its session or user) are kept together:
a chat's first turn and a short completion go wherever is quickest, so that one-off requests
lose nothing.

Its server is chosen by weighted rendezvous hashing (highest random weight) over the model's
servers: every router computes the same order without sharing anything, removing a server
moves only its own conversations, and a server gets conversations in proportion to its slots.
A server loaded beyond the bound passes the conversation on to the next in that order
(bounded-load consistent hashing). Nothing is remembered per conversation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

SESSION_HEADER = "x-session-id"
MAX_KEY_CHARS = 256  # of a user or session id: longer ones are cut, not refused
FIRST_MESSAGES = 2  # the system prompt and the first question: what every later turn repeats
PROMPT_PREFIX_CHARS = 512  # of a completion's prompt: longer ones are kept together
UNLOADED_SHARE = 0.5  # of its slots: a server this full is never "loaded"
_SCALE = float(2**64)


class Placed(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def held(self) -> float: ...
    @property
    def slots(self) -> int: ...


P = TypeVar("P", bound=Placed)


@dataclass(frozen=True)
class Conversation:
    """A conversation under way: an earlier turn was served, its prefix is cached somewhere."""

    key: str


def conversation_of(payload: Mapping[str, Any], headers: Mapping[str, str]) -> Conversation | None:
    """The conversation the request continues, or None when it continues none."""
    session = headers.get(SESSION_HEADER)
    if session:
        return Conversation("session:" + session[:MAX_KEY_CHARS])
    user = payload.get("user")
    if isinstance(user, str) and user:
        return Conversation("user:" + user[:MAX_KEY_CHARS])
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        return _chat(messages)
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and len(prompt) > PROMPT_PREFIX_CHARS:
        return Conversation("prompt:" + _digest(prompt[:PROMPT_PREFIX_CHARS]))
    return None


def _chat(messages: list[Any]) -> Conversation | None:
    """The first messages' hash, for a chat that already has an answer in it: a first turn
    starts nothing to keep together, and goes wherever is quickest."""
    if not any(isinstance(message, dict) and message.get("role") == "assistant" for message in messages):
        return None
    try:
        first = json.dumps(messages[:FIRST_MESSAGES], sort_keys=True, ensure_ascii=False, default=str)
    except (ValueError, RecursionError, TypeError):
        return None
    return Conversation("chat:" + _digest(first))


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).hexdigest()


def rendezvous_order(servers: Sequence[P], key: str) -> list[P]:
    """`servers`, the conversation's own first: highest random weight, weighted by slots."""
    return sorted(servers, key=lambda server: -_weight(key, server))


def _weight(key: str, server: Placed) -> float:
    digest = hashlib.blake2b(f"{key}\x00{server.url}".encode("utf-8", "replace"), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 0.5) / _SCALE  # in (0, 1)
    return -max(1, server.slots) / math.log(uniform)


def within_bound(server: Placed, servers: Sequence[Placed], bound: float) -> bool:
    """Taking one more request keeps `server` within `bound` times its share of what the
    model's servers hold (its share by slots), rounded up: bounded-load consistent hashing.
    A server at most UNLOADED_SHARE full is within it whatever the others hold: a few requests
    in a quiet cluster are no hot spot. A load that is not a number counts as full."""
    if not all(math.isfinite(each.held) for each in servers):
        return math.isfinite(server.held) and server.held <= 0
    slots = sum(max(1, each.slots) for each in servers)
    held = sum(max(0.0, each.held) for each in servers)
    share = bound * (held + 1) * max(1, server.slots) / slots
    if not math.isfinite(share):
        return False
    return max(0.0, server.held) + 1 <= max(math.ceil(share), server.slots * UNLOADED_SHARE)


def home(servers: Sequence[P], key: str, bound: float, usable: Callable[[P], bool]) -> P | None:
    """The conversation's server: the first in its rendezvous order that is `usable` and
    within the load bound; None when none is."""
    for server in rendezvous_order(servers, key):
        if usable(server) and within_bound(server, servers, bound):
            return server
    return None
