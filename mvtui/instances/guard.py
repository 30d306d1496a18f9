"""A watchdog that outlives mvtui to end its instances' process groups, however mvtui ends.

PR_SET_PDEATHSIG reaches only a group's leader: when an instance's command is a wrapper
(`bash -c "vllm serve ...; ..."`), vLLM is the wrapper's child and would keep serving after
mvtui is killed. So mvtui starts this small process, in its own session (out of reach of the
terminal's SIGHUP and SIGINT), and tells it over a pipe each group it starts ("+PGID GRACE")
and each group it has ended ("-PGID"). The kernel closes mvtui's end of the pipe when mvtui
exits for any reason, SIGKILL included. The watchdog then sends SIGTERM to every group still
listed, SIGKILL to those left after GRACE seconds, and exits. On a clean exit mvtui has
ended every group itself, so the list is empty and the watchdog just exits.

The same file is the watchdog's program (`python -I -S guard.py`): standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

POLL_S = 0.05
CLOSE_WAIT_S = 5.0


class GroupGuard:
    """mvtui's side: the watchdog process, started at the first `watch`."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._groups: dict[int, float] = {}
        self._warned = False

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def groups(self) -> dict[int, float]:
        return dict(self._groups)

    async def watch(self, pgid: int, grace: float) -> None:
        """From now on, `pgid` ends when mvtui does (SIGTERM, SIGKILL after `grace` s)."""
        self._groups[pgid] = grace
        await self._send(f"+{pgid} {grace:g}\n")

    async def forget(self, pgid: int) -> None:
        """The group has ended: its id may be reused by others, so it must not be signalled."""
        if self._groups.pop(pgid, None) is not None:
            await self._send(f"-{pgid}\n")

    async def close(self) -> None:
        """mvtui exits cleanly: the watchdog ends any group still listed, then exits."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        wait = CLOSE_WAIT_S + max(self._groups.values(), default=0.0)
        try:
            await asyncio.wait_for(process.wait(), wait)
        except TimeoutError:
            log.warning("instance watchdog %d did not exit: killing it", process.pid)
            process.kill()
            await process.wait()

    async def _send(self, line: str) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            await self._start()  # a new watchdog is told every group, this change included
            return
        if not await _write(process, line):
            log.warning("instance watchdog %d is gone: starting another", process.pid)
            await self._start()

    async def _start(self) -> None:
        self._process = None
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", os.path.abspath(__file__),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        except OSError as error:
            self._warn(f"cannot start the instance watchdog ({error}): if mvtui is killed, "
                       "only each instance's first process is told to stop")  # fmt: skip
            return
        listed = "".join(f"+{pgid} {grace:g}\n" for pgid, grace in self._groups.items())
        if listed and not await _write(process, listed):
            self._warn("the instance watchdog exited at once")
            return
        self._process = process

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning("%s", message)
        self._warned = True


async def _write(process: asyncio.subprocess.Process, text: str) -> bool:
    stream = process.stdin
    if stream is None:
        return False
    try:
        stream.write(text.encode())
        await stream.drain()
    except (OSError, RuntimeError):  # BrokenPipeError, ConnectionResetError; a closed transport
        return False
    return True


# --- the watchdog process -----------------------------------------------------------------


def main() -> int:
    for number in (signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    groups: dict[int, float] = {}
    for line in sys.stdin.buffer:  # until EOF: mvtui's end of the pipe is closed
        apply_line(line.decode("ascii", "replace"), groups)
    end_groups(groups)
    return 0


def apply_line(line: str, groups: dict[int, float]) -> None:
    words = line[1:].split()
    with contextlib.suppress(ValueError, IndexError):
        if line.startswith("+"):
            groups[int(words[0])] = float(words[1])
        elif line.startswith("-"):
            groups.pop(int(words[0]), None)


def end_groups(groups: dict[int, float]) -> None:
    """SIGTERM to each group, SIGKILL to those still alive after the longest grace."""
    live = [pgid for pgid in groups if pgid > 1 and signal_group(pgid, signal.SIGTERM)]
    deadline = time.monotonic() + max(groups.values(), default=0.0)
    while live and time.monotonic() < deadline:
        time.sleep(POLL_S)
        live = [pgid for pgid in live if signal_group(pgid, 0)]
    for pgid in live:
        signal_group(pgid, signal.SIGKILL)


def signal_group(pgid: int, number: int) -> bool:
    """Whether the group exists (and is ours to signal)."""
    try:
        os.killpg(pgid, number)
    except (ProcessLookupError, PermissionError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
