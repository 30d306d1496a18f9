from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Proc


@pytest.fixture(autouse=True, scope="session")
def private_user_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Config, state and logs of every mvtui the tests start (in-process or as a child) go
    to a scratch folder, never to the user's own platformdirs folders."""
    root = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as patch:
        for kind in ("CONFIG", "STATE", "DATA", "CACHE"):
            patch.setenv(f"XDG_{kind}_HOME", str(root / kind.lower()))
        patch.delenv("MVTUI_CONFIG", raising=False)
        yield


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Append every Proc a test starts; all are stopped (by process group) at teardown."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()
