"""Live config: the file watcher, reloads that keep the cluster serving, and edits written
back without a reload loop. Real files, real simulated servers, real mvtui processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from mvtui.config.schema import Config, ServerConfig
from mvtui.config.watch import FileWatcher
from mvtui.errors import CommandError
from mvtui.runtime.wiring import Services
from tests import http
from tests.core_setup import cluster_file, core, kinds, on_loopback, save_by_rename, scratch_paths
from tests.helpers import Proc, eventually, free_port, start_mvtui, start_sim, wait_until

# --- the watcher ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def watching(path: Path, on_change: Callable[[], object]) -> AsyncIterator[FileWatcher]:
    async def callback() -> None:
        on_change()

    watcher = FileWatcher(path, callback)
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0.2)  # let the watch start before the test writes
    try:
        yield watcher
    finally:
        watcher.stop()
        await asyncio.wait_for(task, 5)


async def test_a_save_by_rename_is_seen_and_other_files_are_not(tmp_path: Path) -> None:
    path = tmp_path / "servers.toml"
    path.write_text("a")
    seen: list[str] = []
    async with watching(path, lambda: seen.append(path.read_text())):
        (tmp_path / "other.toml").write_text("x")
        (tmp_path / ".servers.toml.swp").write_text("half")
        await asyncio.sleep(0.3)  # a wrong filter would report these as a change of their own
        save_by_rename(path, "b")
        await eventually(lambda: seen)
        await asyncio.sleep(0.3)
    assert seen == ["b"]


async def test_a_burst_of_writes_is_gathered_and_the_last_one_is_read(tmp_path: Path) -> None:
    path = tmp_path / "servers.toml"
    path.write_text("0")
    seen: list[str] = []
    async with watching(path, lambda: seen.append(path.read_text())):
        for number in range(1, 11):
            path.write_text(str(number))
        await eventually(lambda: seen and seen[-1] == "10")
    assert len(seen) < 10


async def test_a_file_whose_folder_appears_later_is_watched(tmp_path: Path) -> None:
    path = tmp_path / "later" / "servers.toml"
    seen: list[str] = []
    async with watching(path, lambda: seen.append(path.read_text())):
        path.parent.mkdir()
        await asyncio.sleep(1.3)  # the watcher looks for the folder again every second
        path.write_text("here")
        await eventually(lambda: "here" in seen)


# --- the core in this process: reloads and edits --------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[Proc]:
    proc = start_sim("llama", extra=["--tokens-per-s", "200", "--ttft-ms", "5"])
    try:
        yield proc
    finally:
        proc.stop()


async def test_a_broken_file_keeps_the_last_good_config_until_it_is_fixed(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4))
    async with core(path) as (services, events):
        good = services.config
        save_by_rename(path, text.replace("max_concurrent_requests = 4", 'max_concurrent_requests = "four"'))
        await eventually(lambda: services.config_error is not None)
        (problem,) = services.config_error.problems  # type: ignore[union-attr]
        column = text.splitlines()[3].index("max_concurrent_requests") + 1
        assert (problem.line, problem.column) == (4, column)
        assert f"line 4, column {column}" in kinds(events, "config-error")[0].message
        assert services.config is good
        assert services.cluster.servers[sim.url].capacity == 4

        save_by_rename(path, text.replace("[servers]", "[servers\n"))
        await eventually(lambda: len(kinds(events, "config-error")) == 2)
        assert "TOML" in kinds(events, "config-error")[1].message

        save_by_rename(path, text.replace("max_concurrent_requests = 4", "max_concurrent_requests = 6"))
        await eventually(lambda: services.config_error is None)
        assert services.cluster.servers[sim.url].capacity == 6
        assert "capacity 4 -> 6" in kinds(events, "config")[-1].message


async def test_a_capacity_edit_changes_one_value_and_causes_no_reload(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4), ("http://127.0.0.1:9", 2))
    async with core(path) as (services, events):
        server = services.cluster.servers[sim.url]
        await eventually(lambda: server.is_up)
        assert services.reloader is not None
        seen_before = services.reloader.watcher.changes_seen
        change = await services.operator.set_capacity(sim.url, 7, persist=True)
        assert change.saved_to == path
        assert path.read_text() == text.replace("max_concurrent_requests = 4", "max_concurrent_requests = 7")
        assert server.capacity == 7 and services.cluster.servers[sim.url] is server
        reloads, config_events = services.live.reloads, len(kinds(events, "config"))
        await eventually(lambda: services.reloader.watcher.changes_seen > seen_before)  # it saw our write...
        await services.live.reload()  # ...and a read of the same bytes again changes nothing
        assert (services.live.reloads, len(kinds(events, "config"))) == (reloads, config_events)


async def test_a_saved_drain_survives_a_restart_and_undrain_restores_the_file(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4))
    async with core(path) as (services, _):
        await services.operator.drain(sim.url, persist=True)
        assert services.cluster.servers[sim.url].drain
        assert path.read_text() == text.replace("max_concurrent_requests = 4 }", "max_concurrent_requests = 4, drain = true }")
    async with core(path) as (services, _):
        server = services.cluster.servers[sim.url]
        assert server.drain and not server.routable
        await services.operator.undrain(server.name, persist=True)
        assert not server.drain
    assert path.read_text() == text


async def test_adding_and_removing_a_server_from_a_command(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, ("http://127.0.0.1:9", 2))
    async with core(path) as (services, events):
        await services.operator.add_server(sim.url + "/", max_concurrent_requests=3, name="fresh")
        assert path.read_text() == text.replace(
            "  # keep this comment\n]",
            f'  # keep this comment\n    {{ url = "{sim.url}", max_concurrent_requests = 3, name = "fresh" }},\n]',
        )
        server = services.cluster.servers[sim.url]
        await eventually(lambda: server.routable)  # polled at once, joins when healthy
        with pytest.raises(CommandError, match="already"):
            await services.operator.add_server(sim.url)
        await services.operator.remove_server("fresh", persist=True)
        assert path.read_text() == text
        await eventually(lambda: sim.url not in services.cluster.servers)
        assert [event.kind for event in events if event.server == "fresh"][-2:] == ["removing", "removed"]


async def test_edits_are_refused_while_the_file_is_broken(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4))
    async with core(path) as (services, _):
        broken = text.replace("[servers]", "[servers")
        save_by_rename(path, broken)
        await eventually(lambda: services.config_error is not None)
        with pytest.raises(CommandError, match="fix them first"):
            await services.operator.set_capacity(sim.url, 5, persist=True)
        with pytest.raises(CommandError, match="capacity must be"):
            await services.operator.set_capacity(sim.url, 0, persist=True)
        assert path.read_text() == broken
        assert services.cluster.servers[sim.url].capacity == 4


async def test_router_keys_change_live(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4))
    async with core(path) as (services, _):
        models = services.router_url + "/v1/models"
        assert (await asyncio.to_thread(http.get, models)).status_code == 200
        save_by_rename(path, '[router]\napi_keys = ["k1"]\n\n' + text)
        await eventually(lambda: services.config.router.api_keys == ("k1",))
        assert (await asyncio.to_thread(http.get, models)).status_code == 401
        keyed = await asyncio.to_thread(http.get, models, headers={"Authorization": "Bearer k1"})
        assert keyed.status_code == 200


async def test_a_deleted_file_is_reported_and_a_new_one_applies(tmp_path: Path, sim: Proc) -> None:
    path, text = cluster_file(tmp_path, (sim.url, 4))
    async with core(path) as (services, events):
        path.unlink()
        await eventually(lambda: services.config_error is not None)
        assert "no such file" in kinds(events, "config-error")[-1].message
        assert sim.url in services.cluster.servers
        path.write_text(text.replace("max_concurrent_requests = 4", "max_concurrent_requests = 9"))
        await eventually(lambda: services.cluster.servers[sim.url].capacity == 9)
        assert services.config_error is None


async def test_reload_now_reports_nothing_new_for_an_unchanged_file(tmp_path: Path, sim: Proc) -> None:
    path, _ = cluster_file(tmp_path, (sim.url, 4))
    async with core(path) as (services, events):
        assert await services.operator.reload() == []
        assert kinds(events, "config")[-1].message == "config file read: nothing to change"


async def test_without_a_config_file_commands_change_the_cluster_only(tmp_path: Path, sim: Proc) -> None:
    services = Services(on_loopback(Config()), paths=scratch_paths(tmp_path))
    async with services:
        change = await services.operator.add_server(sim.url, max_concurrent_requests=2)
        assert change.saved_to is None and "not saved" in change.message
        await services.operator.set_capacity(sim.url, 5)
        assert services.cluster.servers[sim.url].capacity == 5
        assert await services.operator.reload() == ["running without a config file: nothing to reload"]


# --- a real mvtui under load while its file changes twenty times -----------------------------


class SteadyLoad:
    """A few openai clients in a loop (streaming and not) until stopped; every outcome kept."""

    def __init__(self, base_url: str, clients: int = 3, max_tokens: int = 10) -> None:
        self.base_url = base_url
        self.clients = clients
        self.max_tokens = max_tokens
        self.successes = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(number,), daemon=True) for number in range(clients)]
        self._lock = threading.Lock()

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, number: int) -> None:
        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": f"client {number}"}]
        turn = 0
        while not self._stop.is_set():
            turn += 1
            try:
                if turn % 2:
                    reply = client.chat.completions.create(model="llama", messages=messages, max_tokens=self.max_tokens)  # type: ignore[arg-type]
                    ok = bool(reply.choices[0].message.content)
                else:
                    chunks = client.chat.completions.create(model="llama", messages=messages, max_tokens=self.max_tokens, stream=True)  # type: ignore[arg-type]
                    ok = sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) == self.max_tokens
                with self._lock:
                    if ok:
                        self.successes += 1
                    else:
                        self.failures.append("empty or short answer")
            except Exception as error:  # every failure is the test's finding
                with self._lock:
                    self.failures.append(repr(error))


class ClusterFile:
    """The config file as the test writes it: servers (url -> capacity, drain) and settings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.servers: dict[str, tuple[int, bool]] = {}
        self.policy = "balanced"
        self.interval = 0.5

    def text(self) -> str:
        lines = [
            f'    {{ url = "{url}", max_concurrent_requests = {capacity}{", drain = true" if drain else ""} }},'
            for url, (capacity, drain) in self.servers.items()
        ]
        body = "\n".join(lines)
        return (
            f'# written by test_reload\n[router]\npolicy = "{self.policy}"\n\n[servers]\nservers = [\n{body}\n]\n\n'
            f"[config]\nhealth_check_interval = {self.interval}\nmetrics_interval = 0.1\nfail_threshold = 2\n"
            f"recover_threshold = 1\nrequest_timeout = 30\n\n[admin]\nenabled = false\n"
        )

    def save(self, text: str | None = None) -> None:
        save_by_rename(self.path, self.text() if text is None else text)


