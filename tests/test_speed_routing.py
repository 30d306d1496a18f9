"""Speed-aware routing and conversation affinity, end to end: `mvtui --no-ui` in front of
simulated vLLM servers of different speeds, the openai package as the client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from tests.helpers import Proc, start_sim
from tests.router_setup import FAST, load_stats, set_faults, sim_state, start_router, wait_healthy

MODEL = "llama"
SLOTS = 4


def config_for(path: Path, sims: list[Proc], router: str = "") -> Path:
    entries = ",\n".join(
        f'  {{ url = "{sim.url}", max_concurrent_requests = {SLOTS}, name = "s{index}" }}' for index, sim in enumerate(sims)
    )
    path.write_text(f"[servers]\nservers = [\n{entries}\n]\n{FAST}\n[router]\n{router}\n")
    return path


@pytest.fixture
def started() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()


def sims(started: list[Proc], *tokens_per_s: int) -> list[Proc]:
    made = [start_sim(MODEL, extra=["--max-num-seqs", str(SLOTS), "--tokens-per-s", str(rate), "--ttft-ms", "20"]) for rate in tokens_per_s]
    started.extend(made)
    return made


def received(sim: Proc) -> int:
    return int(sim_state(sim)["received"])


async def streams(client: AsyncOpenAI, count: int, concurrency: int, max_tokens: int = 12) -> None:
    """`count` streamed chats, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with gate:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"question {index}"}], max_tokens=max_tokens, stream=True
            )
            async for _ in stream:
                pass

    await asyncio.gather(*(one(index) for index in range(count)))


def client_of(router: Proc) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0, timeout=30)


async def test_fastest_learns_the_speeds_sends_most_to_the_fast_server_and_follows_a_slowdown(tmp_path: Path, started: list[Proc]) -> None:
    slow, fast = sims(started, 25, 250)
    router = start_router(config_for(tmp_path / "servers.toml", [slow, fast]))
    started.append(router)
    wait_healthy(router, 2)
    client = client_of(router)
    await streams(client, 40, concurrency=3)
    assert received(fast) >= 32, (received(slow), received(fast))  # ten times as fast: nearly all of it
    shown = {server["name"]: server for server in load_stats(router)["servers"]}
    assert shown["s1"]["tokens_per_s_per_seq"] > 2 * shown["s0"]["tokens_per_s_per_seq"]

    set_faults(fast, slow=40.0)  # now 6 tokens/s: a quarter of the other's speed
    before = received(slow)
    await streams(client, 16, concurrency=2)
    assert received(slow) - before >= 10, "the router kept sending to the server that slowed down"
    await client.close()


def conversation_turns(name: str, turns: int) -> list[list[dict[str, str]]]:
    """Each turn's messages: the whole history so far and a new question."""
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"{name}: tell me about rivers"}]
    asked = []
    for number in range(turns):
        asked.append(list(history))
        history += [{"role": "assistant", "content": f"answer {number}"}, {"role": "user", "content": f"and then {number}?"}]
    return asked


async def ask(client: AsyncOpenAI, messages: list[dict[str, str]], max_tokens: int = 2, **extra: object) -> None:
    await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, **extra)  # type: ignore[arg-type]


async def where(sims_: list[Proc], client: AsyncOpenAI, messages: list[dict[str, str]], **extra: object) -> int:
    """Which simulator served the request (they are asked one at a time)."""
    before = [received(sim) for sim in sims_]
    await ask(client, messages, **extra)
    after = [received(sim) for sim in sims_]
    changed = [index for index, (old, new) in enumerate(zip(before, after, strict=True)) if new != old]
    assert len(changed) == 1, (before, after)
    return changed[0]


async def test_a_conversation_stays_on_one_server_and_two_routers_agree_on_which(tmp_path: Path, started: list[Proc]) -> None:
    equal = sims(started, 400, 400, 400)
    config = config_for(tmp_path / "servers.toml", equal)
    routers = [start_router(config), start_router(config)]
    started.extend(routers)
    for router in routers:
        wait_healthy(router, 3)
    clients = [client_of(router) for router in routers]
    homes = set()
    for name in ("ann", "bob", "cyd", "dee", "eve", "fay"):
        turns = conversation_turns(name, 4)
        # the first turn starts nothing to keep: it goes where it is quickest
        served = [await where(equal, clients[number % 2], messages) for number, messages in enumerate(turns[1:])]
        assert len(set(served)) == 1, f"{name}'s turns went to {served}"
        homes.add(served[0])
        by_user = [await where(equal, clients[number % 2], turns[0], user=f"{name}-id") for number in range(3)]
        assert len(set(by_user)) == 1, f"{name}'s requests with a user id went to {by_user}"
    assert len(homes) >= 2, "six conversations all on one server: nothing spreads them"
    for client in clients:
        await client.close()


async def test_a_busy_conversation_spills_over_within_the_load_bound(tmp_path: Path, started: list[Proc]) -> None:
    equal = sims(started, 20, 20, 20)
    router = start_router(config_for(tmp_path / "servers.toml", equal))
    started.append(router)
    wait_healthy(router, 3)
    client = client_of(router)
    messages = conversation_turns("busy", 2)[1]
    await asyncio.gather(*(ask(client, messages, max_tokens=20) for _ in range(9)))
    counts = sorted(received(sim) for sim in equal)
    assert counts[-1] < 9 and counts[-1] <= 5, f"one conversation's 9 requests at once: {counts}"
    await client.close()


async def test_affinity_works_over_any_policy_and_can_be_turned_off(tmp_path: Path, started: list[Proc]) -> None:
    equal = sims(started, 400, 400, 400)
    pinned = start_router(config_for(tmp_path / "pinned.toml", equal, 'policy = "round_robin"'))
    free = start_router(config_for(tmp_path / "free.toml", equal, 'policy = "round_robin"\naffinity = false'))
    started.extend([pinned, free])
    for router in (pinned, free):
        wait_healthy(router, 3)
    turns = conversation_turns("roam", 7)[1:]
    for router, servers in ((pinned, 1), (free, 3)):
        client = client_of(router)
        assert len({await where(equal, client, messages) for messages in turns}) == servers
        await client.close()
