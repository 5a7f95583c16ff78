"""A fake Hugging Face Hub on loopback: the part of the HTTP API ``huggingface_hub`` 2.4 uses.

Two servers share one state, like the real Hub and its CDN (different origins, so the client
sees a cross-origin redirect and drops its token, exactly as against huggingface.co):

- hub: ``GET /api/models/{repo}[/revision/{rev}]`` (model info; ``sha``, ``gated``, siblings),
  ``GET /api/models/{repo}/tree/{rev}`` (recursive listing with sizes and LFS info),
  ``HEAD|GET /{repo}/resolve/{rev}/{path}``: small files answered here (``ETag`` = git blob
  id, ``X-Repo-Commit``, ``Content-Length``, ranges); ``*.safetensors`` are LFS files
  answered with a 302 to the CDN carrying ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``.
- cdn: ``HEAD|GET /cdn/{sha256}``: the bytes, with ``Range`` (206 + ``Content-Range``).

Errors carry the headers the client maps to its exceptions: 401 ``X-Error-Code: RepoNotFound``
for a missing or private repo (as the Hub answers anonymous callers), 404 ``RevisionNotFound``,
404 ``EntryNotFound``, 401/403 ``GatedRepo`` for downloads from a gated repo without a
granted token. Faults for tests: ``drop_once`` (cut a body after N bytes once), ``fail``
(answer a file's body GETs with a status), ``range_mode`` (``honour``; ``ignore``, a 200 with
the whole body as olah answers; ``short``, a 206 with half the bytes asked for and a
Content-Range saying so), ``hold`` (a file's GETs without a Range wait for its event). For
measurements, ``bandwidth`` (bytes/s) paces every body sent, all transfers sharing that one
link as downloads share a real one. Every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class Blob:
    path: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()  # fmt: skip

    @property
    def oid(self) -> str:
        """The git blob id (of the LFS pointer for LFS files), as the Hub reports it."""
        body = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha -> path -> blob
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    gated: bool = False
    private: bool = False

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


@dataclass(frozen=True)
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    file: str | None  # repo file path for resolve/cdn requests
    range: str | None
    status: int
    auth: str | None


class FakeHub:
    """State plus the two servers; use as a context manager (``with FakeHub() as hub``)."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_granted",)) -> None:
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self.drop_once: dict[str, int] = {}  # file path -> bytes to send before cutting
        self.fail: dict[str, int] = {}  # file path -> status for body GETs
        self.range_mode = "honour"
        self.hold: dict[str, threading.Event] = {}  # file path -> released when set
        self.bandwidth: float | None = None  # bytes/s shared by all bodies; None: unpaced
        self._link_free = 0.0  # when the shared link has sent everything reserved so far
        self.hooks: list[Callable[[Request], None]] = []
        self.lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._ports: list[int] = []

    # -- content ---------------------------------------------------------------------------
    def add_commit(self, repo_id: str, folder: Path, *, ref: str = "main", gated: bool = False,
                   private: bool = False) -> str:  # fmt: skip
        """Serve every file under ``folder`` as a new commit of ``repo_id`` that ``ref`` names."""
        blobs = {
            p.relative_to(folder).as_posix(): Blob(p.relative_to(folder).as_posix(), p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()
        }  # fmt: skip
        h = hashlib.sha1(repo_id.encode())
        for path, blob in sorted(blobs.items()):
            h.update(f"{path}\0{blob.oid}\n".encode())
        repo = self.repos.setdefault(repo_id, Repo())
        h.update(str(len(repo.commits)).encode())
        sha = h.hexdigest()
        repo.commits[sha] = blobs
        repo.refs[ref] = sha
        repo.gated, repo.private = gated or repo.gated, private or repo.private
        return sha

    def reserve(self, n: int) -> float:
        """When ``n`` more bytes will have gone out over the shared link (monotonic clock)."""
        assert self.bandwidth
        with self.lock:
            self._link_free = max(time.monotonic(), self._link_free) + n / self.bandwidth
            return self._link_free

    def requests(self, since: int = 0) -> list[Request]:
        with self.lock:
            return list(self.log[since:])

    # -- servers ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._ports[0]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._ports[1]}"

    def start(self) -> FakeHub:
        for name in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, name))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            self._servers.append(server)
        self._ports = [s.server_address[1] for s in self._servers]
        return self

    def stop(self) -> None:
        """Stop serving (idempotent); the URLs stay valid but refuse connections."""
        while self._servers:
            server = self._servers.pop()
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def _handler(hub: FakeHub, server: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        # -- routing -------------------------------------------------------------------
        def _serve(self, body: bool) -> None:
            self.file: str | None = None
            path = unquote(urlsplit(self.path).path)
            try:
                if server == "cdn":
                    self._cdn(path, body)
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                    self._model_info(m[1], m[2] or "main")
                elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
                    self._tree(m[1], m[2])
                elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    self._resolve(m[1], m[2], m[3], body)
                else:
                    self._error(404, None, "Not found")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _auth(self) -> str | None:
            value = self.headers.get("Authorization", "")
            return value.removeprefix("Bearer ") if value.startswith("Bearer ") else None

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self._auth() not in hub.tokens):
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _commit(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
            repo = self._repo(repo_id)
            if repo is None:
                return None
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo, sha

        # -- endpoints -----------------------------------------------------------------
        def _model_info(self, repo_id: str, rev: str) -> None:
            found = self._commit(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            blobs = repo.commits[sha].values()
            info = {
                "_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": sha,
                "private": repo.private, "gated": "manual" if repo.gated else False,
                "disabled": False, "lastModified": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": b.path, "size": len(b.data)} for b in blobs],
                "tags": [], "downloads": 0, "likes": 0,
            }  # fmt: skip
            self._json(info, {"X-Repo-Commit": sha})

        def _tree(self, repo_id: str, rev: str) -> None:
            found = self._commit(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            entries: list[dict] = []
            dirs = sorted({str(p) for b in repo.commits[sha].values()
                           for p in Path(b.path).parents if str(p) != "."})  # fmt: skip
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in dirs]
            for b in repo.commits[sha].values():
                e = {"type": "file", "oid": b.oid, "size": len(b.data), "path": b.path}
                if b.lfs:
                    e["lfs"] = {"oid": b.sha256, "size": len(b.data),
                                "pointerSize": len(b.pointer)}  # fmt: skip
                entries.append(e)
            self._json(entries, {"X-Repo-Commit": sha})

        def _resolve(self, repo_id: str, rev: str, file: str, body: bool) -> None:
            found = self._commit(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            self.file = file
            blob = repo.commits[sha].get(file)
            if blob is None:
                self._error(404, "EntryNotFound", f"{file} does not exist", {"X-Repo-Commit": sha})
                return
            if repo.gated and self._auth() not in hub.tokens:
                status = 403 if self._auth() else 401
                self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return
            headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
            if blob.lfs:
                location = f"{hub.cdn_url}/cdn/{blob.sha256}?name={quote(file)}"
                headers.update(
                    {
                        "Location": location,
                        "X-Linked-Etag": f'"{blob.sha256}"',
                        "X-Linked-Size": str(len(blob.data)),
                        "Content-Length": "0",
                    }
                )
                self._send(302, headers, b"", body=False)  # fmt: skip
                return
            self._bytes(blob, headers, body)

        def _cdn(self, path: str, body: bool) -> None:
            digest = path.removeprefix("/cdn/")
            blob = next((b for repo in hub.repos.values() for c in repo.commits.values()
                         for b in c.values() if b.lfs and b.sha256 == digest), None)  # fmt: skip
            if blob is None:
                self._send(404, {"Content-Length": "0"}, b"", body=False)
                return
            self.file = blob.path
            self._bytes(blob, {"ETag": f'"{blob.sha256}"', "Accept-Ranges": "bytes"}, body)

        # -- responses -----------------------------------------------------------------
        def _bytes(self, blob: Blob, headers: dict[str, str], body: bool) -> None:
            data, size = blob.data, len(blob.data)
            if body and blob.path in hub.fail:
                self._error(hub.fail[blob.path], None, "injected failure")
                return
            if body and blob.path in hub.hold and not self.headers.get("Range"):
                hub.hold[blob.path].wait(60)
            m = _RANGE.fullmatch(self.headers.get("Range", "").strip())
            if m and hub.range_mode != "ignore":
                start = int(m[1])
                end = min(int(m[2]) if m[2] else size - 1, size - 1)
                if start >= size:
                    self._send(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"},
                               b"", body=False)  # fmt: skip
                    return
                if hub.range_mode == "short":  # legal HTTP, but not what was asked for
                    end = start + (end - start) // 2
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                part = data[start : end + 1]
                self._send(206, {**headers, "Content-Length": str(len(part))}, part, body)
                return
            headers["Content-Length"] = str(size)
            cut = hub.drop_once.pop(blob.path, None) if body and not m else None
            if cut is not None:  # send the headers and part of the body, then hang up
                self._send(200, headers, data[:cut], body=True, hang_up=True)
                return
            self._send(200, headers, data, body)

        def _json(self, obj: object, headers: dict[str, str]) -> None:
            raw = json.dumps(obj).encode()
            self._send(200, {**headers, "Content-Type": "application/json",
                             "Content-Length": str(len(raw))}, raw, body=True)  # fmt: skip

        def _error(self, status: int, code: str | None, message: str,
                   extra: dict[str, str] | None = None) -> None:  # fmt: skip
            raw = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "Content-Length": str(len(raw)),
                       "X-Error-Message": message, **(extra or {})}  # fmt: skip
            if code:
                headers["X-Error-Code"] = code
            self._send(status, headers, raw, body=self.command != "HEAD")

        def _send(self, status: int, headers: dict[str, str], payload: bytes, body: bool,
                  hang_up: bool = False) -> None:  # fmt: skip
            entry = Request(server, self.command, self.path, self.file,
                            self.headers.get("Range"), status, self._auth())  # fmt: skip
            with hub.lock:
                hub.log.append(entry)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if body and hub.bandwidth:
                for start in range(0, len(payload), 1 << 20):
                    part = payload[start : start + (1 << 20)]
                    time.sleep(max(0.0, hub.reserve(len(part)) - time.monotonic()))
                    self.wfile.write(part)
            elif body:
                self.wfile.write(payload)
            self.wfile.flush()
            if hang_up:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            for hook in list(hub.hooks):
                hook(entry)

    return Handler
