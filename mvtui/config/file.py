"""The config file on disk: read and checked in one go, and edited in place.

An edit re-reads the file, applies a change to its tomlkit document (`config.edit`), checks
that the result is a valid config, and replaces the file atomically with its mode kept. It
never edits a broken file, never recreates a file that was there and went away (an editor
or a ConfigMap moved it: a new file would hold only the change and drop every other server
and `[router] api_keys`), and never overwrites a save someone else made in between: the
file's identity and content are compared just before the write, and a changed file means
starting over. The blocking work runs in a thread (`edit_file`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import tomlkit

from mvtui.config.edit import Change
from mvtui.config.schema import Config, parse_config
from mvtui.errors import ConfigEditError, ConfigError, Problem
from mvtui.files import write_atomic

ATTEMPTS = 3  # tries when someone else writes the file while we edit it
Identity = tuple[int, int, int, int]  # device, inode, size, mtime in ns


@dataclass(frozen=True)
class FileState:
    """One read of the config file: its digest (None when absent) and what it says."""

    digest: str | None
    config: Config | None = None
    error: ConfigError | None = None


@dataclass(frozen=True)
class EditResult:
    text: str
    config: Config


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_state(path: Path) -> FileState:
    """Blocking: read and check the file, from one read so the digest matches the config."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return FileState(None, error=ConfigError(path, [Problem("file", "no such file (deleted, renamed, or not created yet)")]))
    except OSError as error:
        problem = Problem("file", f"cannot read it: {error.strerror or error}")
        return FileState(f"unreadable: {error}", error=ConfigError(path, [problem]))
    digest = digest_of(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return FileState(digest, error=ConfigError(path, [Problem("file", f"not UTF-8 text: {error.reason} at byte {error.start}")]))
    try:
        return FileState(digest, config=parse_config(text, path))
    except ConfigError as error:
        return FileState(digest, error=error)


def edited_text(text: str, change: Change, path: Path | None = None) -> EditResult:
    """Apply `change` to valid config text; the result must be a valid config too."""
    try:
        parse_config(text, path)
    except ConfigError as error:
        raise ConfigEditError(f"the config file has problems; fix them first.\n{error}") from None
    document = tomlkit.parse(text)
    change(document)
    new_text = document.as_string()
    try:
        config = parse_config(new_text, path)
    except ConfigError as error:
        raise ConfigEditError(f"the change would make the config invalid.\n{error}") from None
    return EditResult(new_text, config)


def apply_edit(path: Path, change: Change, *, may_create: bool = False) -> EditResult:
    """Read, edit, write (blocking). `may_create`: the file never existed, so the first edit
    makes it; otherwise a missing file is an error."""
    for _attempt in range(ATTEMPTS):
        identity, original = _read(path)
        if identity is None and not may_create:
            raise ConfigEditError(
                f"{path.absolute()} is gone (moved or deleted); not writing a new one, which would hold only this change. "
                "Put the file back (or point mvtui at it) and try again"
            )
        result = edited_text(original, change, path)
        if _read(path) != (identity, original):
            continue
        write_atomic(path, result.text)
        return result
    raise ConfigEditError(f"{path.absolute()} kept changing while it was being edited; try again")


async def edit_file(path: Path, change: Change, *, may_create: bool = False) -> EditResult:
    return await asyncio.to_thread(apply_edit, path, change, may_create=may_create)


def _read(path: Path) -> tuple[Identity | None, str]:
    """The file's identity and text; (None, "") when it does not exist."""
    try:
        with open(path, encoding="utf-8") as file:
            info = os.fstat(file.fileno())
            return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns), file.read()
    except FileNotFoundError:
        return None, ""
