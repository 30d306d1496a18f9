"""The mvtui processes running on this machine, as the CLI finds them: one admin file each.

Each mvtui writes `<state folder>/admin/<PID>.json` (mode 0600) with its PID, router and
admin API addresses and admin token, and holds an exclusive `flock` on it for as long as it
runs. The kernel drops the lock when the process ends, however it ends (SIGKILL included), so
a file that nobody holds is stale: readers skip it and remove it. Two mvtui on one machine
thus never overwrite each other's file, and the CLI never mistakes one for the other.

Standard library only: the CLI imports this on every call.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

FILE_MODE = 0o600
FOLDER_MODE = 0o700


class RunningMvtui(NamedTuple):
    """One live admin file."""

    pid: int
    router_url: str
    admin_url: str | None  # None: its admin API is off (`admin_off` says why)
    token: str
    config_path: str | None
    admin_off: str | None
    path: Path

    @classmethod
    def from_details(cls, path: Path, details: dict[str, Any]) -> RunningMvtui:
        """KeyError, TypeError or ValueError when the file is not an admin file."""
        return cls(
            pid=int(details["pid"]),
            router_url=str(details["router_url"]),
            admin_url=_optional(details.get("url")),
            token=str(details.get("token") or ""),
            config_path=_optional(details.get("config_path")),
            admin_off=_optional(details.get("admin_off")),
            path=path,
        )

    @property
    def admin_port(self) -> int | None:
        return _port(self.admin_url)

    @property
    def router_port(self) -> int | None:
        return _port(self.router_url)

    def describe(self) -> str:
        """`PID 1234  router http://127.0.0.1:8888  admin http://127.0.0.1:8889  config /etc/servers.toml`"""
        admin = self.admin_url or f"off ({self.admin_off or 'unknown'})"
        return f"PID {self.pid}  router {self.router_url}  admin {admin}  config {self.config_path or 'none'}"

    def answers_to(self, wanted: str) -> bool:
        """`wanted` is its PID, its router or admin port, or its router or admin URL."""
        wanted = _bare(wanted)
        if wanted.isdigit():
            return int(wanted) in (self.pid, self.router_port, self.admin_port)
        return wanted in (_bare(self.router_url), _bare(self.admin_url or ""))


def _bare(url: str) -> str:
    """`http://127.0.0.1:8889/` and `127.0.0.1:8889` are the same address."""
    return url.strip().removeprefix("http://").rstrip("/")


def _optional(value: Any) -> str | None:
    return None if value is None else str(value)


def _port(url: str | None) -> int | None:
    try:
        return int((url or "").rstrip("/").rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def running_mvtuis(folder: Path) -> list[RunningMvtui]:
    """Every mvtui whose admin file in `folder` is live, by PID; stale files are removed."""
    try:
        names = sorted(name for name in os.listdir(folder) if name.endswith(".json"))
    except OSError:  # no folder: none has run yet
        return []
    found = (_read_live(folder / name) for name in names)
    return sorted((entry for entry in found if entry is not None), key=lambda entry: entry.pid)


def _read_live(path: Path) -> RunningMvtui | None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # removed meanwhile: its mvtui stopped
        return None
    try:
        if not _held(descriptor):
            _remove_if_same(path, descriptor)
            return None
        return RunningMvtui.from_details(path, json.loads(_read_all(descriptor)))
    except (OSError, ValueError, KeyError, TypeError):  # not readable or not an admin file
        return None
    finally:
        os.close(descriptor)  # also drops the shared lock a stale file gave us


def _held(descriptor: int) -> bool:
    """Whether a running mvtui holds the file's lock (if not, we now hold a shared one)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    return False


def _remove_if_same(path: Path, descriptor: int) -> None:
    """Remove the stale file, unless a new mvtui with the same PID has just replaced it."""
    try:
        opened, now = os.fstat(descriptor), os.stat(path)
        if (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino):
            os.unlink(path)
    except OSError:
        pass


def _read_all(descriptor: int) -> bytes:
    chunks = []
    while chunk := os.read(descriptor, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


class AdminFile:
    """This process's admin file: written once, locked until `withdraw()` or the end of the
    process. The lock is taken before the file gets its name, so no reader ever sees it
    unlocked; the descriptor is not inherited by the processes mvtui starts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / f"{os.getpid()}.json"
        self._descriptor: int | None = None

    def publish(self, details: dict[str, Any]) -> None:
        self.withdraw()
        self.folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
        temporary = self.folder / f".{os.getpid()}.json.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(descriptor, FILE_MODE)  # whatever the umask
            os.write(descriptor, (json.dumps(details, indent=2) + "\n").encode())
            os.fsync(descriptor)
            os.replace(temporary, self.path)
        except BaseException:
            os.close(descriptor)
            temporary.unlink(missing_ok=True)
            raise
        self._descriptor = descriptor

    def withdraw(self) -> None:
        """Remove the file (if it is still this one) and drop the lock."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is None:
            return
        try:
            _remove_if_same(self.path, descriptor)
        finally:
            os.close(descriptor)
