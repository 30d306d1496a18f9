"""The admin HTTP API: a separate aiohttp site, on loopback unless configured, behind a token.

It lists servers and instances and runs the operator's commands (mvtui.control.commands) for the
`mvtui ps/start/stop/sleep/wake/drain/undrain` CLI. Its address and token are written to
AppPaths.admin_file (mode 0600) while it runs, so the CLI on the same machine finds it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import aiohttp
import tomlkit
from aiohttp import web

from mvtui import __version__
from mvtui.cluster.state import Server
from mvtui.config.schema import InstanceConfig, parse_config
from mvtui.control import commands, config_commands
from mvtui.errors import CONNECTION_ERRORS, CommandError, ConfigError, describe_error
from mvtui.instances.manager import Instance, InstanceManager
from mvtui.openai_errors import error_response
from mvtui.router.endpoints import server_status
from mvtui.router.proxy import GENERATION_PATHS, forward_headers, response_headers

if TYPE_CHECKING:
    from mvtui.runtime.wiring import Services

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SHUTDOWN_TIMEOUT_S = 1.0
PROXY_TIMEOUT_S = 600.0


class AdminServer:
    """`await start()` binds and writes the admin file; `await stop()` undoes both."""

    def __init__(self, services: "Services") -> None:
        self.services = services
        self.config = services.config.admin
        self.token = self.config.token or secrets.token_urlsafe(24)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._started = time.time()

    @property
    def cluster(self):  # type: ignore[no-untyped-def]
        return self.services.cluster

    @property
    def instances(self) -> InstanceManager:
        manager = self.services.instances
        assert manager is not None
        return manager

    async def start(self) -> None:
        if not self.config.enabled:
            return
        app = web.Application(middlewares=[self._authorize], client_max_size=64 * 1024 * 1024)
        app.add_routes(self.routes())
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            log.error("admin API not started: cannot listen on %s:%s: %s", self.config.host, self.config.port, error.strerror or error)
            return
        self._runner = runner
        port = runner.addresses[0][1]
        host = "127.0.0.1" if self.config.host in ("", "0.0.0.0", "::") else self.config.host
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        await asyncio.to_thread(self._write_admin_file)
        log.info("admin API on %s (address and token in %s)", self.url, self.services.paths.admin_file)

    async def stop(self) -> None:
        if self._runner is None:
            return
        await asyncio.to_thread(self._remove_admin_file)
        await self._runner.cleanup()
        self._runner = None

    def _write_admin_file(self) -> None:
        details = {
            "url": self.url,
            "token": self.token,
            "pid": os.getpid(),
            "router_url": self.services.router_url,
            "version": __version__,
        }
        write_private(self.services.paths.admin_file, json.dumps(details, indent=2) + "\n")

    def _remove_admin_file(self) -> None:
        path = self.services.paths.admin_file
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():  # another mvtui may own it now
                path.unlink()
        except (OSError, ValueError):
            pass

    # --- HTTP ----------------------------------------------------------------------------

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
            web.post("/servers/{name}/sleep", self.sleep),
            web.post("/servers/{name}/wake", self.wake),
            web.get("/instances", self.list_instances),
            web.post("/instances", self.create_instance),
            web.get("/instances/{id}", self.get_instance),
            web.delete("/instances/{id}", self.delete_instance),
            web.post("/instances/{id}/start", self.start_instance),
            web.post("/instances/{id}/stop", self.stop_instance),
            web.route("*", "/proxy/{id}/{path:.*}", self.proxy),
        ]

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return error_response(401, "The admin API needs 'Authorization: Bearer TOKEN' (see the admin file)", code="invalid_token")
        try:
            return await handler(request)
        except CommandError as error:
            return error_response(409, str(error))
        except _NotFound as error:
            return error_response(404, str(error), code="not_found")
        except _BadRequest as error:
            return error_response(400, str(error))

    async def info(self, request: web.Request) -> web.Response:
        services = self.services
        paths = services.paths
        gpus = await self._gpus()
        return web.json_response(
            {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self._started, 1),
                "router_url": services.router_url,
                "admin_url": self.url,
                "config_path": str(services.config_path) if services.config_path else None,
                "policy": services.config.router.policy,
                "servers": len(self.cluster),
                "instances": len(self.instances.instances),
                "models": self.cluster.models(),
                "in_flight": self.cluster.summary().in_flight,
                "log_dir": str(paths.log_dir),
                "instance_logs": str(paths.instance_logs),
                "gpus": gpus,
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
                {"index": gpu.index, "name": gpu.name, "memory_used": gpu.memory_used, "memory_total": gpu.memory_total}
                for gpu in snapshot.gpus
            ]
        }

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
        }

    async def list_servers(self, request: web.Request) -> web.Response:
        return web.json_response({"servers": [self.server_info(server) for server in self.cluster]})

    def _server(self, request: web.Request) -> Server:
        key = request.match_info["name"]
        server = self.cluster.find(key)
        if server is None:
            names = ", ".join(server.name for server in self.cluster) or "none"
            raise _NotFound(f"no server named {key!r}; servers: {names}")
        return server

    async def get_server(self, request: web.Request) -> web.Response:
        return web.json_response(self.server_info(self._server(request)))

    async def drain(self, request: web.Request) -> web.Response:
        return web.json_response(self.server_info(commands.drain(self.cluster, self._server(request).url)))

    async def undrain(self, request: web.Request) -> web.Response:
        return web.json_response(self.server_info(commands.undrain(self.cluster, self._server(request).url)))

    async def sleep(self, request: web.Request) -> web.Response:
        server = self._server(request)
        level = await _sleep_level(request)
        await commands.sleep(self.services.control, server.url, level)  # type: ignore[arg-type]
        return web.json_response(self.server_info(server))

    async def wake(self, request: web.Request) -> web.Response:
        server = self._server(request)
        await commands.wake(self.services.control, server.url)  # type: ignore[arg-type]
        return web.json_response(self.server_info(server))

    # --- config edits (written back to the config file) ------------------------------------

    async def add_server(self, request: web.Request) -> web.Response:
        """`{"url": U, "max_concurrent_requests": N, "name": ..., "api_key": ..., "models": [...]}`"""
        body = await _json_object(request)
        url = body.pop("url", None)
        if not isinstance(url, str):
            raise _BadRequest("`url` (a string) is required")
        unknown = set(body) - {"max_concurrent_requests", "name", "api_key", "models"}
        if unknown:
            raise _BadRequest(f"unknown keys: {', '.join(sorted(unknown))}")
        try:
            change = await config_commands.add_server(self.services, url, **body)
        except TypeError as error:
            raise _BadRequest(str(error)) from None
        return web.json_response(_change_info(change), status=201)

    async def change_server(self, request: web.Request) -> web.Response:
        """`{"max_concurrent_requests": N}` and/or `{"drain": true|false}` (kept across restarts)."""
        server = self._server(request)
        body = await _json_object(request)
        unknown = set(body) - {"max_concurrent_requests", "drain"}
        if unknown or not body:
            raise _BadRequest("send max_concurrent_requests and/or drain")
        if "drain" in body and not isinstance(body["drain"], bool):
            raise _BadRequest("`drain` must be true or false")
        changes = []
        if "max_concurrent_requests" in body:
            changes.append(await config_commands.set_capacity(self.services, server.url, body["max_concurrent_requests"]))
        if "drain" in body:
            changes.append(await config_commands.set_drain(self.services, server.url, body["drain"]))
        return web.json_response({**self.server_info(server), "changes": [_change_info(change) for change in changes]})

    async def remove_server(self, request: web.Request) -> web.Response:
        change = await config_commands.remove_server(self.services, self._server(request).url)
        return web.json_response(_change_info(change))

    # --- instances -----------------------------------------------------------------------

    def _instance(self, request: web.Request) -> Instance:
        key = request.match_info["id"]
        try:
            return self.instances.find(key)
        except CommandError as error:
            raise _NotFound(str(error)) from None

    def instance_info(self, instance: Instance) -> dict[str, Any]:
        return instance.info(self.instances.clock)

    async def list_instances(self, request: web.Request) -> web.Response:
        return web.json_response({"instances": [self.instance_info(instance) for instance in self.instances]})

    async def get_instance(self, request: web.Request) -> web.Response:
        return web.json_response(self.instance_info(self._instance(request)))

    async def create_instance(self, request: web.Request) -> web.Response:
        """`{"model": M, "params": {...InstanceConfig keys}, "wait": false}`: start the instance
        for M (creating it when none matches); 202 at once, or 200 once running with wait."""
        body = await _json_object(request)
        model, params = body.get("model"), body.get("params") or {}
        if not isinstance(model, str) or not model:
            raise _BadRequest("`model` (a string) is required")
        if not isinstance(params, dict):
            raise _BadRequest("`params` must be an object of [[instances]] keys")
        instance = self._existing(model, params) or self.instances.add(_instance_config(model, params), origin="api")
        task = commands.start_instance(self.instances, instance.label)
        if body.get("wait"):
            await task
            return web.json_response(self.instance_info(instance))
        self.services.spawn(_quietly(task), f"admin start {instance.label}")
        await asyncio.sleep(0)  # let the start begin, so the answer already reads "starting"
        return web.json_response(self.instance_info(instance), status=202)

    def _existing(self, model: str, params: dict[str, Any]) -> Instance | None:
        key = params.get("name") or params.get("served_model_name") or model
        try:
            instance = self.instances.find(key)
        except CommandError:
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
            await commands.stop_instance(self.instances, instance.label)
        return web.json_response(self.instance_info(instance))

    async def start_instance(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        await commands.start_instance(self.instances, instance.label)
        return web.json_response(self.instance_info(instance))

    async def stop_instance(self, request: web.Request) -> web.Response:
        instance = self._instance(request)
        await commands.stop_instance(self.instances, instance.label)
        return web.json_response(self.instance_info(instance))

    # --- direct access --------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Any request to one server or instance, bypassing the router (e.g. its /metrics)."""
        key = request.match_info["id"]
        server = self.cluster.find(key)
        if server is None:
            try:
                server = self.instances.find(key).server
            except CommandError as error:
                raise _NotFound(str(error)) from None
        path = "/" + request.match_info["path"]
        if path in GENERATION_PATHS and (server.asleep or server.sleep_pending):
            raise CommandError(f"{server.name} is {server.state}: wake it before sending it requests")
        target = server.url + path + (f"?{request.query_string}" if request.query_string else "")
        headers = forward_headers(request.headers, server.config.api_key, strip_auth=True)
        session = self.services.session
        assert session is not None
        try:
            upstream = await session.request(
                request.method, target, data=await request.read(), headers=headers,
                timeout=aiohttp.ClientTimeout(total=PROXY_TIMEOUT_S),
            )  # fmt: skip
        except CONNECTION_ERRORS as error:
            return error_response(502, f"{server.name} did not answer: {describe_error(error)}")
        try:
            response = web.StreamResponse(status=upstream.status, headers=response_headers(upstream.headers))
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.close()


