"""A stand-in for the Hugging Face hub on loopback, for `mvtui pull` (through HF_ENDPOINT).

It answers the routes huggingface_hub's snapshot download uses, with the headers it reads:
- `GET /api/models/{repo}/revision/{rev}`: the model's info, whose `sha` is the commit;
- `GET /api/models/{repo}/tree/{commit}?recursive=...`: the files (path, size, oid);
- `HEAD /{repo}/resolve/{commit}/{file}`: X-Repo-Commit, ETag (and X-Linked-Etag), the size
  (X-Linked-Size, Content-Length);
- `GET /{repo}/resolve/{commit}/{file}`: the bytes, from an offset with `Range: bytes=N-` (206).
An unknown repo or revision is a 404 with the hub's X-Error-Code. Every request is recorded.
A file can stall after some bytes until `release()`, or have its connection cut once.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiohttp import web


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + self.files[name])
            self.commit = digest.hexdigest()


class Seen(NamedTuple):
    method: str
    path: str
    range: str | None


def etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeHub:
    repos: list[Repo]
    stall_after: dict[str, int] = field(default_factory=dict)  # file name: bytes sent before it waits for release()
    cut_after: dict[str, int] = field(default_factory=dict)  # file name: bytes sent before the connection is cut, once
    seen: list[Seen] = field(default_factory=list)
    stalled: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._released = asyncio.Event()

    # --- what the tests read --------------------------------------------------------------

    def gets(self, file_name: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.method == "GET" and seen.path.endswith("/" + file_name) and "/resolve/" in seen.path]

    def release(self) -> None:
        self.stall_after.clear()
        self._loop.call_soon_threadsafe(self._released.set)

    # --- the routes -----------------------------------------------------------------------

    def _repo(self, request: web.Request) -> Repo:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        for repo in self.repos:
            if repo.repo_id == repo_id:
                return repo
        raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")

    def _commit(self, request: web.Request, repo: Repo) -> str:
        if request.match_info["rev"] not in ("main", repo.commit):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"}, text="Invalid rev id")
        return repo.commit

    async def info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        commit = self._commit(request, repo)
        siblings = [{"rfilename": name} for name in sorted(repo.files)]
        return web.json_response({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False, "siblings": siblings})

    async def tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._commit(request, repo)
        files = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(repo.files.items())
        ]
        return web.json_response(files)

    def _file(self, request: web.Request) -> tuple[Repo, str, bytes]:
        repo = self._repo(request)
        commit = self._commit(request, repo)
        name = request.match_info["file"]
        if name not in repo.files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        return repo, commit, repo.files[name]

    async def head(self, request: web.Request) -> web.Response:
        repo, commit, data = self._file(request)
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{etag(data)}"',
            "X-Linked-Etag": f'"{etag(data)}"',
            "X-Linked-Size": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        return web.Response(headers=headers)

    async def download(self, request: web.Request) -> web.StreamResponse:
        repo, commit, data = self._file(request)
        name = request.match_info["file"]
        start = _range_start(request.headers.get("Range"))
        response = web.StreamResponse(status=206 if start else 200)
        response.headers.update({"X-Repo-Commit": commit, "ETag": f'"{etag(data)}"', "Accept-Ranges": "bytes"})
        response.content_length = len(data) - start
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await response.prepare(request)
        await self._send(request, response, name, data[start:])
        return response

    async def _send(self, request: web.Request, response: web.StreamResponse, name: str, body: bytes) -> None:
        if name in self.cut_after:
            await response.write(body[: self.cut_after.pop(name)])
            assert request.transport is not None
            request.transport.close()  # after what was written: the client reads a body shorter than Content-Length
            return
        if name in self.stall_after:
            await response.write(body[: self.stall_after[name]])
            self.stalled.set()
            await self._released.wait()
            return
        await response.write(body)
        await response.write_eof()

    @web.middleware
    async def record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path, request.headers.get("Range")))
        return await handler(request)  # type: ignore[no-any-return]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.record])
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self.tree)
        app.router.add_route("HEAD", "/{org}/{name}/resolve/{rev}/{file:.+}", self.head)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{file:.+}", self.download, allow_head=False)
        return app

    # --- running ----------------------------------------------------------------------------

    @contextmanager
    def running(self) -> Iterator[FakeHub]:
        ready = threading.Event()
        stop: list[asyncio.Event] = []

        async def serve() -> None:
            runner = web.AppRunner(self.app(), shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            stop.append(asyncio.Event())
            ready.set()
            await stop[0].wait()
            self._released.set()
            await runner.cleanup()

        thread = threading.Thread(target=self._loop.run_until_complete, args=(serve(),), daemon=True)
        thread.start()
        ready.wait(10)
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(stop[0].set)
            thread.join(10)


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-", 1)[0] or 0)
