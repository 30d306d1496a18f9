"""The admin API's endpoints: servers, instances and the operator's verbs, as JSON.

Every change goes through the `Operator`, so the CLI (which calls this API), the API and
the dashboard mean the same by each verb: drain, undrain, capacity and removal are live
until restart, and `"persist": true` (or `?persist=1`) writes them to the config file.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mvtui import __version__
from mvtui.admin.passthrough import Passthrough
from mvtui.cluster.state import Server
from mvtui.config.entries import EntryError, instance_entry
from mvtui.config.schema import InstanceConfig
from mvtui.control.operator import Operator, Outcome
from mvtui.errors import CommandError, UnknownServer
from mvtui.instances.record import Instance
from mvtui.paths import AppPaths
from mvtui.router.endpoints import server_status

Spawn = Callable[[Awaitable[None], str], "asyncio.Task[None]"]


class NotFound(Exception):
    pass


class BadRequest(Exception):
    pass


class AdminApi:
    def __init__(self, operator: Operator, paths: AppPaths, passthrough: Passthrough, spawn: Spawn, router_url: Callable[[], str]) -> None:
        self.operator = operator
        self.cluster = operator.cluster
        self.instances = operator.instances
        self.paths = paths
        self.passthrough = passthrough
        self.spawn = spawn
        self.router_url = router_url
        self.admin_url: str | None = None
        self._started = time.time()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/info", self.info),
            web.get("/servers", self.list_servers),
            web.post("/servers", self.add_server),
            web.get("/servers/{name}", self.get_server),
            web.patch("/servers/{name}", self.change_server),
            web.delete("/servers/{name}", self.remove_server),
            web.post("/servers/{name}/drain", self.drain),
            web.post("/servers/{name}/undrain", self.undrain),
            web.post("/servers/{name}/save", self.save),
            web.post("/servers/{name}/sleep", self.sleep),
            web.post("/servers/{name}/wake", self.wake),
            web.get("/instances", self.list_instances),
            web.post("/instances", self.create_instance),
            web.get("/instances/{id}", self.get_instance),
            web.delete("/instances/{id}", self.delete_instance),
            web.post("/instances/{id}/start", self.start_instance),
            web.post("/instances/{id}/stop", self.stop_instance),
            web.post("/instances/{id}/restart", self.restart_instance),
            web.route("*", "/proxy/{id}/{path:.*}", self.proxy),
        ]

    async def info(self, request: web.Request) -> web.Response:
        config = self.operator.live.current
        path = self.operator.live.path
        return web.json_response(
            {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self._started, 1),
                "router_url": self.router_url(),
                "admin_url": self.admin_url,
                "config_path": str(path) if path else None,
                "config_error": str(self.operator.live.error) if self.operator.live.error else None,
                "policy": config.router.policy,
                "servers": len(self.cluster),
                "instances": len(self.instances.instances),
                "models": self.cluster.models(),
                "in_flight": self.cluster.summary().in_flight,
                "log_dir": str(self.paths.log_dir),
                "instance_logs": str(self.paths.instance_logs),
                "gpus": await self._gpus(),
                "fleet": self.cluster.fleet.as_json() if self.cluster.fleet is not None else None,
            }
        )

    async def _gpus(self) -> dict[str, Any]:
        probe = self.instances.gpu
        if probe is None:
            return {"unavailable": "no GPU probe"}
        snapshot = await probe.sample()
        if not snapshot.available:
            return {"unavailable": snapshot.unavailable}
        return {
            "devices": [
                {
                    "index": gpu.index,
                    "name": gpu.name,
                    "memory_used": gpu.memory_used,
                    "memory_total": gpu.memory_total,
                    "utilization": gpu.utilization,
                    "temperature": gpu.temperature,
                }
                for gpu in snapshot.gpus
            ]
        }

    # --- servers -----------------------------------------------------------------------

    def server_info(self, server: Server) -> dict[str, Any]:
        instance = self.instances.for_server(server)
        return {
            **server_status(server),
            "lifecycle": server.lifecycle,
            "sleep_capable": server.sleep_capable,
            "waking": server.waking,
            "kind": "local" if instance else "remote",
            "instance": instance.label if instance else None,
            "pid": instance.pid if instance else None,
            "request_rate": round(server.current_rates()[0], 3),
            "token_rate": round(server.current_rates()[1], 3),
        }

    def _server(self, request: web.Request) -> Server:
        try:
            return self.operator.find(request.match_info["name"])
        except UnknownServer as error:
            raise NotFound(str(error)) from None

    async def list_servers(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {"servers": [self.server_info(server) for server in self.cluster]}
        if self.cluster.fleet is not None:  # the replicas sharing the cluster ([cluster] redis_url)
            body["fleet"] = self.cluster.fleet.as_json()
        return web.json_response(body)

    async def get_server(self, request: web.Request) -> web.Response:
        return web.json_response(self.server_info(self._server(request)))

    async def drain(self, request: web.Request) -> web.Response:
        server = self._server(request)
        outcome = await self.operator.drain(server.url, persist=await _persist(request))
        return web.json_response(self._changed(server, outcome))

    async def undrain(self, request: web.Request) -> web.Response:
        server = self._server(request)
        outcome = await self.operator.undrain(server.url, persist=await _persist(request))
        return web.json_response(self._changed(server, outcome))

    async def save(self, request: web.Request) -> web.Response:
        server = self._server(request)
        return web.json_response(self._changed(server, await self.operator.save(server.url)))

    async def sleep(self, request: web.Request) -> web.Response:
        server = self._server(request)
        await self.operator.sleep(server.url, await _sleep_level(request))
        return web.json_response(self.server_info(server))

    async def wake(self, request: web.Request) -> web.Response:
        server = self._server(request)
        await self.operator.wake(server.url)
        return web.json_response(self.server_info(server))

    def _changed(self, server: Server, outcome: Outcome) -> dict[str, Any]:
        return {**self.server_info(server), "message": outcome.message, "saved_to": outcome.as_json()["saved_to"]}

    async def add_server(self, request: web.Request) -> web.Response:
        """`{"url": U, "max_concurrent_requests": N, "name": ..., "api_key": ..., "models": [...]}`"""
        body = await _json_object(request)
        url = body.pop("url", None)
        if not isinstance(url, str):
            raise BadRequest("`url` (a string) is required")
        unknown = set(body) - {"max_concurrent_requests", "name", "api_key", "models"}
        if unknown:
            raise BadRequest(f"unknown keys: {', '.join(sorted(unknown))}")
        outcome = await self.operator.add_server(url, **body)
        return web.json_response(outcome.as_json(), status=201)

    async def change_server(self, request: web.Request) -> web.Response:
        """`{"max_concurrent_requests": N, "drain": true|false, "persist": false}`"""
        server = self._server(request)
        body = await _json_object(request)
        persist = _flag(body.pop("persist", False), "persist")
        unknown = set(body) - {"max_concurrent_requests", "drain"}
        if unknown or not body:
            raise BadRequest("send max_concurrent_requests and/or drain (and persist: true to write them to the config file)")
        changes = []
        if "max_concurrent_requests" in body:
            changes.append(await self.operator.set_capacity(server.url, body["max_concurrent_requests"], persist=persist))
        if "drain" in body:
            drained = _flag(body["drain"], "drain")
            verb = self.operator.drain if drained else self.operator.undrain
            changes.append(await verb(server.url, persist=persist))
        return web.json_response({**self.server_info(server), "changes": [change.as_json() for change in changes]})

    async def remove_server(self, request: web.Request) -> web.Response:
        server = self._server(request)
        outcome = await self.operator.remove_server(server.url, persist=await _persist(request))
        return web.json_response(outcome.as_json())

    # --- instances -----------------------------------------------------------------------

    def _instance(self, request: web.Request) -> Instance:
        try:
            return self.instances.find(request.match_info["id"])
        except CommandError as error:
            raise NotFound(str(error)) from None

    def instance_info(self, instance: Instance) -> dict[str, Any]:
        return instance.info(self.instances.clock)

    async def list_instances(self, request: web.Request) -> web.Response:
        return web.json_response({"instances": [self.instance_info(instance) for instance in self.instances]})

    async def get_instance(self, request: web.Request) -> web.Response:
        return web.json_response(self.instance_info(self._instance(request)))

    async def create_instance(self, request: web.Request) -> web.Response:
        """`{"model": M, "params": {...InstanceConfig keys}, "wait": false, "create": true}`:
        start the instance for M, creating it when none matches; with `"create": false` only
        an existing one (404 names them). 202 at once, or 200 once running with wait."""
        body = await _json_object(request)
        model, params = body.get("model"), body.get("params") or {}
        if not isinstance(model, str) or not model:
            raise BadRequest("`model` (a string) is required")
        if not isinstance(params, dict):
            raise BadRequest("`params` must be an object of [[instances]] keys")
        instance = self._existing(model, params) if _flag(body.get("create", True), "create") else self._instance_named(model, params)
        instance = instance or self.instances.add(_instance_config(model, params), origin="api")
        start = self.operator.start(instance.label)
        if body.get("wait"):
            await start
            return web.json_response(self.instance_info(instance))
        self.spawn(_quietly(start), f"admin start {instance.label}")
        await asyncio.sleep(0)  # let the start begin, so the answer already reads "starting"
        return web.json_response(self.instance_info(instance), status=202)

    def _instance_named(self, key: str, params: dict[str, Any]) -> Instance:
        """`"create": false` (`mvtui start` without --new): an existing instance, or 404."""
        if params:
            raise BadRequest('`params` describe a new instance: send "create": true')
        try:
            return self.instances.find(key)
        except UnknownServer as error:
            raise NotFound(str(error)) from None

    def _existing(self, model: str, params: dict[str, Any]) -> Instance | None:
        key = params.get("name") or params.get("served_model_name") or model
        try:
            instance = self.instances.find(key)
        except UnknownServer:  # none matches; several matching is an error, not a reason to create
            return None
        if params and instance.origin == "config":
            raise CommandError(f"instance {instance.label} is in the config file; change its settings there")
        if params:
            raise CommandError(f"instance {instance.label} exists; DELETE it before starting it with other settings")
        return instance

    async def delete_instance(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        if instance.origin == "api":
            await self.instances.remove(instance.label)
        else:
            await self.operator.stop(instance.label)
        return web.json_response(self.instance_info(instance))

    async def start_instance(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        await self.operator.start(instance.label)
        return web.json_response(self.instance_info(instance))

    async def stop_instance(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        await self.operator.stop(instance.label)
        return web.json_response(self.instance_info(instance))

    async def restart_instance(self, request: web.Request) -> web.Response:
        """Stop, then start with the entry's current settings. `{"wait": false}` (or
        `?wait=0`): 202 once the restart has begun; follow it with GET /instances/{id}."""
        instance = self._instance(request)
        if await _wait(request):
            await self.operator.restart(instance.label)
            return web.json_response(self.instance_info(instance))
        self.spawn(_quietly(self.operator.restart(instance.label)), f"admin restart {instance.label}")
        await asyncio.sleep(0)  # let it begin, so the answer already reads "stopping" or "starting"
        return web.json_response(self.instance_info(instance), status=202)

    # --- direct access --------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Any request to one server or instance, bypassing the router (e.g. its /metrics)."""
        key = request.match_info["id"]
        server = self.cluster.find(key)
        if server is None:
            try:
                server = self.instances.find(key).server
            except CommandError as error:
                raise NotFound(str(error)) from None
        return await self.passthrough.relay(request, server, "/" + request.match_info["path"])


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be true or false")
    return value


