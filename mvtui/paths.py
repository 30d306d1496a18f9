"""Where mvtui keeps its files: platformdirs locations, overridable for tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import platformdirs

APP_NAME = "mvtui"
CONFIG_ENV = "MVTUI_CONFIG"


class AppPaths(NamedTuple):  # not a dataclass: every CLI call imports this, and dataclasses costs ~13 ms
    config_dir: Path
    log_dir: Path
    state_dir: Path

    @classmethod
    def default(cls) -> AppPaths:
        return cls(
            config_dir=Path(platformdirs.user_config_dir(APP_NAME)),
            log_dir=Path(platformdirs.user_log_dir(APP_NAME)),
            state_dir=Path(platformdirs.user_state_dir(APP_NAME)),
        )

    @property
    def default_config(self) -> Path:
        return self.config_dir / "servers.toml"

    @property
    def themes_dir(self) -> Path:
        return self.config_dir / "themes"

    @property
    def instance_logs(self) -> Path:
        return self.log_dir / "instances"

    @property
    def admin_dir(self) -> Path:
        """One file per running mvtui: its addresses and admin token, for the CLI."""
        return self.state_dir / "admin"

    @property
    def ui_state(self) -> Path:
        return self.state_dir / "ui.json"

    def config_file(self, explicit: str | os.PathLike[str] | None = None) -> Path:
        """`--config` first, then $MVTUI_CONFIG, then the platform's config folder."""
        if explicit:
            return Path(explicit).expanduser()
        from_env = os.environ.get(CONFIG_ENV)
        return Path(from_env).expanduser() if from_env else self.default_config