def stats(router: Proc) -> dict[str, dict]:
    return {server["url"]: server for server in http.get(router.url + "/load-stats").json()["servers"]}


def sim_stats(proc: Proc) -> dict:
    return http.get(proc.url + "/sim/state").json()


def start_headless(config: Path, *extra: str, port: int) -> Proc:
    """`mvtui --no-ui` on its own config; its state and logs stay in the test's folder."""
    folder = config.parent / "xdg"
    env = {f"XDG_{kind}_HOME": str(folder / kind.lower()) for kind in ("CONFIG", "STATE", "DATA", "CACHE")}
    return start_mvtui(["--no-ui", "--config", str(config), *extra], port=port, env=env)


def log_of(router: Proc) -> str:
    return router.log_path.read_text(errors="replace")


def test_twenty_config_changes_under_steady_load_lose_no_request(tmp_path: Path) -> None:
    sims = [start_sim("llama", extra=["--tokens-per-s", "120", "--ttft-ms", "10"]) for _ in range(3)]
    router: Proc | None = None
    try:
        a, b, c = (proc.url for proc in sims)
        file = ClusterFile(tmp_path / "servers.toml")
        file.servers = {a: (4, False), b: (4, False)}
        file.save()
        port = free_port()
        router = start_headless(file.path, "--port", str(port), "--host", "127.0.0.1", port=port)
        wait_until(lambda: "mvtui serving on" in log_of(router))
        wait_until(lambda: all(server["routable"] for server in stats(router).values()) and len(stats(router)) == 2)

        def capacity(url: str) -> int | None:
            return stats(router).get(url, {}).get("capacity")

        def logged(words: str, times: int = 1) -> Callable[[], bool]:
            return lambda: log_of(router).count(words) >= times

        def applied_count() -> int:
            return log_of(router).count("config: applied:")

        def removal_while_busy(url: str, sim: Proc) -> None:
            http.post(sim.url + "/sim/faults", json={"slow": 15})  # its requests now take ~1.5 s
            wait_until(lambda: stats(router)[url]["in_flight"] > 0)
            del file.servers[url]
            file.save()
            wait_until(lambda: url not in stats(router), timeout=20)  # gone once its requests finished
            http.post(sim.url + "/sim/faults", json={"slow": 1})

        with SteadyLoad(router.url) as load:
            steps: list[tuple[str, Callable[[], None]]] = []

            def step(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
                def register(action: Callable[[], None]) -> Callable[[], None]:
                    steps.append((name, action))
                    return action

                return register

            @step("add a server")
            def _() -> None:
                file.servers[c] = (4, False)
                file.save()
                wait_until(lambda: stats(router).get(c, {}).get("routable"))

            @step("raise a capacity")
            def _() -> None:
                file.servers[a] = (6, False)
                file.save()
                wait_until(lambda: capacity(a) == 6)

            @step("broken TOML")
            def _() -> None:
                file.save(file.text().replace("[servers]", "[servers"))
                wait_until(logged("TOML: unexpected end of line"))

            @step("fixed, with a change")
            def _() -> None:
                file.servers[c] = (2, False)
                file.save()
                wait_until(lambda: capacity(c) == 2)

            @step("a wrong type")
            def _() -> None:
                file.save(file.text().replace(f'"{b}", max_concurrent_requests = 4', f'"{b}", max_concurrent_requests = "lots"'))
                wait_until(logged("expected an integer, got the string 'lots'"))

            @step("an unknown key")
            def _() -> None:
                file.save(file.text().replace("policy =", "polcy ="))
                wait_until(logged("did you mean 'policy'?"))

            @step("fixed, new policy")
            def _() -> None:
                file.policy = "least_loaded"
                file.save()
                wait_until(logged("routing policy is now least_loaded"))

            @step("remove a server with requests in flight")
            def _() -> None:
                removal_while_busy(b, sims[1])

            @step("add it back")
            def _() -> None:
                file.servers[b] = (3, False)
                file.save()
                wait_until(lambda: stats(router).get(b, {}).get("routable"))

            @step("a timing change")
            def _() -> None:
                file.interval = 0.4
                file.save()
                wait_until(logged("[config] health_check_interval 0.5 -> 0.4"))

            @step("drain in the file")
            def _() -> None:
                file.servers[c] = (2, True)
                file.save()
                wait_until(lambda: stats(router)[c]["draining"])

            @step("a comment only")
            def _() -> None:
                before = applied_count()
                file.save(file.text().replace("# written by test_reload", "# written by test_reload, edited"))
                time.sleep(0.5)
                assert applied_count() == before

            @step("undrain")
            def _() -> None:
                file.servers[c] = (5, False)
                file.save()
                wait_until(lambda: not stats(router)[c]["draining"] and capacity(c) == 5)

            @step("a URL twice")
            def _() -> None:
                file.save(file.text().replace("servers = [\n", f'servers = [\n    {{ url = "{a}" }},\n'))
                wait_until(logged("is listed twice"))

            @step("a value out of range")
            def _() -> None:
                file.save(file.text().replace("metrics_interval = 0.1", "metrics_interval = -1"))
                wait_until(logged("config.metrics_interval: must be at least 0.05"))

            @step("fixed, new capacity")
            def _() -> None:
                file.servers[b] = (5, False)
                file.save()
                wait_until(lambda: capacity(b) == 5)

            @step("remove another server with requests in flight")
            def _() -> None:
                removal_while_busy(c, sims[2])

            @step("add it back, policy back")
            def _() -> None:
                file.servers[c] = (4, False)
                file.policy = "balanced"
                file.save()
                wait_until(lambda: stats(router).get(c, {}).get("routable"))

            @step("a port change the command line overrides")
            def _() -> None:
                before = applied_count()
                file.save(file.text().replace('policy = "balanced"', 'policy = "balanced"\nport = 1'))
                time.sleep(0.5)
                assert applied_count() == before and "restart" not in log_of(router)

            @step("final capacities")
            def _() -> None:
                file.servers = {a: (3, False), b: (4, False), c: (6, False)}
                file.save()
                wait_until(lambda: (capacity(a), capacity(b), capacity(c)) == (3, 4, 6))

            assert len(steps) == 20
            for name, action in steps:
                try:
                    action()
                except AssertionError as error:
                    raise AssertionError(f"step {name!r}: {error}\n{log_of(router)[-3000:]}") from None
                time.sleep(0.3)
        assert load.failures == [], load.failures[:5]
        assert load.successes >= 60
        final = stats(router)
        assert {url: (server["capacity"], server["routable"]) for url, server in final.items()} == {
            a: (3, True),
            b: (4, True),
            c: (6, True),
        }
        # the server that stayed in the config all along kept its counters through every reload
        assert final[a]["requests"] == sim_stats(sims[0])["requests"]
        assert sum(sim_stats(proc)["aborted"] for proc in sims) == 0
        log = log_of(router)
        # no crash in the parts a reload touches (the watcher's task would log "... stopped")
        for part in ("mvtui/control/", "mvtui/config/", "mvtui/cluster/", "stopped:"):
            assert part not in log, log[log.index(part) - 2000 :][:3000]
        assert log.count("no longer in the config in force; finishing requests in flight") == 2
    finally:
        for proc in [router, *sims]:
            if proc is not None:
                proc.stop()


def test_a_changed_router_port_is_announced_as_needing_a_restart(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "servers.toml"
    settings = '[router]\nhost = "127.0.0.1"\nport = {}\n\n[admin]\nenabled = false\n'
    path.write_text(settings.format(port))
    router = start_headless(path, port=port)
    try:
        wait_until(lambda: "mvtui serving on" in log_of(router))  # the router answers before the watcher starts
        save_by_rename(path, settings.format(free_port()))
        wait_until(lambda: "takes effect after a restart" in log_of(router))
        assert f"still serving on http://127.0.0.1:{port}" in log_of(router)
        assert http.get(router.url + "/health").status_code in (200, 503)
    finally:
        router.stop()


async def test_a_request_right_after_a_server_swap_waits_for_the_newcomer(tmp_path: Path, sim: Proc) -> None:
    other = await asyncio.to_thread(start_sim, "llama", extra=["--tokens-per-s", "400", "--ttft-ms", "5"])
    try:
        path, _ = cluster_file(tmp_path, (sim.url, 4))
        async with core(path) as (services, _events):
            await eventually(lambda: services.cluster.servers[sim.url].is_up)
            swapped = dataclasses.replace(services.config, servers=(ServerConfig(url=other.url, max_concurrent_requests=4),))
            services.live.adopt(swapped)
            assert not services.cluster.servers[other.url].models  # not polled yet: the request must wait for it
            body = {"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            async with aiohttp.ClientSession() as session:
                async with session.post(services.router_url + "/v1/chat/completions", json=body) as reply:
                    assert reply.status == 200, await reply.text()
    finally:
        other.stop()


async def test_a_model_is_not_called_unknown_while_a_server_has_not_said_what_it_serves(tmp_path: Path) -> None:
    silent = f"http://127.0.0.1:{free_port()}"
    path, _ = cluster_file(tmp_path, (silent, 4))
    async with core(path) as (services, _events):
        body = {"model": "llama", "messages": [{"role": "user", "content": "x"}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(services.router_url + "/v1/chat/completions", json=body) as reply:
                assert reply.status == 503 and reply.headers["Retry-After"]
                assert "not reported" in (await reply.json())["error"]["message"]
