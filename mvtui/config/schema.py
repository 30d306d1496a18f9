"""The TOML config: parsed with tomlkit into frozen dataclasses, every problem listed.

mvllm's `servers.toml` (`[servers] servers = [...]` and `[config]`) loads unchanged; mvtui's
own settings sit beside it in `[router]`, `[admin]`, `[ui]` and `[[instances]]`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import tomlkit
from tomlkit.exceptions import ParseError, TOMLKitError

from mvtui import keymap
from mvtui.errors import ConfigError, Problem
from mvtui.routing.policies import installed_policies

IDLE_ACTIONS = ("sleep1", "sleep2", "stop")
STATUS_ENDPOINTS = ("/health", "/load-stats", "/metrics")


@dataclass(frozen=True)
class ServerConfig:
    url: str
    max_concurrent_requests: int = 8
    name: str = ""
    api_key: str | None = None
    models: tuple[str, ...] = ()
    drain: bool = False
    # Not a key: True when the entry states max_concurrent_requests. Then the router's queue
    # holds requests at it; otherwise the server's slots are learned from its /metrics.
    capacity_set: bool = field(default=False, compare=False, metadata={"derived": True})

    @property
    def label(self) -> str:
        return self.name or server_name_from_url(self.url)

    @property
    def display_url(self) -> str:
        """The URL without the credentials it may carry: what people and logs see."""
        return redact_url(self.url)


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 8888
    api_keys: tuple[str, ...] = ()
    policy: str = "fastest"
    # turns of one conversation go to one server (its prefix cache) while it is within
    # affinity_bound times its share of the model's load (README "Routing")
    affinity: bool = True
    affinity_bound: float = 1.25
    # status endpoints answered without a key when api_keys is set (README "Security")
    open_endpoints: tuple[str, ...] = ("/health",)
    # upstream 5xx bodies and failure messages naming servers become a generic error
    scrub_upstream_errors: bool = False
    # requests wait in the router, per model, when every server for it is full (README "The router")
    queue: bool = True
    queue_size: int = 1024  # waiting requests per model; one more gets 429
    queue_timeout: float = 120.0  # seconds a request may wait; then 408
    # a server that fails this many tries in a row gets no requests for breaker_cooldown
    # seconds, then one probe; each failed probe doubles the cool-down, up to the max
    breaker: bool = True
    breaker_failures: int = 5
    breaker_cooldown: float = 5.0
    breaker_max_cooldown: float = 60.0
    # retries (extra tries on another server) allowed per request over the last 10 s
    retry_budget: float = 0.2


@dataclass(frozen=True)
class TimingConfig:
    """mvllm's `[config]` table, with mvtui's own knobs beside its three."""

    health_check_interval: float = 10.0
    request_timeout: float = 120.0
    max_retries: int = 3
    metrics_interval: float = 0.5
    fail_threshold: int = 3
    recover_threshold: int = 2
    wake_timeout: float = 120.0
    drain_timeout: float = 60.0
    shutdown_timeout: float = 10.0
    # the longest wait for a non-streamed answer while its server stays healthy; 0: no limit
    generation_timeout: float = 1800.0


@dataclass(frozen=True)
class LimitsConfig:
    """`[limits]`: what one client may hold of the router's front door."""

    keepalive_timeout: float = 75.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_body_mb: float = 32.0
    answer_buffer_mb: float = 1.0
    max_connections: int = 4096
    # the longest a request may spend in the router, queue and upstream together; 0: no limit
    max_request_time: float = 0.0


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 8889
    token: str = ""
    enabled: bool = True


