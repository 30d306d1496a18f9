"""Three `mvtui --no-ui` replicas sharing a real redis-server, in front of `mvtui sim` servers,
all on 127.0.0.1: what test_fleet.py and benchmarks/fleet_bench.py start.

Each replica has its own scratch XDG folders and config file (the same servers, its own
`[cluster] name` and admin port and token). Every process is stopped by its process group.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import Proc, free_port, start_mvtui

TOKEN = "fleet-test-token"
DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    capacity: int = 8


@dataclass
class Replica:
    name: str
    proc: Proc
    admin_port: int

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def replica_config(name: str, redis_url: str, backends: Sequence[Backend], admin_port: int, policy: str, extra: str) -> str:
    servers = ",\n".join(f'  {{ url = "{b.url}", name = "{b.name}", max_concurrent_requests = {b.capacity} }}' for b in backends)
    return (
        f"[servers]\nservers = [\n{servers}\n]\n"
        "[config]\nmetrics_interval = 0.1\nhealth_check_interval = 0.5\ndrain_timeout = 30\nwake_timeout = 30\nshutdown_timeout = 3\n"
        f'[router]\nhost = "127.0.0.1"\npolicy = "{policy}"\n'
        f'[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n'
        f'[cluster]\nredis_url = "{redis_url}"\nname = "{name}"\nlease_timeout = 2.0\n{extra}'
    )


def start_replica(tmp_path: Path, name: str, redis_url: str, backends: Sequence[Backend], policy: str, extra: str = "") -> Replica:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    admin_port, port = free_port(), free_port()
    config = folder / "servers.toml"
    config.write_text(replica_config(name, redis_url, backends, admin_port, policy, extra))
    env = {f"XDG_{kind.upper()}_HOME": str(folder / kind) for kind in ("config", "state", "data", "cache")}
    proc = start_mvtui(["--no-ui", "--config", str(config), "--port", str(port)], env=env, timeout=30)
    return Replica(name, proc, admin_port)


async def start_replicas(
    tmp_path: Path,
    procs: list[Proc],
    redis_url: str,
    backends: Sequence[Backend],
    *,
    count: int = 3,
    policy: str = "least_loaded",
    extra: str = "",
) -> list[Replica]:
    started = await asyncio.gather(
        *(asyncio.to_thread(start_replica, tmp_path, f"r{index + 1}", redis_url, backends, policy, extra) for index in range(count))
    )
    procs.extend(replica.proc for replica in started)
    for replica in started:
        await until(lambda replica=replica: sees_everything(replica, count, len(backends)), what=f"{replica.name} ready")
    return list(started)


async def sees_everything(replica: Replica, replicas: int, servers: int) -> bool:
    stats = await get_json(replica.url + "/load-stats")
    fleet = stats.get("fleet") or {}
    routable = sum(server["routable"] for server in stats["servers"])
    return fleet.get("connected") is True and len(fleet.get("replicas", ())) == replicas and routable == servers


async def get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.get(url) as response:
            answer: dict[str, Any] = await response.json()
            return answer


async def admin(replica: Replica, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.request(method, replica.admin_url + path, json=body, headers=headers) as response:
            return response.status, await response.json()


async def server_seen(replica: Replica, name: str) -> dict[str, Any]:
    servers = (await get_json(replica.url + "/load-stats"))["servers"]
    return next(server for server in servers if server["name"] == name)


async def until(check: Any, *, timeout: float = 30.0, every: float = 0.05, what: str = "condition") -> Any:
    """Poll an async `check()` until it is truthy (bounded); its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(every)


@dataclass
class Load:
    """Closed-loop clients spread over the replicas' URLs until `stop()`; every failure counted."""

    urls: Sequence[str]
    model: str
    per_url: int = 4
    max_tokens: int = 8
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(url)) for url in self.urls for _ in range(self.per_url)]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, url: str) -> None:
        body = {"model": self.model, "prompt": "Tell me about routers.", "max_tokens": self.max_tokens}
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
            while not self._stopping.is_set():
                try:
                    async with session.post(url + "/v1/completions", json=body) as response:
                        await response.read()
                        if response.status == 200:
                            self.ok += 1
                        else:
                            self.errors.append(f"{url}: {response.status}")
                except (TimeoutError, aiohttp.ClientError) as error:
                    self.errors.append(f"{url}: {error!r}")
