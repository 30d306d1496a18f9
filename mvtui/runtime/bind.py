"""What the router's socket is bound to, in words: who can reach it, and at which URL."""

from __future__ import annotations

import ipaddress

ALL_INTERFACES = ("", "0.0.0.0", "::")
OPEN_WITHOUT_KEYS = "router open to the network without API keys: set [router] api_keys or --host 127.0.0.1"


def is_loopback(host: str) -> bool:
    """Only this machine can connect: 127.0.0.0/8, ::1 or `localhost`."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def host_port(host: str, port: int) -> str:
    """`0.0.0.0:8888`, `[::1]:8888`."""
    shown = host or "0.0.0.0"
    return f"[{shown}]:{port}" if ":" in shown and not shown.startswith("[") else f"{shown}:{port}"


def listening_line(host: str, port: int) -> str:
    """`router listening on 0.0.0.0:8888 (all interfaces; clients use http://<this host>:8888/v1)`."""
    bound = host_port(host, port)
    if host in ALL_INTERFACES:
        return f"router listening on {bound} (all interfaces; clients use http://<this host>:{port}/v1)"
    scope = "this machine only; " if is_loopback(host) else ""
    return f"router listening on {bound} ({scope}clients use http://{bound}/v1)"


def open_without_keys(host: str, api_keys: tuple[str, ...]) -> bool:
    """Reachable from other machines, and any client may use it."""
    return not is_loopback(host) and not api_keys