async def _persist(request: web.Request) -> bool:
    """`?persist=1` or `{"persist": true}`: write the change to the config file."""
    if "persist" in request.query:
        return request.query["persist"].lower() in ("1", "true", "yes")
    return _flag((await _json_object(request)).get("persist", False), "persist")


async def _wait(request: web.Request) -> bool:
    """`?wait=0` or `{"wait": false}`: answer at once; by default once it is done."""
    if "wait" in request.query:
        return request.query["wait"].lower() not in ("0", "false", "no")
    return _flag((await _json_object(request)).get("wait", True), "wait")


async def _json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as error:
        raise BadRequest(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def _sleep_level(request: web.Request) -> int:
    raw: Any = request.query.get("level")
    if raw is None:
        raw = (await _json_object(request)).get("level", 1)
    try:
        level = int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"level must be 1 or 2, got {raw!r}") from None
    if level not in (1, 2):
        raise BadRequest(f"level must be 1 or 2, got {level}")
    return level


def _instance_config(model: str, params: dict[str, Any]) -> InstanceConfig:
    """Validated exactly like an [[instances]] table of the config file."""
    try:
        return instance_entry({"model": model, **params})
    except EntryError as error:
        raise BadRequest(str(error)) from None


async def _quietly(start: Awaitable[Any]) -> None:
    """A start nobody waits for: its failure is already the instance's "error" state."""
    try:
        await start
    except CommandError:
        pass
