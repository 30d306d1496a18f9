"""What the dashboard needs from the running core, and nothing more. The entry point hands
the dashboard a factory of objects with this shape; the UI never imports the wiring."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Protocol

from mvtui.cluster.state import Cluster
from mvtui.config.schema import Config
from mvtui.control.operator import Operator
from mvtui.errors import ConfigError
from mvtui.gpu import GpuProbe


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


CoreFactory = Callable[[], contextlib.AbstractAsyncContextManager[Core]]
