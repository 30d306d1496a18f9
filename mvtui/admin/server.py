"""The admin API's site: its own aiohttp server, on loopback unless configured, behind a
token. Its address and token are written to AppPaths.admin_file (mode 0600) while it runs,
so the CLI on the same machine finds it. The endpoints are in `admin.api`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

from mvtui import __version__
from mvtui.admin.api import AdminApi, BadRequest, NotFound, Spawn
from mvtui.admin.passthrough import Passthrough
from mvtui.config.schema import AdminConfig
from mvtui.control.operator import Operator
from mvtui.errors import CommandError
from mvtui.files import write_atomic
from mvtui.openai_errors import error_response
from mvtui.paths import AppPaths

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SHUTDOWN_TIMEOUT_S = 1.0
MAX_BODY_BYTES = 1024 * 1024  # admin requests are small JSON objects


class AdminServer:
    """`await start()` binds and writes the admin file; `await stop()` undoes both."""

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
        self.api = AdminApi(operator, paths, Passthrough(session), spawn, router_url)
        self.token = settings.token or secrets.token_urlsafe(24)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if not self.settings.enabled:
            return
        app = web.Application(middlewares=[self._authorize], client_max_size=MAX_BODY_BYTES)
        app.add_routes(self.api.routes())
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port, reuse_address=True)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            log.error("admin API not started: cannot listen on %s:%s: %s", self.settings.host, self.settings.port, error.strerror or error)
            return
        self._runner = runner
        port = runner.addresses[0][1]
        host = "127.0.0.1" if self.settings.host in ("", "0.0.0.0", "::") else self.settings.host
        self.url = self.api.admin_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        await asyncio.to_thread(self._write_admin_file)
        log.info("admin API on %s (address and token in %s)", self.url, self.paths.admin_file)

    async def stop(self) -> None:
        if self._runner is None:
            return
        await asyncio.to_thread(self._remove_admin_file)
        await self._runner.cleanup()
        self._runner = None

    def _write_admin_file(self) -> None:
        details = {"url": self.url, "token": self.token, "pid": os.getpid(), "router_url": self.router_url(), "version": __version__}
        write_atomic(self.paths.admin_file, json.dumps(details, indent=2) + "\n", mode=0o600)

    def _remove_admin_file(self) -> None:
        path = self.paths.admin_file
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():  # another mvtui may own it now
                path.unlink()
        except (OSError, ValueError):
            pass

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
