"""Files mvtui writes: replaced in one step, never left half-written."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

NEW_FILE_MODE = 0o600  # a new file may hold API keys or a token


def write_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace the file in one step (a temporary file beside it, then `os.replace`).

    It keeps the mode it had unless `mode` is given; a new file gets 0600. A symlinked path
    is written through to its target, so the link stays a link.
    """
    target = Path(os.path.realpath(path))
    if mode is None:
        mode = _current_mode(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def _current_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return NEW_FILE_MODE
