"""The models in the local Hugging Face cache, read with huggingface_hub's own scanner.

The cache is the folder huggingface_hub uses: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
`~/.cache/huggingface/hub` (huggingface_hub reads these when it is imported, so the process's
environment decides). Each model shows its size on disk, the revision in use (the one `main`
points to, else the newest) with the time it was downloaded, and its kind (`kinds.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvtui.errors import CommandError
from mvtui.models.kinds import model_kind

if TYPE_CHECKING:
    from huggingface_hub import CachedRepoInfo, CachedRevisionInfo

DEFAULT_REF = "main"


@dataclass(frozen=True)
class Revision:
    commit: str
    refs: tuple[str, ...]
    downloaded: float  # when this snapshot was written into the cache (a Unix time)
    size: int
    files: int
    path: Path

    def as_json(self) -> dict[str, Any]:
        return {
            "commit": self.commit,
            "refs": list(self.refs),
            "date": iso_time(self.downloaded),
            "size_on_disk": self.size,
            "files": self.files,
            "path": str(self.path),
        }


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    kind: str
    size: int  # every cached revision, on disk
    revision: Revision  # the one in use
    revisions: tuple[Revision, ...]  # newest first
    path: Path

    def is_used_by(self, configured: str) -> bool:
        """Whether an [[instances]] entry's `model` (a repo id, or a path into the cache) is this model."""
        if configured.lower() == self.repo_id.lower():
            return True
        path = Path(configured).expanduser()
        return path.is_absolute() and path.resolve().is_relative_to(self.path.resolve())

    def as_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "kind": self.kind,
            "size_on_disk": self.size,
            "revision": self.revision.commit,
            "refs": list(self.revision.refs),
            "date": iso_time(self.revision.downloaded),
            "path": str(self.path),
            "revisions": [revision.as_json() for revision in self.revisions],
        }


@dataclass(frozen=True)
class CacheListing:
    folder: Path
    models: tuple[CachedModel, ...]
    exists: bool = True
    incomplete_bytes: int = 0  # downloads cut off midway
    incomplete_files: int = 0
    warnings: tuple[str, ...] = ()

    def find(self, repo_id: str) -> CachedModel | None:
        wanted = repo_id.lower()
        return next((model for model in self.models if model.repo_id.lower() == wanted), None)


def cache_folder() -> Path:
    """Where huggingface_hub keeps its cache in this process's environment."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def scan_models(folder: Path | None = None) -> CacheListing:
    """Every model repo in the cache (datasets and spaces are left out), by repo id."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    folder = folder or cache_folder()
    try:
        info = scan_cache_dir(folder)
    except CacheNotFound:
        return CacheListing(folder, (), exists=False)
    except ValueError as error:  # the cache path is a file
        raise CommandError(f"cannot read the Hugging Face cache: {error}") from None
    models = sorted((_model(repo) for repo in info.repos if repo.repo_type == "model"), key=lambda model: model.repo_id.lower())
    return CacheListing(
        folder=folder,
        models=tuple(models),
        incomplete_bytes=sum(item.size_on_disk for item in info.incomplete_files),
        incomplete_files=len(info.incomplete_files),
        warnings=tuple(str(warning) for warning in info.warnings),
    )


def _model(repo: CachedRepoInfo) -> CachedModel:
    revisions = sorted((_revision(revision) for revision in repo.revisions), key=lambda revision: -revision.downloaded)
    in_use = next((revision for revision in revisions if DEFAULT_REF in revision.refs), revisions[0])
    chosen = next(revision for revision in repo.revisions if revision.commit_hash == in_use.commit)
    return CachedModel(
        repo_id=repo.repo_id,
        kind=model_kind(_config(chosen), (file.file_name for file in chosen.files)),
        size=repo.size_on_disk,
        revision=in_use,
        revisions=tuple(revisions),
        path=repo.repo_path,
    )


def _revision(revision: CachedRevisionInfo) -> Revision:
    return Revision(
        commit=revision.commit_hash,
        refs=tuple(sorted(revision.refs)),
        downloaded=revision.last_modified,
        size=revision.size_on_disk,
        files=revision.nb_files,
        path=revision.snapshot_path,
    )


def _config(revision: CachedRevisionInfo) -> dict[str, Any] | None:
    """The revision's config.json, when it has a readable one."""
    path = revision.snapshot_path / "config.json"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