@dataclass(frozen=True)
class UiConfig:
    theme: str = ""
    refresh_per_s: float = 4.0
    keys: keymap.UserKeys = ()  # [ui.keys]: (action, keys) where they differ from the defaults


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: several mvtui sharing operator state through Redis (README "Running
    several routers"). Without `redis_url` mvtui works alone."""

    redis_url: str = ""
    name: str = ""  # this replica's name among the others; empty: hostname:port
    lease_timeout: float = 10.0  # seconds a sleep or wake lease outlives a replica that died holding it


@dataclass(frozen=True)
class InstanceConfig:
    model: str
    name: str = ""
    served_model_name: str = ""
    port: int = 0
    port_range: tuple[int, int] = (8100, 8199)
    devices: tuple[int, ...] = ()
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 0
    tensor_parallel_size: int = 1
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    auto_start: bool = True
    preload: bool = False
    idle_timeout: float = 0.0
    idle_action: str = "sleep1"
    startup_timeout: float = 600.0
    max_concurrent_requests: int = 8

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def label(self) -> str:
        return self.name or self.served_name


@dataclass(frozen=True)
class Config:
    router: RouterConfig = field(default_factory=RouterConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    servers: tuple[ServerConfig, ...] = ()
    instances: tuple[InstanceConfig, ...] = ()


_USERINFO = re.compile(r"(?<=//)[^/?#]*@")  # up to the last @ of the authority
DEFAULT_PORTS = {"http": 80, "https": 443}


def redact_url(url: str) -> str:
    """`url` without `user:password@`; works on text that does not parse as a URL too."""
    return _USERINFO.sub("", url, count=1)


def server_name_from_url(url: str) -> str:
    """host[:port][/path], never the credentials."""
    shown = redact_url(url).strip()
    rest = shown.split("//", 1)[1] if "//" in shown else shown
    return rest.rstrip("/") or shown


def normalize_url(url: str) -> str:
    """One spelling per backend: scheme and host in lower case, no default port, no trailing
    slash. Text that is not a URL comes back stripped (the checks report it)."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return text.rstrip("/")
    if not parts.hostname:
        return text.rstrip("/")
    scheme = parts.scheme.lower()
    netloc = _netloc(parts, None if port == DEFAULT_PORTS.get(scheme) else port)
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, parts.fragment))


def _netloc(parts: SplitResult, port: int | None) -> str:
    userinfo, _, _ = parts.netloc.rpartition("@")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return (f"{userinfo}@" if userinfo else "") + host + (f":{port}" if port is not None else "")


def url_has_credentials(url: str) -> bool:
    return redact_url(url) != url


# --- validation -------------------------------------------------------------------------

Check = Callable[[Any], str | None]


def _number(minimum: float = 0, *, exclusive: bool = False, integer: bool = False, maximum: float | None = None) -> Check:
    def check(value: Any) -> str | None:
        allowed = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            return f"expected {'an integer' if integer else 'a number'}, got {_describe(value)}"
        if not math.isfinite(value):
            return f"expected a finite number, got {value}"
        too_small = value <= minimum if exclusive else value < minimum
        if too_small:
            return f"must be {'greater than' if exclusive else 'at least'} {minimum}, got {value}"
        if maximum is not None and value > maximum:
            return f"must be at most {maximum}, got {value}"
        return None

    return check


def _string(choices: tuple[str, ...] = (), *, required: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"expected a string, got {_describe(value)}"
        if required and not value.strip():
            return "must not be empty"
        if choices and value not in choices:
            return f"must be one of {', '.join(choices)}; got {value!r}"
        return None

    return check


def _policy(value: Any) -> str | None:
    """A built-in routing policy or one an installed package adds (`mvtui.policies`)."""
    if not isinstance(value, str):
        return f"expected a string, got {_describe(value)}"
    names = installed_policies()
    return None if value in names else f"must be one of {', '.join(names)}; got {value!r}"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_describe(value)}"


def _string_list(value: Any) -> str | None:
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"expected a list of strings, got {_describe(value)}"
    return None


def _names(value: Any) -> str | None:
    """A list of non-empty strings (API keys, model names): an empty one would match anything."""
    problem = _string_list(value)
    if problem is None and not all(v.strip() for v in value):
        return "expected a list of non-empty strings, got an empty one in it"
    return problem


def _subset(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        problem = _string_list(value)
        if problem is None and not set(value) <= set(choices):
            return f"each must be one of {', '.join(choices)}; got {', '.join(sorted(set(value) - set(choices)))}"
        return problem

    return check


def _port(value: Any) -> str | None:
    problem = _number(0, integer=True)(value)
    if problem is None and value > 65535:
        return f"must be a port number (0-65535), got {value}"
    return problem


def _url(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a URL string, got {_describe(value)}"
    text = value.strip()
    shown = repr(redact_url(text))
    if any(char.isspace() or not char.isprintable() for char in text):
        return f"a URL cannot contain spaces or control characters: {shown}"
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises for a port that is not a number within 0-65535
    except ValueError as error:
        return f"not a valid URL ({error}): {shown}"
    if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname:
        return f"expected an http:// or https:// URL with a host, got {shown}"
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        return f"a server URL cannot have a query or a fragment: {shown}"
    return None


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(value: Any) -> str | None:
    """Empty (alone), or redis://, rediss:// or unix:// as the redis package reads them."""
    if not isinstance(value, str):
        return f"expected a string such as 'redis://host:6379/0', got {_describe(value)}"
    if value and urlsplit(value).scheme not in REDIS_SCHEMES:
        return f"expected a redis://, rediss:// or unix:// URL, got {redact_url(value)!r}"
    return None


def _devices(value: Any) -> str | None:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
        ok = all(part.strip().isascii() and part.strip().isdigit() for part in value)
    else:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    return None if ok else f'expected GPU indices like [0, 1] or "0,1", got {_describe(value)}'


def _port_range(value: Any) -> str | None:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65535 for v in value)
        and value[0] <= value[1]
    )
    return None if ok else f"expected [first, last] ports, got {_describe(value)}"


