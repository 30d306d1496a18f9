"""Real processes on loopback for tests: `mvtui` subcommands and simulated vLLM servers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 40


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A process started in its own session: signals go to its whole group."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int | None, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM to the group, then SIGKILL if it has not exited within `timeout`."""
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _signal_group(self, signum: signal.Signals) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signum)  # start_new_session: the group id is the pid
        except ProcessLookupError:
            pass


def start_mvtui(
    args: list[str],
    *,
    port: int | None = None,
    wait_path: str = "/health",
    env: dict | None = None,
    timeout: float = 15,
    wait: bool = True,
) -> Proc:
    """Run `python -m mvtui ARGS` from this working tree; wait until PORT answers WAIT_PATH."""
    if port is None:
        port = _port_from_args(args)
    log_fd, log_name = tempfile.mkstemp(prefix="mvtui-test-", suffix=".log")
    with os.fdopen(log_fd, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mvtui", *args],
            cwd=REPO_ROOT,
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = Proc(proc, port, Path(log_name))
    if wait:
        if port is None:
            started.kill()
            raise ValueError("start_mvtui(wait=True) needs a port, in `port=` or as --port in args")
        wait_until_answering(started, wait_path, timeout)
    return started


def start_sim(
    model: str = "demo",
    port: int | None = None,
    extra: Sequence[str] = (),
    env: dict | None = None,
    wait: bool = True,
) -> Proc:
    port = port if port is not None else free_port()
    return start_mvtui(["sim", "--port", str(port), "--model", model, *extra], port=port, env=env, wait=wait)


def wait_until_answering(proc: Proc, path: str = "/health", timeout: float = 15) -> None:
    """Poll until any HTTP status comes back; fail with the log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"mvtui exited with {proc.proc.returncode} before answering:\n{proc.log_tail()}")
        if _answers(proc.url + path):
            return
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"{proc.url}{path} did not answer within {timeout} s:\n{proc.log_tail()}")


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any status means the server is up
    except (OSError, urllib.error.URLError):
        return False


def _child_env(extra: dict | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _port_from_args(args: Sequence[str]) -> int | None:
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--port":
            return int(value)
    return None


def admin_files(state_home: Path) -> list[Path]:
    """The admin files (one per running mvtui) under XDG_STATE_HOME=state_home."""
    return sorted((state_home / "mvtui" / "admin").glob("*.json"))


def wait_until(predicate: Callable[[], T], timeout: float = 15.0, every: float = 0.05, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(every)


async def eventually(predicate: Callable[[], T], timeout: float = 30.0, every: float = 0.02, what: str = "condition") -> T:
    """`wait_until` for async tests: the loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(every)


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies are dead and not counted)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members
