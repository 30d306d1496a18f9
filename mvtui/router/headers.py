"""Headers between client, router and upstream, and the client's API key.

The router is a proxy: hop-by-hop headers stay on their own hop, the upstream is asked for
an uncompressed answer, and a server's own key replaces whatever the client sent.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
    }
)


def forward_headers(headers: Mapping[str, str], server_key: str | None, strip_auth: bool) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or (lower == "authorization" and (server_key or strip_auth)):
            continue
        out.add(name, value)
    if server_key:
        out["Authorization"] = f"Bearer {server_key}"
    out["Accept-Encoding"] = "identity"
    return out


def response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in HOP_BY_HOP)


def bearer_token(request: web.Request) -> str | None:
    """The client's key: `Authorization: Bearer KEY`, else `x-api-key: KEY`."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("x-api-key")


def key_matches(given: str | None, keys: Iterable[str]) -> bool:
    """True when `given` is one of `keys`, compared in constant time against every key (the
    time taken says neither which key nor how much of one matched)."""
    candidate = _bytes(given or "")
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, _bytes(key))
    return found and bool(given)  # no key sent (or an empty one) never matches


def authorized(request: web.Request, keys: Iterable[str]) -> bool:
    """No keys configured: everyone; otherwise the request must carry one of them."""
    keys = tuple(keys)
    return not keys or key_matches(bearer_token(request), keys)


def _bytes(text: str) -> bytes:
    # header values may carry undecodable bytes as surrogates: compare them as sent
    return text.encode("utf-8", "surrogateescape")
