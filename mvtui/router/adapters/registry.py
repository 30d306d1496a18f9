"""Which adapters the router serves: the built-in ones and those installed packages declare in
the `mvtui.adapters` entry-point group, e.g. in a package's pyproject.toml:

    [project.entry-points."mvtui.adapters"]
    myproto = "my_package.adapter:MyAdapter"

The entry point names an adapter (an object with `name` and `routes(door)`) or a class or
function that makes one without arguments. One that fails to load, or whose route is served
already (by the router or an adapter before it), is left out with a warning: a broken
plugin never keeps the router from starting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from aiohttp import web

from mvtui.router.adapters.base import ENTRY_POINT_GROUP, Adapter, FrontDoorClient
from mvtui.router.adapters.generate import GenerateAdapter
from mvtui.router.adapters.ollama import OllamaAdapter

log = logging.getLogger(__name__)

BUILT_IN: tuple[Callable[[], Adapter], ...] = (GenerateAdapter, OllamaAdapter)


def installed(found: Iterable[EntryPoint] | None = None) -> list[Adapter]:
    """The adapters of the `mvtui.adapters` entry points (`found`: instead of the installed ones)."""
    adapters = []
    for point in entry_points(group=ENTRY_POINT_GROUP) if found is None else found:
        try:
            adapters.append(as_adapter(point.load()))
        except Exception as error:  # a plugin's bug: logged, not fatal
            log.warning("adapter %s (%s) not loaded: %s", point.name, point.value, error)
    return adapters


def as_adapter(loaded: Any) -> Adapter:
    adapter = loaded if callable(getattr(loaded, "routes", None)) and not isinstance(loaded, type) else loaded()
    if not isinstance(getattr(adapter, "name", None), str) or not callable(getattr(adapter, "routes", None)):
        raise TypeError("an adapter needs a `name` and a `routes(door)` method")
    return adapter  # type: ignore[no-any-return]


def all_adapters(found: Iterable[EntryPoint] | None = None) -> list[Adapter]:
    return [*(make() for make in BUILT_IN), *installed(found)]


def adapter_routes(door: FrontDoorClient, served: Iterable[web.RouteDef], found: Iterable[EntryPoint] | None = None) -> list[web.RouteDef]:
    """Every adapter's routes, without those whose method and path `served` (or an adapter
    listed before) has already."""
    taken = {key for route in served for key in keys(route)}
    routes: list[web.RouteDef] = []
    for adapter in all_adapters(found):
        for route in routes_of(adapter, door):
            if keys(route) & taken:
                log.warning("adapter %s: %s %s is served already; that route is left out", adapter.name, route.method, route.path)
                continue
            taken |= keys(route)
            routes.append(route)
    return routes


def keys(route: web.RouteDef) -> set[tuple[str, str]]:
    """The methods and path a route takes (a GET takes HEAD too, unless told not to)."""
    head = route.method == "GET" and route.kwargs.get("allow_head", True)
    return {(route.method, route.path), *([("HEAD", route.path)] if head else [])}


def routes_of(adapter: Adapter, door: FrontDoorClient) -> list[web.RouteDef]:
    try:
        routes = list(adapter.routes(door))
    except Exception as error:
        log.warning("adapter %s left out: its routes() failed: %s", adapter.name, error)
        return []
    bad = [route for route in routes if not isinstance(route, web.RouteDef)]
    if bad:
        log.warning("adapter %s left out: routes() must return aiohttp RouteDefs (web.get, web.post...), not %r", adapter.name, bad[0])
        return []
    return routes
