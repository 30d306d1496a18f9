"""What the router learned of each server's speed (routing/speed.py) is visible: in
`/load-stats` (and the admin API), in `/metrics`, in `mvtui top` and in the dashboard's panes.
A real router in front of a simulator with a known speed, a real dashboard over a real core,
and the views' functions on a server whose speed is set by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from textual.widgets import Static

from mvtui.admin.top import format_top
from mvtui.cluster.state import Cluster, Server
from mvtui.config.schema import ServerConfig, TimingConfig
from mvtui.paths import AppPaths
from mvtui.router.endpoints import server_status
from mvtui.router.metrics import RouterMetrics
from mvtui.sim.config import SimConfig
from mvtui.ui import panels
from mvtui.ui.app import create_app
from mvtui.ui.details import DetailsScreen
from mvtui.ui.widgets import ServerPane
from tests import http
from tests.helpers import Proc, eventually, start_sim, wait_until
from tests.router_setup import chat, load_stats, metric, start_router, write_config
from tests.test_ui import MODEL, config_text, core_from_file, ready, server, sims
from tests.ui_frozen import tmp_paths

TTFT_HELP = "# HELP mvtui_server_ttft_seconds The router's learned estimate (EWMA)"
TPOT_HELP = "# HELP mvtui_server_time_per_output_token_seconds The router's learned estimate (EWMA)"


@pytest.fixture
def paths(tmp_path: Path) -> AppPaths:
    return tmp_paths(tmp_path)


def serving(*models: str, url: str = "http://a:1") -> Server:
    server = Server(ServerConfig(url), TimingConfig())
    server.discovered_models = models
    return server


def strict_json(text: str) -> Any:
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in the JSON")

    return json.loads(text, parse_constant=refuse)


def metrics_text(cluster: Cluster) -> str:
    registry = CollectorRegistry()
    RouterMetrics(registry, cluster)
    return generate_latest(registry).decode()


def plain(server: Server, *, detailed: bool, width: int = 100) -> str:
    return panels.server_body(server, width, panels.Palette(), detailed=detailed).plain


# --- a real router in front of a simulator ----------------------------------------------------


def stream_one(router: Proc) -> None:
    with http.stream(router.url + "/v1/chat/completions", json=chat(max_tokens=12, stream=True)) as (status, lines):
        assert status == 200
        assert any(line == "data: [DONE]" for line in lines)


def learned(router: Proc) -> dict[str, Any] | None:
    entry = load_stats(router)["servers"][0]
    return entry if entry["ttft_s"] is not None and entry["tokens_per_s_per_seq"] is not None else None


def test_load_stats_and_metrics_carry_the_speed_the_router_learned(tmp_path: Path, procs: list[Proc]) -> None:
    sim = start_sim("llama", extra=["--max-num-seqs", "4", "--tokens-per-s", "50", "--ttft-ms", "100"])
    procs.append(sim)
    router = start_router(write_config(tmp_path / "servers.toml", [sim.url]))
    procs.append(router)
    wait_until(lambda: load_stats(router)["servers"][0]["models"] == ["llama"], what="the model discovered")
    before = strict_json(http.get(router.url + "/load-stats").text)["servers"][0]
    assert (before["ttft_s"], before["tokens_per_s_per_seq"], before["speeds"]) == (None, None, {})
    assert "mvtui_server_ttft_seconds{" not in http.get(router.url + "/metrics").text  # nothing known: no sample

    for _ in range(4):
        stream_one(router)
    entry = wait_until(lambda: learned(router), what="a learned speed in /load-stats")
    strict_json(http.get(router.url + "/load-stats").text)  # never NaN or Infinity
    assert 0.08 <= entry["ttft_s"] < 3.0, entry  # the simulator's 100 ms, on a noisy machine
    assert 5 <= entry["tokens_per_s_per_seq"] <= 60, entry  # its 50 tokens/s per sequence, or slower
    speed = entry["speeds"]["llama"]
    assert set(speed) == {"ttft_s", "tpot_s", "tokens_per_s", "samples"} and speed["samples"] >= 1
    assert speed["ttft_s"] == entry["ttft_s"] and math.isclose(speed["tokens_per_s"], 1 / speed["tpot_s"], rel_tol=0.01)
    assert {"name", "load", "ttft_p50", "has_room", "breaker_state"} <= set(entry)  # the fields it had stay

    text = http.get(router.url + "/metrics").text
    assert TTFT_HELP in text and TPOT_HELP in text
    name = entry["name"]
    assert metric(router, "mvtui_server_ttft_seconds", server=name, model="llama") > 0.05
    assert 0 < metric(router, "mvtui_server_time_per_output_token_seconds", server=name, model="llama") < 1


# --- the JSON, the gauges and `mvtui top`, from a speed set by hand ------------------------------------


def test_each_model_learned_shows_and_unknown_values_are_null() -> None:
    server = serving("m", "n", "o")
    first = server.learned_speed("m")
    assert first is not None
    first.observe(0.25, None)  # a TTFT, no decoding speed yet
    second = server.learned_speed("n")
    assert second is not None
    second.observe(0.123456, 0.0208333)
    server.learned_speed("o")  # made, nothing learned: not shown
    status = server_status(server)
    assert (status["ttft_s"], status["tokens_per_s_per_seq"]) == (0.25, None)
    assert status["speeds"] == {
        "m": {"ttft_s": 0.25, "tpot_s": None, "tokens_per_s": None, "samples": 1},
        "n": {"ttft_s": 0.1235, "tpot_s": 0.020833, "tokens_per_s": 48.0, "samples": 1},
    }


def test_nothing_that_is_not_a_number_reaches_the_json() -> None:
    server = serving("m")
    speed = server.learned_speed("m")
    assert speed is not None
    speed.ttft, speed.tpot = math.inf, math.nan  # whatever went wrong upstream of the views
    status = server_status(server)
    json.dumps(status, allow_nan=False)
    assert (status["ttft_s"], status["tokens_per_s_per_seq"], status["speeds"]["m"]["tpot_s"]) == (None, None, None)


def test_the_gauges_show_only_what_is_known() -> None:
    cluster = Cluster(TimingConfig(), lambda: 1000.0)
    cluster.apply((ServerConfig("http://a:1", name="a"), ServerConfig("http://b:1", name="b")), TimingConfig())
    for name, (ttft, tpot) in {"a": (0.2, 0.01), "b": (0.5, None)}.items():
        found = cluster.find(name)
        assert found is not None
        found.discovered_models = ("m",)
        speed = found.learned_speed("m")
        assert speed is not None
        speed.observe(ttft, tpot)
    text = metrics_text(cluster)
    assert TTFT_HELP in text and TPOT_HELP in text
    assert 'mvtui_server_ttft_seconds{model="m",server="a"} 0.2' in text
    assert 'mvtui_server_ttft_seconds{model="m",server="b"} 0.5' in text
    assert 'mvtui_server_time_per_output_token_seconds{model="m",server="a"} 0.01' in text
    assert 'mvtui_server_time_per_output_token_seconds{model="m",server="b"}' not in text


def test_top_has_a_column_for_each() -> None:
    info = {"version": "0", "router_url": "http://h:1", "policy": "fastest", "in_flight": 0, "config_error": None, "gpus": {}}
    fast = serving("m", url="http://a:1")
    speed = fast.learned_speed("m")
    assert speed is not None
    speed.observe(0.12, 1 / 48)
    rows = [{**server_status(found), "request_rate": 0, "token_rate": 0} for found in (fast, serving("m", url="http://b:1"))]
    table = format_top(info, rows).split("\n\n")[1].splitlines()
    header = table[0].split()
    assert header[-2:] == ["TTFT-EWMA", "TOK/S/SEQ"]
    assert table[1].split()[-2:] == ["120ms", "48"] and table[2].split()[-2:] == ["-", "-"]


# --- the dashboard ------------------------------------------------------------------------------------


def test_both_pane_sizes_show_it_and_a_dash_until_it_is_known() -> None:
    server = serving("m")
    assert "ttft – · – tok/s/seq" in plain(server, detailed=False)
    assert "learned TTFT – · – tok/s/seq" in plain(server, detailed=True)
    speed = server.learned_speed("m")
    assert speed is not None
    speed.observe(0.12, 1 / 48)
    assert "ttft 120 ms · 48 tok/s/seq" in plain(server, detailed=False)
    assert "learned TTFT 120 ms · 48 tok/s/seq" in plain(server, detailed=True)
    assert "ttft 120 ms · 48 tok/s/seq" in plain(server, detailed=False, width=78)  # it fits at 80 columns


def test_the_details_head_shows_each_model_learned() -> None:
    server = serving("m", "n")
    for model, ttft in (("m", 1.5), ("n", 0.04)):
        speed = server.learned_speed(model)
        assert speed is not None
        speed.observe(ttft, 0.002)
    head = panels.details_head(server, panels.Palette(), 200).plain
    assert "learned m TTFT 1.5 s · 500 tok/s/seq" in head and "learned n TTFT 40 ms · 500 tok/s/seq" in head


async def stream_through(router_url: str, count: int) -> None:
    client = openai.AsyncOpenAI(base_url=router_url + "/v1", api_key="unused", max_retries=0)
    try:
        for _ in range(count):
            chunks = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True
            )
            async for _chunk in chunks:
                pass
    finally:
        await client.close()


async def test_the_dashboard_shows_what_the_router_learned_of_a_real_server(tmp_path: Path, paths: AppPaths) -> None:
    async with sims(SimConfig(model=MODEL, tokens_per_s=40, ttft_ms=50)) as (sim,):
        path = tmp_path / "servers.toml"
        path.write_text(config_text([("alpha", sim.url, 4)]))
        app = create_app(core_from_file(path, paths), paths, user_themes=False)
        async with app.run_test(size=(100, 30)) as pilot:
            services = await ready(app, 1)
            alpha = server(app, "alpha")
            pane = next(iter(app.query(ServerPane)))
            assert "ttft – · – tok/s/seq" in pane.text.plain
            await stream_through(services.router_url, 3)
            await eventually(lambda: alpha.speed is not None and alpha.speed.known, what="a learned speed")
            app.tick()
            assert f"ttft {learned_text(alpha)}" in pane.text.plain
            await pilot.press("enter")
            await eventually(lambda: isinstance(app.screen, DetailsScreen), what="the details screen")
            head = app.screen.query_one("#details-head", Static)
            await eventually(lambda: f"learned TTFT {learned_text(alpha)}" in str(head.content), what="the speed in its head")


def learned_text(server: Server) -> str:
    """`120 ms · 48 tok/s/seq` from its speed now."""
    speed = server.speed
    assert speed is not None and speed.ttft is not None and speed.tokens_per_s is not None
    return f"{panels.duration(speed.ttft)} · {panels.rate(speed.tokens_per_s)} tok/s/seq"
