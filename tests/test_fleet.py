"""Several routers, one cluster: three `mvtui --no-ui` replicas sharing a real redis-server,
in front of `mvtui sim` servers, all on 127.0.0.1 (issue 16).

Nothing here is timed: every wait is a bounded poll; speed is measured in
benchmarks/fleet_bench.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis_client

from mvtui.fleet import keys
from mvtui.fleet.keys import PowerEntry
from tests.fleet_setup import DEV_MODE, Backend, Load, Replica, admin, get_json, server_seen, start_replicas, until
from tests.helpers import REPO_ROOT, Proc, start_sim
from tests.redis_server import RedisServer, running_redis

FAST = ["--tokens-per-s", "400", "--ttft-ms", "2"]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


SLEEPY = [*FAST, "--enable-sleep-mode", "--sleep-requests", "hang", "--wake-ms-l1", "300"]


async def sim(procs: list[Proc], model: str = "m", extra: list[str] = FAST) -> Proc:
    started = await asyncio.to_thread(start_sim, model, None, extra, DEV_MODE)
    procs.append(started)
    return started


async def sim_state(server: Proc) -> dict[str, Any]:
    return await get_json(server.url + "/sim/state")


async def state_is(replica: Replica, name: str, state: str) -> bool:
    return (await server_seen(replica, name))["state"] == state


async def routable(replica: Replica, name: str) -> bool:
    return bool((await server_seen(replica, name))["routable"])


async def completion(url: str, model: str, max_tokens: int = 4) -> int:
    body = {"model": model, "prompt": "Say hi.", "max_tokens": max_tokens}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(url + "/v1/completions", json=body) as response:
            await response.read()
            return response.status


def mvtui_ps(replica: Replica, tmp_path: Path) -> str:
    env = {"XDG_STATE_HOME": str(tmp_path / replica.name / "state"), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "mvtui", "ps"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_a_drain_on_one_replica_is_seen_by_the_others(tmp_path: Path, procs: list[Proc], redis_server: RedisServer) -> None:
    first, second = await sim(procs), await sim(procs)
    replicas = await start_replicas(tmp_path, procs, redis_server.url, [Backend("s1", first.url), Backend("s2", second.url)])
    status, answer = await admin(replicas[0], "POST", "/servers/s1/drain")
    assert status == 200, answer
    for replica in replicas[1:]:
        await until(lambda replica=replica: state_is(replica, "s1", "drained"), what=f"{replica.name} sees the drain")
    status, answer = await admin(replicas[2], "POST", "/servers/s1/undrain")
    assert status == 200, answer
    for replica in replicas[:2]:
        await until(lambda replica=replica: routable(replica, "s1"), what=f"{replica.name} sees the undrain")
    status, servers = await admin(replicas[1], "GET", "/servers")
    assert [replica["name"] for replica in servers["fleet"]["replicas"]] == ["r1", "r2", "r3"]
    shown = mvtui_ps(replicas[1], tmp_path)
    assert "fleet: 3 replicas sharing redis://127.0.0.1:" in shown and "r2*" in shown


async def test_a_sleep_under_load_over_three_replicas_reaches_no_request_to_the_sleeper(
    tmp_path: Path, procs: list[Proc], redis_server: RedisServer
) -> None:
    sleeper, other = await sim(procs, extra=SLEEPY), await sim(procs)
    replicas = await start_replicas(tmp_path, procs, redis_server.url, [Backend("s1", sleeper.url), Backend("s2", other.url)])
    load = Load([replica.url for replica in replicas], "m", per_url=3, max_tokens=24).start()
    try:
        await until(lambda: _more_than(load, 60), what="load on both servers")
        assert (await sim_state(sleeper))["requests"] > 0  # the sleeper had its share of the load
        status, answer = await admin(replicas[0], "POST", "/servers/s1/sleep", {"level": 1})
        assert status == 200, answer
        done = load.ok
        await until(lambda: _more_than(load, done + 60), what="more load while s1 sleeps")
    finally:
        await load.stop()
    state = await sim_state(sleeper)
    assert state["sleeping"] and state["sleep_count"] == 1
    assert state["requests_while_sleeping"] == 0 and state["sleeps_with_inflight"] == 0
    assert load.errors == []
    for replica in replicas:
        assert await state_is(replica, "s1", "sleeping L1")


async def _more_than(load: Load, count: int) -> bool:
    return load.ok > count


async def test_a_hundred_requests_over_three_replicas_wake_a_sleeping_model_once(
    tmp_path: Path, procs: list[Proc], redis_server: RedisServer
) -> None:
    sleeper = await sim(procs, "sleepy", [*SLEEPY, "--max-num-seqs", "128"])
    replicas = await start_replicas(tmp_path, procs, redis_server.url, [Backend("s1", sleeper.url, capacity=128)])
    status, answer = await admin(replicas[0], "POST", "/servers/s1/sleep", {"level": 1})
    assert status == 200, answer
    for replica in replicas:
        await until(lambda replica=replica: state_is(replica, "s1", "sleeping L1"), what=f"{replica.name} sees it asleep")
    statuses = await asyncio.gather(*(completion(replicas[index % 3].url, "sleepy") for index in range(100)))
    assert statuses == [200] * 100
    state = await sim_state(sleeper)
    assert state["wake_count"] == 1
    assert state["requests_while_sleeping"] == 0 and state["requests"] == 100


async def test_the_lease_holder_killed_mid_sleep_leaves_no_server_drained_without_a_holder(
    tmp_path: Path, procs: list[Proc], redis_server: RedisServer
) -> None:
    slow = ["--tokens-per-s", "25", "--ttft-ms", "2", "--enable-sleep-mode", "--sleep-requests", "hang"]
    sleeper, other = await sim(procs, extra=slow), await sim(procs)
    replicas = await start_replicas(tmp_path, procs, redis_server.url, [Backend("s1", sleeper.url), Backend("s2", other.url)])
    holder, survivors = replicas[0], replicas[1:]
    long_ones = [asyncio.create_task(completion(replica.url, "m", max_tokens=75)) for replica in survivors for _ in range(4)]
    await until(lambda: _busy(survivors[0], "s1"), what="requests in flight to s1 from the other replicas")
    sleeping = asyncio.create_task(admin(holder, "POST", "/servers/s1/sleep", {"level": 1}))
    for replica in survivors:
        await until(lambda replica=replica: state_is(replica, "s1", "draining"), what=f"{replica.name} follows the drain")
    holder.proc.kill()  # SIGKILL, holding the lease, while the others' requests still run on s1
    await asyncio.gather(sleeping, return_exceptions=True)
    client = redis_client.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await until(lambda: _settled(client, sleeper.url), timeout=30, what="the operation finished or undone by a survivor")
    finally:
        await client.aclose()
    for replica in survivors:  # it never slept: the drain is undone everywhere
        await until(lambda replica=replica: routable(replica, "s1"), what=f"{replica.name} routes to s1 again")
    assert await asyncio.gather(*long_ones) == [200] * len(long_ones)
    state = await sim_state(sleeper)
    assert state["sleep_count"] == 0 and state["requests_while_sleeping"] == 0
    assert any("the drain is undone" in replica.proc.log_tail(200) for replica in survivors)


async def _busy(replica: Replica, name: str) -> bool:
    return (await server_seen(replica, name))["total_in_flight"] > 0


async def _settled(client: redis_client.Redis, server: str) -> bool:
    """No lease on the server, and its state is not one in progress."""
    if await client.exists(keys.lease_key(server)):
        return False
    raw = await client.hget(keys.POWER, server)
    entry = PowerEntry.parse(raw) if raw else None
    return entry is None or not entry.transitional


async def test_redis_stopped_under_load_fails_no_request_and_the_replicas_resync(
    tmp_path: Path, procs: list[Proc], redis_server: RedisServer
) -> None:
    first, second = await sim(procs), await sim(procs)
    replicas = await start_replicas(tmp_path, procs, redis_server.url, [Backend("s1", first.url), Backend("s2", second.url)])
    status, _ = await admin(replicas[0], "POST", "/servers/s2/drain")  # made before the outage
    assert status == 200
    for replica in replicas:
        await until(lambda replica=replica: state_is(replica, "s2", "drained"))
    load = Load([replica.url for replica in replicas], "m", per_url=3).start()
    try:
        await until(lambda: _more_than(load, 30))
        redis_server.stop()
        for replica in replicas:
            await until(lambda replica=replica: _health_is(replica, "degraded"), what=f"{replica.name} degraded")
        status, refused = await admin(replicas[1], "POST", "/servers/s1/drain")
        assert status == 409 and "refused" in refused["error"]["message"]
        assert await routable(replicas[1], "s1")  # nothing changed
        done = load.ok
        await until(lambda: _more_than(load, done + 60), what="traffic goes on without Redis")
        redis_server.start()  # empty: it kept nothing
        for replica in replicas:
            await until(lambda replica=replica: _health_is(replica, "healthy"), what=f"{replica.name} resynced")
            assert await state_is(replica, "s2", "drained")  # the replicas gave the empty Redis their overlay back
        status, _ = await admin(replicas[2], "POST", "/servers/s2/undrain")
        assert status == 200
        await until(lambda: routable(replicas[0], "s2"), what="changes flow again")
    finally:
        await load.stop()
    assert load.errors == []


async def _health_is(replica: Replica, status: str) -> bool:
    async with aiohttp.ClientSession() as session:
        async with session.get(replica.url + "/health") as response:
            body = await response.json()
            return response.status == 200 and body["status"] == status and body["fleet"]["connected"] == (status == "healthy")


async def test_summed_in_flight_counts_keep_three_replicas_within_capacity_under_a_burst(
    tmp_path: Path, procs: list[Proc], redis_server: RedisServer
) -> None:
    """s1 serves `base` and the adapter `x`, s2 only `base`; each takes 4 at once. r1 fills s1
    with `x`; then a burst of `base` at r2 and r3 at once must neither go to s1 (full, by r1's
    requests) nor put more than 4 on s2: the rest waits in the replicas' queues."""
    slow = ["--tokens-per-s", "40", "--ttft-ms", "2", "--max-num-seqs", "64"]
    both, only_base = await sim(procs, "base", [*slow, "--lora", "x"]), await sim(procs, "base", slow)
    backends = [Backend("s1", both.url, capacity=4), Backend("s2", only_base.url, capacity=4)]
    replicas = await start_replicas(tmp_path, procs, redis_server.url, backends)
    peaks = {both.url: 0, only_base.url: 0}
    watching = asyncio.create_task(_watch_peaks(peaks))
    try:
        filling = [asyncio.create_task(completion(replicas[0].url, "x", max_tokens=60)) for _ in range(4)]
        for replica in replicas[1:]:
            await until(lambda replica=replica: _remote_is(replica, "s1", 4), what=f"{replica.name} counts r1's requests")
        burst = [completion(replica.url, "base", max_tokens=40) for replica in replicas[1:] for _ in range(4)]
        statuses = await asyncio.gather(*filling, *burst)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert statuses == [200] * 12
    assert peaks[both.url] <= 4 and peaks[only_base.url] <= 4, peaks
    assert peaks[both.url] == 4 and peaks[only_base.url] >= 2, peaks  # the watch saw the load


async def _remote_is(replica: Replica, name: str, count: int) -> bool:
    return (await server_seen(replica, name))["remote_in_flight"] == count


async def _watch_peaks(peaks: dict[str, int]) -> None:
    """The most requests each simulator held at once (running + waiting), polled."""
    async with aiohttp.ClientSession() as session:
        while True:
            for url in peaks:
                async with session.get(url + "/sim/state") as response:
                    state = await response.json()
                peaks[url] = max(peaks[url], state["running"] + state["waiting"])
            await asyncio.sleep(0.02)