def _string_table(value: Any) -> str | None:
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        return f"expected a table of strings, got {_describe(value)}"
    return None


def _table(value: Any) -> str | None:
    return None if isinstance(value, Mapping) else f"expected a table, got {_describe(value)}"


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


ROUTER_SCHEMA: dict[str, Check] = {
    "host": _string(),
    "port": _port,
    "api_keys": _names,
    "policy": _policy,
    "affinity": _boolean,
    "affinity_bound": _number(1),
    "open_endpoints": _subset(STATUS_ENDPOINTS),
    "scrub_upstream_errors": _boolean,
    "queue": _boolean,
    "queue_size": _number(0, integer=True),
    "queue_timeout": _number(0, exclusive=True),
    "breaker": _boolean,
    "breaker_failures": _number(1, integer=True),
    "breaker_cooldown": _number(0, exclusive=True),
    "breaker_max_cooldown": _number(0, exclusive=True),
    "retry_budget": _number(0),
}
LIMITS_SCHEMA: dict[str, Check] = {
    "keepalive_timeout": _number(0, exclusive=True),
    "header_timeout": _number(0, exclusive=True),
    "body_timeout": _number(0, exclusive=True),
    "max_body_mb": _number(0, exclusive=True),
    "answer_buffer_mb": _number(0),
    "max_connections": _number(1, integer=True),
    "max_request_time": _number(0),
}
TIMING_SCHEMA: dict[str, Check] = {
    "health_check_interval": _number(0, exclusive=True),
    "request_timeout": _number(0, exclusive=True),
    "max_retries": _number(0, integer=True),
    "metrics_interval": _number(0.05),
    "fail_threshold": _number(1, integer=True),
    "recover_threshold": _number(1, integer=True),
    "wake_timeout": _number(0, exclusive=True),
    "drain_timeout": _number(0),
    "shutdown_timeout": _number(0),
    "generation_timeout": _number(0),
}
# mvllm's other `[config]` keys: accepted so its servers.toml loads unchanged, checked for
# type, and not used (mvtui's health hysteresis and reload-on-change replace them).
MVLLM_TIMING_KEYS: dict[str, Check] = {
    "config_reload_interval": _number(0),
    "health_check_timeout": _number(0),
    "failure_threshold": _number(1, integer=True),
    "auto_recovery_threshold": _number(0),
    "enable_active_health_check": _boolean,
    "health_check_max_response_time": _number(0),
    "health_check_min_success_rate": _number(0),
    "health_check_window_size": _number(1, integer=True),
    "health_check_consecutive_failures": _number(1, integer=True),
}
ADMIN_SCHEMA: dict[str, Check] = {"host": _string(), "port": _port, "token": _string(), "enabled": _boolean}
UI_SCHEMA: dict[str, Check] = {"theme": _string(), "refresh_per_s": _number(0.2), "keys": _table}
CLUSTER_SCHEMA: dict[str, Check] = {"redis_url": _redis_url, "name": _string(), "lease_timeout": _number(0.5)}
SERVER_SCHEMA: dict[str, Check] = {
    "url": _url,
    "max_concurrent_requests": _number(1, integer=True),
    "name": _string(),
    "api_key": _string(),
    "models": _names,
    "drain": _boolean,
}
INSTANCE_SCHEMA: dict[str, Check] = {
    "model": _string(required=True),
    "name": _string(),
    "served_model_name": _string(),
    "port": _port,
    "port_range": _port_range,
    "devices": _devices,
    "gpu_memory_utilization": _number(0, exclusive=True, maximum=1),
    "max_model_len": _number(0, integer=True),
    "tensor_parallel_size": _number(1, integer=True),
    "extra_args": _string_list,
    "env": _string_table,
    "command": _string_list,
    "auto_start": _boolean,
    "preload": _boolean,
    "idle_timeout": _number(0),
    "idle_action": _string(IDLE_ACTIONS),
    "startup_timeout": _number(0, exclusive=True),
    "max_concurrent_requests": _number(1, integer=True),
}
TOP_LEVEL = ("servers", "config", "router", "limits", "admin", "ui", "cluster", "instances")


