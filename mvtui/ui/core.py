"""What the dashboard needs from the running core, and nothing more. The entry point hands
the dashboard a factory of objects with this shape; the UI never imports the wiring."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mvtui.cluster.state import Cluster
from mvtui.config.schema import Config
from mvtui.control.operator import Operator
from mvtui.errors import ConfigError
from mvtui.gpu import GpuProbe


class AdminState(Protocol):
    """What the dashboard shows of the admin API (the core's `AdminServer`, by its shape: the
    UI does not import mvtui.admin)."""

    @property
    def url(self) -> str | None: ...  # where it listens; None when it does not

    @property
    def problem(self) -> str | None: ...  # why it could not start

    @property
    def notice(self) -> str | None: ...  # why it listens elsewhere than configured


class Core(Protocol):
    @property
    def operator(self) -> Operator | None: ...  # None until the core has started

    @property
    def cluster(self) -> Cluster: ...

    @property
    def config(self) -> Config: ...

    @property
    def config_path(self) -> Path | None: ...

    @property
    def config_error(self) -> ConfigError | None: ...

    @property
    def gpu(self) -> GpuProbe: ...

    @property
    def router_url(self) -> str: ...

    @property
    def router_port(self) -> int | None: ...

    @property
    def admin(self) -> AdminState | None: ...  # None until started, or in a core without one


CoreFactory = Callable[[], contextlib.AbstractAsyncContextManager[Core]]
