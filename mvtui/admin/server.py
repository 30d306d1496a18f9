"""The admin API's site: its own aiohttp server, on loopback unless configured, behind a
token. While mvtui runs, its admin file (`running.AdminFile`, one per mvtui, locked for the
process's life) says where the API is and holds the token, so the CLI on the same machine
finds this mvtui and no other. The endpoints are in `admin.api`.

When the configured port is taken (another mvtui on this machine, say) the API listens on a
free port instead and the admin file says which; when it cannot listen at all, mvtui runs
without it, `problem` says why, and the admin file says that the API is off.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from mvtui import __version__
from mvtui.admin.api import AdminApi, BadRequest, NotFound, Spawn
from mvtui.admin.passthrough import Passthrough
from mvtui.admin.running import AdminFile, running_mvtuis
from mvtui.config.schema import AdminConfig
from mvtui.control.operator import Operator
from mvtui.errors import CommandError
from mvtui.openai_errors import error_response
from mvtui.paths import AppPaths

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SHUTDOWN_TIMEOUT_S = 1.0
MAX_BODY_BYTES = 1024 * 1024  # admin requests are small JSON objects
DISABLED = "[admin] enabled = false"


class AdminServer:
    """`await start()` binds and writes the admin file; `await stop()` undoes both.

    After `start()`: `url` is where the API listens (None when it does not); `problem` says
    why it could not start (None when it runs, or is turned off in the config); `notice`
    says that it listens elsewhere than configured, and why."""

    def __init__(
        self,
        operator: Operator,
        settings: AdminConfig,
        paths: AppPaths,
        session: aiohttp.ClientSession,
        *,
        spawn: Spawn,
        router_url: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.router_url = router_url
        self.operator = operator
        self.api = AdminApi(operator, paths, Passthrough(session), spawn, router_url)
        self.token = settings.token or secrets.token_urlsafe(24)
        self.url: str | None = None
        self.problem: str | None = None
        self.notice: str | None = None
        self.file = AdminFile(paths.admin_dir)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if self.settings.enabled:
            await self._listen()
        try:
            await asyncio.to_thread(self.file.publish, self._details())
        except OSError as error:  # the API still works, for callers that know the token
            log.error("cannot write the admin file %s: %s; the CLI will not find this mvtui", self.file.path, error)
            return
        if self.url is not None:
            log.info("admin API on %s (address and token in %s)", self.url, self.file.path)

    async def _listen(self) -> None:
        host, port = self.settings.host, self.settings.port
        try:
            self._runner = await self._serve_on(port)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or port == 0:
                self._failed(port, error)
                return
            holder = await asyncio.to_thread(self._admin_port_holder, port)
            try:
                self._runner = await self._serve_on(0)
            except OSError as second:
                self._failed(0, second)
                return
            self.notice = f"admin port {port} is taken{holder}; the admin API listens on port {self._runner.addresses[0][1]} instead"
            log.warning("%s (the CLI finds it through the admin file)", self.notice)
        bound = self._runner.addresses[0][1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        self.url = self.api.admin_url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{bound}"

    async def _serve_on(self, port: int) -> web.AppRunner:
        app = web.Application(middlewares=[self._authorize], client_max_size=MAX_BODY_BYTES)
        app.add_routes(self.api.routes())
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.settings.host, port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    def _failed(self, port: int, error: OSError) -> None:
        reason = os.strerror(error.errno) if error.errno else str(error)
        self.problem = f"cannot listen on {_host_port(self.settings.host, port)}: {reason.lower()}"
        log.error("admin API off: %s (the router serves; set [admin] host and port)", self.problem)

    def _admin_port_holder(self, port: int) -> str:
        """` by mvtui PID 1234` when another mvtui's admin API is there."""
        for other in running_mvtuis(self.paths.admin_dir):
            if other.pid != os.getpid() and other.admin_port == port:
                return f" by mvtui PID {other.pid}"
        return ""

    def _details(self) -> dict[str, Any]:
        path = self.operator.live.path
        details: dict[str, Any] = {"pid": os.getpid(), "router_url": self.router_url(), "url": self.url, "version": __version__}
        details["config_path"] = str(path) if path else None
        if self.url is not None:
            details["token"] = self.token
        else:
            details["admin_off"] = self.problem or DISABLED
        return details

    async def stop(self) -> None:
        await asyncio.to_thread(self.file.withdraw)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return error_response(401, "The admin API needs 'Authorization: Bearer TOKEN' (see the admin file)", code="invalid_token")
        try:
            return await handler(request)
        except NotFound as error:
            return error_response(404, str(error), code="not_found")
        except CommandError as error:
            return error_response(409, str(error))
        except BadRequest as error:
            return error_response(400, str(error))


def _host_port(host: str, port: int) -> str:
    """`127.0.0.1:8889`, `[::1]:8889`."""
    shown = host or "0.0.0.0"
    return f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
