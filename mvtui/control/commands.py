"""What an operator can do to the cluster. The dashboard's keys, the admin API and the CLI
all call these; none of them speaks to a server any other way."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mvtui.cluster.state import Cluster, Server
from mvtui.errors import CommandError

if TYPE_CHECKING:  # both import this module: only the type checker may import them here
    from mvtui.cluster.sleep_wake import Controller
    from mvtui.instances.manager import Instance, InstanceManager


def find_server(cluster: Cluster, key: str) -> Server:
    server = cluster.find(key)
    if server is None:
        names = ", ".join(server.name for server in cluster) or "none"
        raise CommandError(f"no server named {key!r}; servers: {names}")
    return server


def drain(cluster: Cluster, key: str) -> Server:
    """No new requests; those in flight finish (the state reads draining, then drained)."""
    server = find_server(cluster, key)
    if not server.drain:
        server.drain = True
        cluster.emit("drain", server, f"draining, {server.in_flight} in flight")
    return server


def undrain(cluster: Cluster, key: str) -> Server:
    server = find_server(cluster, key)
    if server.drain:
        server.drain = False
        cluster.emit("undrain", server, "taking requests again")
    return server


async def sleep(control: "Controller", key: str, level: int) -> Server:
    """Drain (bounded by drain_timeout), then `/sleep?level=N`, then confirm. A server
    without sleep mode raises CommandError and keeps its state."""
    return await control.sleep(key, level)


async def wake(control: "Controller", key: str) -> Server:
    """`/wake_up` (after a level 2 sleep also reload_weights and reset_prefix_cache);
    shares a wake already under way."""
    return await control.wake(key)


async def start_instance(instances: "InstanceManager", key: str) -> "Instance":
    """Start a local instance (or join its start); CommandError carries the log's last lines."""
    return await instances.start(key)


async def stop_instance(instances: "InstanceManager", key: str) -> "Instance":
    """Drain a local instance, then SIGTERM its process group (SIGKILL after shutdown_timeout)."""
    return await instances.stop(key)
