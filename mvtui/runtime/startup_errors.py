"""Why mvtui could not start, in one line that says what to do."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from mvtui.admin.running import running_mvtuis
from mvtui.errors import ListenError
from mvtui.runtime.bind import host_port

HINTS = {
    errno.EADDRINUSE: "choose another port with --port or [router] port",
    errno.EACCES: "ports below 1024 need privileges: choose another with --port or [router] port",
    errno.EADDRNOTAVAIL: "this machine has no such address: check --host or [router] host",
}
OTHER_HINT = "check --host and --port, or [router] host and port"
HOST_HINT = "check --host or [router] host"


def router_listen_error(host: str, port: int, error: OSError, admin_dir: Path) -> ListenError:
    """`the router cannot listen on 0.0.0.0:8888: address already in use (mvtui PID 1234
    has its router there); choose another port with --port or [router] port`"""
    if isinstance(error, socket.gaierror):  # a host name that does not resolve
        reason, hint = str(error.strerror or error), HOST_HINT
    else:
        reason = os.strerror(error.errno) if error.errno else str(error)
        hint = HINTS.get(error.errno or 0, OTHER_HINT)
    holder = port_holder(port, admin_dir) if error.errno == errno.EADDRINUSE else ""
    return ListenError(f"the router cannot listen on {host_port(host, port)}: {reason.lower()}{holder}; {hint}")


def port_holder(port: int, admin_dir: Path) -> str:
    """` (mvtui PID 1234 has its router there)` when a running mvtui says so; else nothing."""
    for other in running_mvtuis(admin_dir):
        if other.pid != os.getpid() and port in (other.router_port, other.admin_port):
            where = "its router" if port == other.router_port else "its admin API"
            return f" (mvtui PID {other.pid} has {where} there)"
    return ""
