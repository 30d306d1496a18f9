"""Direct access to one server through the admin API (`/proxy/{server}/{path}`), e.g. to
read its own /metrics: no routing and no retries, but the router's header rules, and never
a generation request to a server that sleeps."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from mvtui.cluster.state import Server
from mvtui.errors import CONNECTION_ERRORS, CommandError, describe_error
from mvtui.openai_errors import error_response
from mvtui.router.headers import forward_headers, response_headers
from mvtui.router.proxy import GENERATION_PATHS

TIMEOUT_S = 600.0


class Passthrough:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def relay(self, request: web.Request, server: Server, path: str) -> web.StreamResponse:
        if path in GENERATION_PATHS and (server.asleep or server.sleep_pending):
            raise CommandError(f"{server.name} is {server.state}: wake it before sending it requests")
        target = server.url + path + (f"?{request.query_string}" if request.query_string else "")
        headers = forward_headers(request.headers, server.config.api_key, strip_auth=True)
        try:
            upstream = await self.session.request(
                request.method, target, data=await request.read(), headers=headers,
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S), allow_redirects=False,
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