class _Collector:
    """Gathers problems with their place in the source text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.problems: list[Problem] = []

    def add(self, where: str, message: str, *, anchor: str | None = None, near: str | None = None) -> None:
        line, column = _locate(self.text, anchor or where.rsplit(".", 1)[-1], near)
        self.problems.append(Problem(where, message, line, column))

    def table(
        self,
        name: str,
        raw: Any,
        schema: Mapping[str, Check],
        *,
        near: str | None = None,
        ignored: Mapping[str, Check] | None = None,
    ) -> dict[str, Any]:
        """Validated plain values of one table; unknown keys get a did-you-mean. Keys in
        `ignored` are checked but left out of the result."""
        if not isinstance(raw, Mapping):
            self.add(name, f"expected a table, got {_describe(raw)}", anchor=name.split("[")[0])
            return {}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            check = schema.get(key) or (ignored or {}).get(key)
            if check is None:
                self.add(f"{name}.{key}", _unknown_key_message(key, schema), anchor=key, near=near)
                continue
            problem = check(value)
            if problem:
                self.add(f"{name}.{key}", problem, anchor=key, near=near)
            elif key in schema:
                values[key] = value
        return values


def _unknown_key_message(key: str, known: Mapping[str, Any] | tuple[str, ...]) -> str:
    guess = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else f"; known keys: {', '.join(known)}"
    return f"unknown key {key!r}{hint}"


def _locate(text: str, key: str, near: str | None = None) -> tuple[int | None, int | None]:
    """Line and column (1-based) of `key =` or `[key]`, searched after `near` if given."""
    start = 0
    if near:
        found = text.find(near)
        if found >= 0:
            start = text.rfind("\n", 0, found) + 1
    pattern = re.compile(rf"(?m)(^|[\s{{,\[.])(\"?{re.escape(key)}\"?)\s*(=|\])")
    match = pattern.search(text, start) or pattern.search(text)
    if not match:
        return None, None
    offset = match.start(2)
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


# --- building ---------------------------------------------------------------------------


def parse_config(text: str, path: Path | str | None = None) -> Config:
    """Parse and validate TOML text; raises ConfigError listing every problem."""
    try:
        document = tomlkit.parse(text)
    except ParseError as error:
        # tomlkit counts columns from 0; every other problem counts from 1
        raise ConfigError(path, [Problem("TOML", _parse_message(error), error.line, error.col + 1)]) from None
    except (TOMLKitError, RecursionError) as error:
        raise ConfigError(path, [Problem("TOML", str(error) or type(error).__name__)]) from None
    collector = _Collector(text)
    config = _build(document.unwrap(), collector)
    if collector.problems:
        raise ConfigError(path, sorted(collector.problems, key=_position))
    return config


def _position(problem: Problem) -> tuple[bool, int, int]:
    return problem.line is None, problem.line or 0, problem.column or 0


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(path, [Problem("file", f"cannot read it: {error.strerror or error}")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(path, [Problem("file", f"not UTF-8 text: {error.reason} at byte {error.start}")]) from None
    return parse_config(text, path)


def _parse_message(error: ParseError) -> str:
    message = str(error).split(" at line ")[0]
    message = message.replace("Unexpected character: '\\x00'", "unexpected end of file (an unclosed [ or {?)")
    return message.replace("Unexpected character: '\\n'", "unexpected end of line")


def _build(data: dict[str, Any], collector: _Collector) -> Config:
    for key in data:
        if key not in TOP_LEVEL:
            collector.add(key, _unknown_key_message(key, TOP_LEVEL), anchor=key)
    router = collector.table("router", data.get("router", {}), ROUTER_SCHEMA, near="[router]")
    timing = collector.table("config", data.get("config", {}), TIMING_SCHEMA, near="[config]", ignored=MVLLM_TIMING_KEYS)
    admin = collector.table("admin", data.get("admin", {}), ADMIN_SCHEMA, near="[admin]")
    ui = collector.table("ui", data.get("ui", {}), UI_SCHEMA, near="[ui]")
    cluster = collector.table("cluster", data.get("cluster", {}), CLUSTER_SCHEMA, near="[cluster]")
    limits = collector.table("limits", data.get("limits", {}), LIMITS_SCHEMA, near="[limits]")
    if "keys" in ui:
        ui["keys"] = _build_keys(ui["keys"], collector)
    if "api_keys" in router:
        router["api_keys"] = tuple(router["api_keys"])
    if "open_endpoints" in router:
        router["open_endpoints"] = tuple(router["open_endpoints"])
    _check_cooldowns(router, collector)
    servers = _build_servers(data.get("servers", {}), collector)
    instances = _build_instances(data.get("instances", []), collector)
    _check_names(servers, instances, collector)
    return Config(
        router=RouterConfig(**router),
        timing=TimingConfig(**timing),
        limits=LimitsConfig(**limits),
        admin=AdminConfig(**admin),
        ui=UiConfig(**ui),
        cluster=ClusterConfig(**cluster),
        servers=servers,
        instances=instances,
    )


def _build_keys(raw: Mapping[str, Any], collector: _Collector) -> keymap.UserKeys:
    """`[ui.keys]`: action = key or [keys], checked against the dashboard's keymap."""
    near = "[ui.keys]" if "[ui.keys]" in collector.text else "[ui]"
    for action, message in keymap.problems(raw):
        collector.add(f"ui.keys.{action}", message, anchor=action, near=near)
    return keymap.changes(raw)


