"""Which loopback port an instance listens on: its `port`, else a free one from `port_range`."""

from __future__ import annotations

import socket
from collections.abc import Collection

from mvtui.config.schema import InstanceConfig
from mvtui.errors import CommandError
from mvtui.instances.processes import HOST


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def in_range(port: int, port_range: tuple[int, int]) -> bool:
    return port_range[0] <= port <= port_range[1]


def initial_port(config: InstanceConfig, taken: Collection[int]) -> int:
    """Where a new instance is listed: `port`, else the first free one of the range not
    `taken` by another instance (else the first not taken: it is checked again at start)."""
    if config.port:
        return config.port
    first, last = config.port_range
    ports = range(first, last + 1)
    untaken = next((port for port in ports if port not in taken), first)
    return next((port for port in ports if port not in taken and port_is_free(port)), untaken)


def port_for_start(config: InstanceConfig, current: int, taken: Collection[int]) -> int:
    """The port to start on: `current` if nothing listens there, else another from the range."""
    if port_is_free(current):
        return current
    if config.port:
        raise CommandError(f"port {current} on {HOST} is already in use; choose another `port`")
    first, last = config.port_range
    for port in range(first, last + 1):
        if port not in taken and port_is_free(port):
            return port
    raise CommandError(f"no free port in port_range {first}-{last}")
