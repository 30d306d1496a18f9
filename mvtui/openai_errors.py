"""OpenAI-shaped error bodies, shared by the router and the simulator."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "BadRequestError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The `{"error": {...}}` object vLLM and OpenAI answer with."""
    kind = _TYPE_BY_STATUS.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": code if code is not None else status}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(status, message, param=param, code=code), status=status, headers=headers)


def sse_error_event(status: int, message: str) -> bytes:
    """An error sent inside an SSE stream once bytes have already reached the client."""
    return b"data: " + json.dumps(error_body(status, message)).encode() + b"\n\n"
