"""The OpenAI routes without their `/v1` prefix, as the vLLM serving framework serves them
(`/chat/completions`, `/completions`, and `/models` for clients whose base URL has no `/v1`).

These are the proxy's own handlers, not an adapter round trip: the request is handed on as
the `/v1` request it stands for (the proxy forwards the path it is given, and vLLM serves
only the `/v1` one), so it is routed, counted and logged as that request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNVERSIONED = {"/chat/completions": "/v1/chat/completions", "/completions": "/v1/completions"}


def unversioned_routes(generation: Handler, list_models: Handler) -> list[web.RouteDef]:
    """`generation`: the proxy's handler of the generation routes; `list_models`: its /v1/models."""
    routes = [web.post(path, as_path(target, generation)) for path, target in UNVERSIONED.items()]
    return [*routes, web.get("/models", list_models)]


def as_path(target: str, handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await handler(request.clone(rel_url=request.rel_url.with_path(target)))

    return handle