def _change_info(change: config_commands.ConfigChange) -> dict[str, Any]:
    return {"url": change.url, "name": change.name, "message": change.message, "saved_to": str(change.saved_to) if change.saved_to else None}


class _NotFound(Exception):
    pass


class _BadRequest(Exception):
    pass


async def _json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as error:
        raise _BadRequest(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


async def _sleep_level(request: web.Request) -> int:
    raw: Any = request.query.get("level")
    if raw is None:
        raw = (await _json_object(request)).get("level", 1)
    try:
        level = int(raw)
    except (TypeError, ValueError):
        raise _BadRequest(f"level must be 1 or 2, got {raw!r}") from None
    if level not in (1, 2):
        raise _BadRequest(f"level must be 1 or 2, got {level}")
    return level


def _instance_config(model: str, params: dict[str, Any]) -> InstanceConfig:
    """Validated exactly like an [[instances]] table of the config file."""
    document = tomlkit.document()
    table = tomlkit.aot()
    table.append(tomlkit.item({"model": model, **params}))
    document["instances"] = table
    try:
        return parse_config(tomlkit.dumps(document)).instances[0]
    except ConfigError as error:
        raise _BadRequest("; ".join(f"{problem.where}: {problem.message}" for problem in error.problems)) from None
    except (ValueError, TypeError) as error:
        raise _BadRequest(f"invalid params: {error}") from None


async def _quietly(start: Awaitable[Any]) -> None:
    """A start nobody waits for: its failure is already the instance's "error" state."""
    try:
        await start
    except CommandError:
        pass


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a token), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
