"""What an operator can do to the cluster. The dashboard's keys, the admin API and the CLI
all call these; none of them speaks to a server any other way."""

from __future__ import annotations

from mvtui.cluster import Cluster, Server


class CommandError(Exception):
    """A command that cannot be carried out; the message is for the operator."""


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
