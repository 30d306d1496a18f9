"""SimServer: one simulated vLLM server on an aiohttp runner, in this process."""

from __future__ import annotations

import asyncio
import os
from types import TracebackType

from aiohttp import web
from aiohttp.typedefs import Handler

from mvtui.openai_errors import error_response
from mvtui.sim.admin import AdminRoutes
from mvtui.sim.config import SimConfig
from mvtui.sim.generation import GenerationRoutes
from mvtui.sim.metrics import SimCollector, build_registry
from mvtui.sim.pooling import PoolingRoutes
from mvtui.sim.runtime import ApiError, Runtime
from mvtui.sim.state import SimStats

SHUTDOWN_TIMEOUT_S = 0.5
MAX_BODY_BYTES = 64 * 1024 * 1024
LISTEN_BACKLOG = 2048
EXIT_FAULT_STATUS = 1


class SimServer:
    """`async with SimServer(SimConfig(port=0)) as sim:` then talk to `sim.url`."""

    def __init__(self, config: SimConfig, *, dev_mode: bool | None = None, hard_exit: bool = False) -> None:
        """`hard_exit`: the exit fault ends the whole process (os._exit), as for `mvtui sim`."""
        self.config = config
        self._dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE") == "1" if dev_mode is None else dev_mode
        self._hard_exit = hard_exit
        self._runtime = Runtime.create(config)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self.crashed = False
        self._crash_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not listening yet")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> SimStats:
        return self._runtime.stats()

    async def start(self) -> None:
        """Bind and serve; with startup_ms, nothing listens until that delay has passed."""
        if self.config.startup_ms:
            await asyncio.sleep(self.config.startup_ms / 1000.0)
        runner = web.AppRunner(self._build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        self._runtime.engine.start()

    async def stop(self) -> None:
        """Stop listening, abort what is in flight, close connections."""
        runner, self._runner = self._runner, None
        await self._runtime.engine.stop()
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        registry = build_registry(SimCollector(self.config, self._runtime.metrics, self._runtime.live_gauges))
        AdminRoutes(self._runtime, registry, self._dev_mode, self._exit_fault).register(app.router)
        GenerationRoutes(self._runtime).register(app.router)
        PoolingRoutes(self._runtime).register(app.router)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Like vLLM, the API key guards the /v1 routes only.
        key = self.config.api_key
        if key is not None and request.path.startswith("/v1") and request.headers.get("Authorization") != f"Bearer {key}":
            return error_response(401, "Unauthorized")
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)  # FastAPI's body
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)

    def _exit_fault(self) -> None:
        if self._hard_exit:
            os._exit(EXIT_FAULT_STATUS)
        self._crash_task = asyncio.get_running_loop().create_task(self._crash())

    async def _crash(self) -> None:
        """Die the way a killed process does: sockets gone, no goodbyes."""
        self.crashed = True
        runner = self._runner
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:
            for connection in runner.server.connections:
                if connection.transport is not None:
                    connection.transport.abort()
        await self.stop()
