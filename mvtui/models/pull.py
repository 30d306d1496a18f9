"""`mvtui pull`: a model's files from the Hugging Face hub into the local cache, with
huggingface_hub's snapshot download (its progress bars on stderr).

An interrupted pull resumes when run again: the files already downloaded are kept and only
the rest are fetched, and a connection cut midway through a file is picked up where it
stopped (a ranged request) within the same run. The hub is `HF_ENDPOINT` (default
https://huggingface.co); every error names it, and says when `HF_HUB_OFFLINE` is in the way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvtui.errors import CommandError

DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class Pulled:
    repo_id: str
    revision: str
    commit: str
    path: Path
    files: int
    size: int

    def as_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.path),
            "files": self.files,
            "size_on_disk": self.size,
        }


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def pull(repo_id: str, revision: str | None = None) -> Pulled:
    """Download what the cache lacks of `repo_id` at `revision`; CommandError says why not."""
    if hub_offline():
        raise CommandError(
            f"HF_HUB_OFFLINE is set, so nothing is downloaded from {hub_endpoint()}: unset it (or set HF_HUB_OFFLINE=0) "
            f"to pull {repo_id}; `mvtui models` lists what the cache already has"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision))
    except Exception as error:  # every failure of the hub client becomes one message for the operator
        raise CommandError(explain(error, repo_id, revision or DEFAULT_REVISION)) from error
    return _summary(repo_id, revision or DEFAULT_REVISION, folder)


def explain(error: BaseException, repo_id: str, revision: str) -> str:
    from huggingface_hub import errors

    endpoint = hub_endpoint()
    if isinstance(error, errors.GatedRepoError):
        return f"{repo_id} is gated on {endpoint}: accept its terms on its page there, then log in (`hf auth login`, or HF_TOKEN)"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"no model {repo_id!r} on {endpoint} (a private or gated one needs a login: `hf auth login`, or HF_TOKEN)"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} on {endpoint}"
    unreachable = connection_failure(error)
    if unreachable:
        return (
            f"cannot reach the Hugging Face hub at {endpoint} ({unreachable}). Check the network, a proxy, or HF_ENDPOINT, "
            "then run `mvtui pull` again: files already downloaded are kept. (HF_HUB_OFFLINE=1 makes vLLM and "
            "huggingface_hub use the cache only, without trying the hub; pull needs it unset.)"
        )
    if isinstance(error, errors.HfHubHTTPError):
        return f"the hub at {endpoint} refused: {_first_line(error)}"
    if isinstance(error, OSError):
        return f"cannot store {repo_id}: {error.strerror or _first_line(error)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def connection_failure(error: BaseException) -> str | None:
    """Why the hub could not be reached, when that is what went wrong (anywhere in the
    exception's chain: huggingface_hub wraps a failed connection in its own errors)."""
    from huggingface_hub import errors

    failures = (*_transport_errors(), errors.OfflineModeIsEnabled)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, failures):
            return _first_line(current) or type(current).__name__
        if isinstance(current, errors.HfHubHTTPError) and current.response is not None and current.response.status_code >= 500:
            return f"it answered {current.response.status_code}"
        current = current.__cause__ or current.__context__
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "no connection" errors: httpx2 (huggingface_hub 2) or httpx (1)."""
    loaded = (sys.modules.get(name) for name in ("httpx2", "httpx"))
    return tuple(module.TransportError for module in loaded if module is not None and hasattr(module, "TransportError"))


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def _summary(repo_id: str, revision: str, folder: Path) -> Pulled:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return Pulled(repo_id, revision, folder.name, folder, len(files), sum(path.stat().st_size for path in files))
