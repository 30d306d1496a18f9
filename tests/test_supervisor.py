"""Every background part is supervised: a crash is logged and shown, and the part restarts."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mvtui.cluster.state import Cluster
from mvtui.runtime.supervisor import Supervisor


async def test_a_crashing_part_is_reported_and_restarted_until_it_runs(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster()
    supervisor = Supervisor(cluster.part_fault, first_backoff=0.01, max_backoff=0.04)
    runs = 0
    running = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError(f"boom {runs}")
        running.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR):
        supervisor.keep_running(flaky, "poller")
        await asyncio.wait_for(running.wait(), 5)
    assert runs == 4
    assert [event.kind for event in cluster.events] == ["crash", "restarted"] * 3
    assert "boom 3" in [event.message for event in cluster.events if event.kind == "crash"][-1]
    assert cluster.faults == {}  # running again
    assert sum("poller crashed: RuntimeError('boom" in record.getMessage() for record in caplog.records) == 3
    await supervisor.stop()
    assert all(task.done() for task in supervisor.tasks)


async def test_a_part_that_keeps_crashing_stays_visible_as_a_fault() -> None:
    cluster = Cluster()
    supervisor = Supervisor(cluster.part_fault, first_backoff=10.0)

    async def broken() -> None:
        raise ValueError("bad state")

    supervisor.keep_running(broken, "instances")
    while not cluster.faults:
        await asyncio.sleep(0.01)
    assert "ValueError('bad state')" in cluster.faults["instances"] and "restarting in 10.0 s" in cluster.faults["instances"]
    await supervisor.stop()


async def test_a_one_off_task_that_fails_is_reported_not_restarted() -> None:
    cluster = Cluster()
    supervisor = Supervisor(cluster.part_fault)
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1
        raise OSError("disk full")

    await supervisor.run_once(once(), "admin start x")
    assert calls == 1 and cluster.faults == {}
    assert [(event.kind, event.server) for event in cluster.events] == [("crash", "admin start x")]
    assert "OSError('disk full')" in cluster.events[-1].message