def _build_servers(raw: Any, collector: _Collector) -> tuple[ServerConfig, ...]:
    entries = _server_entries(raw, collector)
    servers: list[ServerConfig] = []
    first_index: dict[str, int] = {}  # normalised URL -> the entry that listed it first
    for index, entry in enumerate(entries):
        server = _build_server(index, entry, collector, first_index)
        if server is not None:
            servers.append(server)
    return tuple(servers)


def _server_entries(raw: Any, collector: _Collector) -> list[Any]:
    if not isinstance(raw, Mapping):
        collector.add("servers", "expected a [servers] table with a `servers = [...]` list", anchor="servers")
        return []
    for key in raw:
        if key != "servers":
            collector.add(f"servers.{key}", _unknown_key_message(key, ("servers",)), anchor=key)
    entries = raw.get("servers", [])
    if not isinstance(entries, list):
        collector.add("servers.servers", "expected a list of { url = ..., max_concurrent_requests = ... }")
        return []
    return entries


def _build_server(index: int, entry: Any, collector: _Collector, first_index: dict[str, int]) -> ServerConfig | None:
    where = f"servers[{index}]"
    near = entry.get("url") if isinstance(entry, Mapping) and isinstance(entry.get("url"), str) else None
    values = collector.table(where, entry, SERVER_SCHEMA, near=near)
    if not isinstance(entry, Mapping):
        return None
    if "url" not in entry:
        collector.add(where, "missing required key 'url'", anchor="servers")
        return None
    if "url" not in values:
        return None
    url = values["url"] = normalize_url(values["url"])
    if url in first_index:
        message = f"{redact_url(url)} is listed twice (servers[{first_index[url]}] is the same server)"
        collector.add(f"{where}.url", message, anchor="url", near=near)
        return None
    first_index[url] = index
    if url_has_credentials(url) and values.get("api_key"):
        message = "the URL carries user:password@ and an api_key is set: use one of them"
        collector.add(f"{where}.api_key", message, anchor="api_key", near=near)
        return None
    values["models"] = tuple(values.get("models", ()))
    values["capacity_set"] = "max_concurrent_requests" in values
    return ServerConfig(**values)


