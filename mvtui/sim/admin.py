"""Health, version, model list, metrics, the dev-mode sleep API and the simulator's controls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from mvtui.sim.metrics import render
from mvtui.sim.parsing import read_json
from mvtui.sim.runtime import ApiError, Runtime
from mvtui.sim.sleep import SLEEP_MODES
from mvtui.sim.state import FaultUpdateError

VLLM_VERSION = "0.11.1"
LEGACY_VLLM_VERSION = "0.10.2"  # the last release that still showed gpu_cache_usage_perc
WORKER_METHODS = ("reload_weights",)
EXIT_DELAY_S = 0.05  # lets the answer to the exit request reach the client first


class AdminRoutes:
    def __init__(self, runtime: Runtime, registry: CollectorRegistry, dev_mode: bool, on_exit: Callable[[], None]) -> None:
        self._runtime = runtime
        self._registry = registry
        self._dev_mode = dev_mode
        self._on_exit = on_exit

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/health", self._health)
        router.add_get("/version", self._version)
        router.add_get("/v1/models", self._models)
        router.add_get("/metrics", self._metrics)
        router.add_post("/sim/faults", self._set_faults)
        router.add_get("/sim/state", self._state)
        if self._runtime.config.enable_sleep_mode and self._dev_mode:
            router.add_post("/sleep", self._sleep)
            router.add_post("/wake_up", self._wake_up)
            router.add_get("/is_sleeping", self._is_sleeping)
            router.add_post("/collective_rpc", self._collective_rpc)
            router.add_post("/reset_prefix_cache", self._reset_prefix_cache)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self._runtime.faults.dead else 200)

    async def _version(self, request: web.Request) -> web.Response:
        legacy = self._runtime.config.legacy_metrics
        return web.json_response({"version": LEGACY_VLLM_VERSION if legacy else VLLM_VERSION})

    async def _models(self, request: web.Request) -> web.Response:
        config, created = self._runtime.config, self._runtime.started_at
        cards = [model_card(config.model, config.model, None, config.max_model_len, created)]
        cards += [model_card(name, name, config.model, config.max_model_len, created) for name in config.lora]
        return web.json_response({"object": "list", "data": cards})

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=render(self._registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _set_faults(self, request: web.Request) -> web.Response:
        runtime, body = self._runtime, await read_json(request)
        try:
            runtime.faults.update(body)
        except FaultUpdateError as exc:
            raise ApiError(400, str(exc)) from None
        runtime.engine.slow = runtime.faults.slow
        if runtime.faults.dead:
            runtime.engine.abort_all()  # a dead engine takes its in-flight requests with it
        if body.get("exit") is True:
            asyncio.get_running_loop().call_later(EXIT_DELAY_S, self._on_exit)
        return web.json_response(runtime.faults.as_dict())

    async def _state(self, request: web.Request) -> web.Response:
        runtime = self._runtime
        return web.json_response({**runtime.stats().as_dict(), "faults": runtime.faults.as_dict()})

    async def _sleep(self, request: web.Request) -> web.Response:
        level = request.query.get("level", "1")
        mode = request.query.get("mode", "abort")
        if level not in ("1", "2"):
            raise ApiError(400, f"level must be 1 or 2, got {level!r}", param="level")
        if mode not in SLEEP_MODES:
            raise ApiError(400, f"mode must be one of {', '.join(SLEEP_MODES)}", param="mode")
        await self._runtime.sleep.sleep(int(level), mode)
        return web.Response()

    async def _wake_up(self, request: web.Request) -> web.Response:
        await self._runtime.sleep.wake(request.query.getall("tags", []))
        return web.Response()

    async def _is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self._runtime.sleep.is_sleeping})

    async def _collective_rpc(self, request: web.Request) -> web.Response:
        method = (await read_json(request)).get("method")
        if method not in WORKER_METHODS:
            raise ApiError(400, f"the simulator's workers know only {', '.join(WORKER_METHODS)}", param="method")
        self._runtime.sleep.reload_weights()
        return web.json_response({"results": [None]})

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        self._runtime.sleep.reset_prefix_cache()
        return web.Response()


def model_card(name: str, root: str, parent: str | None, max_model_len: int, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [],
    }
