from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Proc


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Append every Proc a test starts; all are stopped (by process group) at teardown."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()