def _check_cooldowns(router: dict[str, Any], collector: _Collector) -> None:
    """`breaker_max_cooldown` caps the doubled cool-downs: it may not be below the first one."""
    first = router.get("breaker_cooldown", RouterConfig.breaker_cooldown)
    cap = router.get("breaker_max_cooldown", RouterConfig.breaker_max_cooldown)
    if cap < first:
        message = f"must be at least breaker_cooldown ({first:g}), got {cap:g}"
        collector.add("router.breaker_max_cooldown", message, anchor="breaker_max_cooldown", near="[router]")
        router.pop("breaker_max_cooldown", None)
        router.pop("breaker_cooldown", None)


def _check_names(servers: tuple[ServerConfig, ...], instances: tuple[InstanceConfig, ...], collector: _Collector) -> None:
    """Every server is known by its name (routing, /metrics labels, the CLI): one name, one server."""
    counts = Counter(server.label for server in servers)
    clashes = sorted(label for label, count in counts.items() if count > 1)
    clashes += sorted({instance.label for instance in instances if instance.label in counts})
    for label in clashes:
        collector.add("servers", f"two servers are named {label!r}; give each a distinct `name`", anchor="name", near=label)


def _build_instances(raw: Any, collector: _Collector) -> tuple[InstanceConfig, ...]:
    if not isinstance(raw, list):
        collector.add("instances", "expected [[instances]] tables", anchor="instances")
        return ()
    instances: list[InstanceConfig] = []
    for index, entry in enumerate(raw):
        where = f"instances[{index}]"
        near = entry.get("model") if isinstance(entry, Mapping) and isinstance(entry.get("model"), str) else None
        values = collector.table(where, entry, INSTANCE_SCHEMA, near=near)
        if isinstance(entry, Mapping) and "model" not in entry:
            collector.add(where, "missing required key 'model'", anchor="instances")
            continue
        if "model" not in values:
            continue
        instances.append(InstanceConfig(**_instance_values(values)))
    _check_instance_labels(instances, collector)
    return tuple(instances)


def _instance_values(values: dict[str, Any]) -> dict[str, Any]:
    devices = values.get("devices", ())
    if isinstance(devices, str):
        devices = [int(part) for part in devices.split(",") if part.strip()]
    values["devices"] = tuple(devices)
    values["port_range"] = tuple(values.get("port_range", InstanceConfig.port_range))
    values["extra_args"] = tuple(values.get("extra_args", ()))
    values["command"] = tuple(values.get("command", ()))
    values["env"] = tuple(sorted(values.get("env", {}).items()))
    return values


def _check_instance_labels(instances: list[InstanceConfig], collector: _Collector) -> None:
    labels = [instance.label for instance in instances]
    for label in {label for label in labels if labels.count(label) > 1}:
        collector.add("instances", f"two instances are named {label!r}; give each a distinct `name`", anchor="name")
