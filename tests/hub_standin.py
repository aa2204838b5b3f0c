"""A stand-in for the Hugging Face Hub, for the gallery's ``hf`` source: the routes huggingface_hub uses,
answered the way the Hub answers them, from files the tests make.

- ``HEAD|GET /{repo}/resolve/{revision}/{path}``: 302 to a CDN URL, with ``X-Repo-Commit``,
  ``X-Linked-Etag``/``ETag`` and ``X-Linked-Size`` (an LFS file's metadata);
- ``GET /cdn/{repo}/{path}``: the bytes, with ``Range`` requests answered 206 (resumed downloads);
- ``GET /api/models/{repo}/revision/{revision}``: the repository's commit and files (``snapshot_download``).

A gated repository answers 401 ``GatedRepo`` without ``Authorization: Bearer <token>``; a file marked
flaky is cut halfway the first time it is sent. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field

from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Hub:
    repos: dict[str, dict[str, bytes]]  # repo id -> path -> content
    gated: set[str] = field(default_factory=set)
    token: str = "hf_test_token"
    flaky: set[tuple[str, str]] = field(default_factory=set)  # (repo, path) cut halfway once
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def _file(self, request: web.Request) -> tuple[str, str, bytes]:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        path = request.match_info["path"]
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        if repo in self.gated and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(headers={"X-Error-Code": "GatedRepo",
                                                "X-Error-Message": "Access to this repository is restricted"},
                                       text="gated")
        if path not in self.repos[repo]:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text="Entry not found")
        return repo, path, self.repos[repo][path]

    async def resolve(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.headers)))
        repo, path, data = self._file(request)
        digest = hashlib.sha256(data).hexdigest()
        return web.Response(status=302, headers={
            "Location": f"{self.url}/cdn/{repo}/{path}", "X-Repo-Commit": COMMIT, "ETag": f'"{digest}"',
            "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data))})

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.headers)))
        repo, path, data = self._file(request)
        start = 0
        if request.http_range.start is not None:
            start = request.http_range.start
        status = 206 if start else 200
        headers = {"Content-Length": str(len(data) - start), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if (repo, path) in self.flaky and not start:
            self.flaky.discard((repo, path))
            await response.write(data[: len(data) // 2])
            await asyncio.sleep(0.05)
            request.transport.abort()  # the connection drops halfway
            return response
        await response.write(data[start:])
        await response.write_eof()
        return response

    async def repo_info(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.headers)))
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        return web.json_response({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                  "siblings": [{"rfilename": p} for p in sorted(self.repos[repo])]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{org}/{name}/resolve/{revision}/{path:.+}", self.resolve)
        app.router.add_get("/cdn/{org}/{name}/{path:.+}", self.cdn)
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self.repo_info)
        app.router.add_get("/api/models/{org}/{name}", self.repo_info)
        return app


class RunningHub:
    """The stand-in served from a thread of its own, on a free port."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Hub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.hub

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.hub.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.hub.url = f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
