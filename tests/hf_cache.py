"""A Hugging Face cache on disk, laid out as huggingface_hub writes it, for the dashboard's
Models screen: `models--ORG--NAME/{blobs, snapshots/COMMIT, refs/main}`, each snapshot file
a relative symlink to its blob. Large files are sparse (their size without the bytes), and
every blob can carry a fixed modification time (the revision's date)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

CHAT_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
EMBED_CONFIG = {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"}


@dataclass(frozen=True)
class CachedRepo:
    repo_id: str
    config: dict[str, object] | None = None  # written as config.json
    files: dict[str, int] = field(default_factory=dict)  # other files: name -> size (sparse)

    @property
    def commit(self) -> str:
        return hashlib.sha1(self.repo_id.encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        return "models--" + self.repo_id.replace("/", "--")


def build_cache(folder: Path, repos: list[CachedRepo], modified: float | None = None) -> Path:
    """Write `repos` into the cache at `folder`; `modified`: every blob's mtime."""
    for repo in repos:
        root = folder / repo.folder_name
        snapshot = root / "snapshots" / repo.commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(exist_ok=True)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(repo.commit)
        if repo.config is not None:
            _blob(root, snapshot, "config.json", json.dumps(repo.config).encode(), modified)
        for name, size in repo.files.items():
            _blob(root, snapshot, name, size, modified)
    return folder


def _blob(root: Path, snapshot: Path, name: str, content: bytes | int, modified: float | None) -> None:
    digest = hashlib.sha256(content if isinstance(content, bytes) else f"{root.name}/{name}/{content}".encode()).hexdigest()
    blob = root / "blobs" / digest
    with blob.open("wb") as handle:
        if isinstance(content, bytes):
            handle.write(content)
        else:
            handle.truncate(content)  # sparse: the size on disk huggingface_hub reads, no bytes
    if modified is not None:
        os.utime(blob, (modified, modified))
    link = snapshot / name
    link.unlink(missing_ok=True)
    link.symlink_to(Path("..") / ".." / "blobs" / digest)
