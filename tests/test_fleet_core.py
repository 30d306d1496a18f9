"""The fleet's parts in one process: two `Services` sharing a real redis-server, the config
key, the split of free slots, leases and their fencing, and mvtui alone unchanged.

The processes-only scenarios (three `mvtui --no-ui` replicas) are in test_fleet.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from mvtui.cluster.state import Cluster, Server
from mvtui.config.schema import AdminConfig, ClusterConfig, Config, RouterConfig, ServerConfig, TimingConfig, parse_config
from mvtui.config.starter import example_file
from mvtui.control.shared import LocalOverlay
from mvtui.errors import CommandError, ConfigError, FleetUnavailable
from mvtui.fleet import keys
from mvtui.fleet.heartbeat import fleet_cap, share
from mvtui.fleet.keys import Heartbeat
from mvtui.gpu import GpuProbe
from mvtui.paths import AppPaths
from mvtui.runtime.wiring import Services
from tests.helpers import Proc, eventually, start_sim
from tests.redis_server import RedisServer, running_redis


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


TIMING = TimingConfig(metrics_interval=0.1, health_check_interval=0.5, drain_timeout=10, wake_timeout=30, shutdown_timeout=3)


# --- the config key ------------------------------------------------------------------------


def test_the_cluster_table_is_checked() -> None:
    config = parse_config('[cluster]\nredis_url = "redis://:secret@redis:6379/0"\nname = "r1"\nlease_timeout = 3\n')
    assert config.cluster == ClusterConfig("redis://:secret@redis:6379/0", "r1", 3.0)
    with pytest.raises(ConfigError) as raised:
        parse_config('[cluster]\nredis_url = "http://user:secret@redis:6379"\nlease_timeout = 0\nnmae = "x"\n')
    text = str(raised.value)
    assert "cluster.redis_url: expected a redis://, rediss:// or unix:// URL" in text and "secret" not in text
    assert "cluster.lease_timeout: must be at least 0.5" in text
    assert "did you mean 'name'?" in text


def test_the_example_documents_the_cluster_table_with_its_defaults() -> None:
    text = example_file().read_text()
    assert [field.name for field in dataclasses.fields(ClusterConfig) if not re.search(rf"^# {field.name} = ", text, re.M)] == []
    uncommented = re.sub(r"(?m)^# (\[\[?[a-z_.]+\]\]?|[a-z_]+ = .+)$", r"\1", text)
    assert parse_config(uncommented).cluster == ClusterConfig()


# --- alone: exactly as before ------------------------------------------------------------


async def test_without_redis_url_mvtui_is_alone(tmp_path: Path) -> None:
    config = Config(router=RouterConfig(host="127.0.0.1", port=0), admin=AdminConfig(enabled=False))
    async with Services(config, paths=AppPaths(tmp_path / "c", tmp_path / "l", tmp_path / "s"), gpu=GpuProbe(nvml=None)) as services:
        assert services.fleet is None and services.cluster.fleet is None
        assert services.operator is not None and isinstance(services.operator.shared, LocalOverlay)
        assert services.control is not None and type(services.control.coordinator).__name__ == "LocalCoordinator"
        async with aiohttp.ClientSession() as session:
            async with session.get(services.router_url + "/load-stats") as response:
                assert "fleet" not in await response.json()


# --- the split of free slots ----------------------------------------------------------------


def beat(name: str, in_flight: int = 0, queued: int = 0, server: str = "http://s:1") -> Heartbeat:
    return Heartbeat(name, name, "-", 1, 0.0, {server: in_flight} if in_flight else {}, queued)


@pytest.mark.parametrize("free", range(0, 13))
@pytest.mark.parametrize("busy", [(), ("a",), ("b", "c"), ("a", "b", "c")])
def test_the_shares_of_free_slots_add_up_to_them_exactly(free: int, busy: tuple[str, ...]) -> None:
    everyone = [beat(name, in_flight=1 if name in busy else 0) for name in "abc"]
    shares = [share(free, everyone, name, "http://s:1") for name in "abc"]
    assert sum(shares) == free
    if busy and free:
        idle = [shares[j] for j, name in enumerate("abc") if name not in busy]
        assert all(shares[i] >= max(idle, default=0) for i, name in enumerate("abc") if name in busy)  # the rest goes to the busy


def test_a_replica_gets_no_more_than_its_share_of_a_full_server() -> None:
    server = Server(ServerConfig("http://s:1", 4, capacity_set=True), TIMING)
    assert server.slot_limit == 4
    mine, others = beat("a", queued=2), [beat("b", in_flight=3), beat("c")]
    server.remote_in_flight = 3
    server.fleet_cap = fleet_cap(server, "http://s:1", mine, others)
    assert server.fleet_cap == 1 and server.has_room  # one slot left, for one of those that want it: a, by name
    assert fleet_cap(server, "http://s:1", beat("c", queued=2), [beat("b", in_flight=3), beat("a", queued=2)]) == 0
    server.request_started()
    assert not server.has_room and server.total_in_flight == 4
    assert fleet_cap(server, "http://s:1", mine, []) is None  # alone: no share to keep


# --- two replicas in one process ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def replica(tmp_path: Path, name: str, redis_url: str, sim: Proc) -> AsyncIterator[Services]:
    servers = (ServerConfig(url=sim.url, name="s0", max_concurrent_requests=8),)
    config = Config(
        router=RouterConfig(host="127.0.0.1", port=0),
        timing=TIMING,
        admin=AdminConfig(enabled=False),
        servers=servers,
        cluster=ClusterConfig(redis_url=redis_url, name=name, lease_timeout=1.0),
    )
    paths = AppPaths(tmp_path / name / "config", tmp_path / name / "log", tmp_path / name / "state")
    async with Services(config, paths=paths, gpu=GpuProbe(nvml=None)) as services:
        await eventually(lambda: all(server.is_up for server in services.cluster), what=f"{name} sees its server up")
        yield services


@pytest.fixture
async def sim(procs: list[Proc]) -> Proc:
    started = await asyncio.to_thread(start_sim, "m", None, ["--tokens-per-s", "200", "--ttft-ms", "5"])
    procs.append(started)
    return started


def s0(services: Services) -> Server:
    return services.cluster.require("s0")


async def test_a_live_change_on_one_replica_is_in_force_on_the_other(tmp_path: Path, redis_server: RedisServer, sim: Proc) -> None:
    async with replica(tmp_path, "a", redis_server.url, sim) as a, replica(tmp_path, "b", redis_server.url, sim) as b:
        assert a.operator is not None and b.operator is not None
        await eventually(lambda: len(a.cluster.fleet.replicas) == 2 if a.cluster.fleet else False, what="a sees b")
        await a.operator.drain("s0")
        await eventually(lambda: s0(b).drain and not s0(b).routable, what="b drained")
        await b.operator.set_capacity("s0", 3)
        await eventually(lambda: s0(a).capacity == 3, what="a takes b's capacity")
        await a.operator.undrain("s0")
        await eventually(lambda: not s0(b).drain, what="b undrained")
        assert any("from another replica" in event.message for event in b.cluster.events)


async def test_a_replica_that_starts_reads_the_overlay_before_taking_traffic(tmp_path: Path, redis_server: RedisServer, sim: Proc) -> None:
    async with replica(tmp_path, "a", redis_server.url, sim) as a:
        assert a.operator is not None
        await a.operator.drain("s0")
        await a.operator.set_capacity("s0", 5)
        async with replica(tmp_path, "b", redis_server.url, sim) as b:
            server = s0(b)
            assert server.drain and server.capacity == 5  # in force from the first request on


async def test_while_redis_is_away_changes_are_refused_and_routing_goes_on(tmp_path: Path, redis_server: RedisServer, sim: Proc) -> None:
    async with replica(tmp_path, "a", redis_server.url, sim) as a, replica(tmp_path, "b", redis_server.url, sim) as b:
        assert a.operator is not None and a.fleet is not None
        await a.operator.set_capacity("s0", 6)
        await eventually(lambda: s0(b).capacity == 6)
        redis_server.stop()
        await eventually(lambda: a.fleet is not None and not a.fleet.link.connected, what="a notices")
        for verb in (a.operator.drain("s0"), a.operator.set_capacity("s0", 2), a.operator.sleep("s0", 1), a.operator.wake("s0")):
            with pytest.raises(FleetUnavailable, match="refused"):
                await verb
        assert not s0(a).drain and s0(a).capacity == 6  # nothing changed
        assert a.cluster.fleet is not None and a.cluster.fleet.degraded
        async with aiohttp.ClientSession() as session:
            async with session.post(a.router_url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}) as response:
                assert response.status == 200  # requests never depend on Redis
            async with session.get(a.router_url + "/health") as response:
                assert response.status == 200 and (await response.json())["status"] == "degraded"
        redis_server.start()  # empty: it kept nothing
        await eventually(lambda: a.fleet is not None and a.fleet.link.connected, what="a reconnects")
        await eventually(lambda: b.fleet is not None and b.fleet.link.connected, what="b reconnects")
        await a.operator.drain("s0")  # accepted again, and in force everywhere
        await eventually(lambda: s0(b).drain)
        assert s0(b).capacity == 6  # the replicas gave the empty Redis their last known overlay


async def test_one_lease_per_server_and_a_lost_lease_stops_its_holder(tmp_path: Path, redis_server: RedisServer, sim: Proc) -> None:
    async with replica(tmp_path, "a", redis_server.url, sim) as a, replica(tmp_path, "b", redis_server.url, sim) as b:
        assert a.fleet is not None and b.fleet is not None
        lease = await a.fleet.coordinator.acquire(s0(a), "sleep", 1, required=True)
        assert lease is not None
        assert await b.fleet.coordinator.acquire(s0(b), "sleep", 1, required=True) is None  # one holder at a time
        await lease.announce("draining", 1)
        await eventually(lambda: s0(b).sleep_pending and not s0(b).routable, what="b follows the drain")
        await eventually(lambda: lease_acked(b), what="b follows the drain's token")
        for _ in range(100):  # its next heartbeat says so
            if await lease.others_idle():
                break
            await asyncio.sleep(0.05)
        assert await lease.others_idle()
        await a.fleet.link.client.delete(keys.lease_key(s0(a).display_url))  # as if it had expired
        with pytest.raises(CommandError, match="expired or was taken over"):
            await lease.check()
        with pytest.raises(CommandError, match="expired or was taken over"):
            await lease.announce("asleep", 1)  # fenced: no write without the lease
        await lease.release()
        # nobody holds the lease and the drain is orphaned: a replica settles it (the server is awake)
        await eventually(lambda: s0(b).routable and s0(a).routable, timeout=15, what="the orphaned drain undone")
        assert await a.fleet.link.client.hget(keys.POWER, s0(a).display_url) is None


def lease_acked(services: Services) -> bool:
    assert services.fleet is not None
    return s0(services).display_url in services.fleet.follower.acks


def test_a_cluster_with_no_fleet_has_no_fleet_status() -> None:
    assert Cluster().fleet is None


# --- the deployment examples (no container runtime here: they are checked as text) -------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_the_kubernetes_example_runs_three_replicas_on_one_redis() -> None:
    text = (DEPLOY / "kubernetes" / "mvtui.yaml").read_text()
    block = text.split("servers.toml: |\n", 1)[1].split("\n---", 1)[0]
    config = parse_config("\n".join(line.removeprefix("    ") for line in block.splitlines()))
    assert config.cluster.redis_url == "redis://mvtui-redis:6379/0" and len(config.servers) == 2
    assert "replicas: 3" in text and "kind: Service" in text and "image: redis:" in text
    assert "mountPath: /etc/mvtui" in text and "subPath" not in text.split("# Edit the ConfigMap")[1].split("---", 1)[1]


def test_the_dockerfile_is_slim_non_root_and_checks_health() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text and "USER 10001" in text
    assert re.search(r"HEALTHCHECK .*\n.*http://127\.0\.0\.1:8888/health", text)
    assert 'ENTRYPOINT ["mvtui", "--no-ui"]' in text
