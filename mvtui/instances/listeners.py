"""Who listens on a loopback port (Linux /proc): a start counts only when the socket that
answers /health belongs to the instance's own process group, never to a squatter that took
the port while vLLM was still loading.

Blocking (it reads /proc): call it from a thread.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TCP_LISTEN = "0A"
# Listening addresses that take a connection to 127.0.0.1 (as the router makes).
LOOPBACK_REACHABLE = {
    ipaddress.ip_address("127.0.0.1"),
    ipaddress.ip_address("0.0.0.0"),
    ipaddress.ip_address("::"),
    ipaddress.ip_address("::ffff:127.0.0.1"),
    ipaddress.ip_address("::ffff:0.0.0.0"),
}


@dataclass(frozen=True)
class Verdict:
    """`ours` is False only when another process surely listens; `detail` says who."""

    ours: bool
    detail: str = ""


def check_listener(port: int, pgid: int, proc: Path = PROC) -> Verdict:
    """Whether every socket listening on loopback `port` belongs to process group `pgid`.
    Where the system cannot tell (no /proc, or the listener is in another network
    namespace), the answer is ours: there is nothing to hold against it."""
    inodes = listening_inodes(port, proc)
    if not inodes:
        return Verdict(True, "no listener visible in /proc/net")
    foreign = inodes - group_socket_inodes(pgid, proc)
    if not foreign:
        return Verdict(True)
    return Verdict(False, describe_owners(foreign, proc))


def listening_inodes(port: int, proc: Path = PROC) -> set[int]:
    """Socket inodes listening on `port` at an address that 127.0.0.1 reaches."""
    inodes: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            inode = _listening_inode(line.split(), port)
            if inode is not None:
                inodes.add(inode)
    return inodes


def _listening_inode(fields: list[str], port: int) -> int | None:
    # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    if len(fields) < 10 or fields[3] != TCP_LISTEN:
        return None
    address, _, port_hex = fields[1].partition(":")
    try:
        if int(port_hex, 16) != port or parse_address(address) not in LOOPBACK_REACHABLE:
            return None
        return int(fields[9])
    except ValueError:
        return None


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6} print addresses as 32-bit words in the host's byte order."""
    words = [int(text[index : index + 8], 16) for index in range(0, len(text), 8)]
    packed = b"".join(struct.pack("=I", word) for word in words)
    return ipaddress.ip_address(packed)


def group_members(pgid: int, proc: Path = PROC) -> list[int]:
    members = []
    for entry in _pids(proc):
        stat = _read_text(proc / str(entry) / "stat")
        fields = stat.rsplit(")", 1)[-1].split() if stat else []
        if len(fields) > 2 and fields[2] == str(pgid):
            members.append(entry)
    return members


def group_socket_inodes(pgid: int, proc: Path = PROC) -> set[int]:
    inodes: set[int] = set()
    for pid in group_members(pgid, proc):
        inodes |= socket_inodes(pid, proc)
    return inodes


def socket_inodes(pid: int, proc: Path = PROC) -> set[int]:
    folder = proc / str(pid) / "fd"
    try:
        names = os.listdir(folder)
    except OSError:
        return set()
    inodes = set()
    for name in names:
        try:
            target = os.readlink(folder / name)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def describe_owners(inodes: set[int], proc: Path = PROC) -> str:
    """Each owner this user may see, as `pid 1234 (python3 -m http.server)`, else a hint."""
    owners = [pid for pid in _pids(proc) if socket_inodes(pid, proc) & inodes]
    if not owners:
        return "a process this user cannot see (another user's, or in a container)"
    return ", ".join(f"pid {pid} ({_command_line(pid, proc) or '?'})" for pid in owners)


def _command_line(pid: int, proc: Path) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()[:200]


def _pids(proc: Path) -> list[int]:
    try:
        return [int(entry) for entry in os.listdir(proc) if entry.isdigit()]
    except OSError:
        return []


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
