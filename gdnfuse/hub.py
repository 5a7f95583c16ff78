"""A Hugging Face Hub repo id as a conversion source.

Everything goes through ``huggingface_hub`` (its cache, ``HF_HOME``/``HF_HUB_CACHE``,
``HF_TOKEN``, ``HF_HUB_OFFLINE``, progress bars, retries and resumable transfers). The
revision is resolved to a commit sha once, and every file is then fetched at that sha, so a
branch that moves mid-download cannot mix two commits. ``headers_only`` (``inspect``,
``convert --dry-run``) fetches config.json, the index and each shard's header through HTTP
range reads into a directory of sparse stubs, so the unchanged planner can show the plan for
an 800 GB model before a byte of weights is downloaded. ``fetch_overlapped``
(``convert --overlap``) plans from those stubs and then downloads into the same cache while
the executor writes each output file as soon as its sources have arrived.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdnfuse.checkpoint import CONFIG_NAME, INDEX_NAME, SKIPPED_DIRS, SKIPPED_SUFFIXES
from gdnfuse.errors import GdnfuseError, NoSpaceError, option
from gdnfuse.outdir import existing_ancestor
from gdnfuse.plan import Plan
from gdnfuse.safetensors_file import MAX_HEADER_BYTES

# What a conversion needs: weights, index, configs (incl. generation config), tokenizer and
# chat-template files, README/LICENSE. Never weight duplicates in other formats.
ALLOW_PATTERNS = (
    "*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken",
    "README*", "LICENSE*", "NOTICE*",
)  # fmt: skip
IGNORE_PATTERNS = (
    *(f"*{s}" for s in SKIPPED_SUFFIXES),
    *(f"{d}/*" for d in SKIPPED_DIRS),
    *(f"*/{d}/*" for d in SKIPPED_DIRS),
)
TOKEN_HINT = (f"pass a token with {option('token')}, the HF_TOKEN environment variable or "
              "`hf auth login`")
FIRST_READ = 16 << 10  # one range read covers most headers; bigger ones take a second
PARALLEL_DOWNLOADS = 4  # files in flight with --overlap (each hf_hub_download is one stream)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int


@dataclass(frozen=True)
class Pinned:
    """A repo at one commit: what the layout record's ``source`` says."""

    repo_id: str
    sha: str
    requested: str

    def record(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.sha, "requested_revision": self.requested}


def is_repo_id(source: str) -> bool:
    """``org/name`` as the Hub spells it (a local path never reaches here if it exists)."""
    return _REPO_ID.fullmatch(source) is not None and ".." not in source


def is_hub_source(source: str) -> bool:
    """Whether a SOURCE means a Hub repo: the one rule for the CLI and the API.

    A path that starts with ``./``, ``../``, ``/`` or ``~``, that exists, or whose first
    component exists here is local (a typo in its last part must say "no such directory",
    not go to the Hub); anything else spelled ``org/name`` is a repo id.
    """
    if source.startswith(("./", "../", "/", "~", ".\\")) or os.path.exists(source):
        return False
    first = source.replace("\\", "/").split("/", 1)[0]
    if first and os.path.exists(first):
        return False
    return is_repo_id(source)


def fetch(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    token: str | None = None,
    headers_only: bool = False,
    out: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """A local directory holding repo ``source`` at ``revision``, and its ``source`` record.

    The full download lands in the Hugging Face cache (a second run downloads nothing);
    ``headers_only`` returns a temporary directory of sparse stubs instead. With ``out``,
    refuse before downloading when the disk cannot hold the missing files plus the output.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    requested = revision or constants.DEFAULT_REVISION
    with _hub_errors(source, requested, cache):
        api = HfApi(token=token)
        resolved = api.resolve_revision(source, revision=revision, cache_dir=cache)
        pinned = Pinned(source, resolved.resolved, requested)
        offline = constants.is_offline_mode()
        if headers_only and not offline:
            cached = _cached_snapshot(pinned, cache)
            return cached or fetch_headers(pinned, cache, token), pinned.record()
        if out is not None and not offline:
            files = list_files(pinned, cache, token)
            check_disk_space(missing_bytes(pinned, files, cache), sum(f.size for f in files),
                             cache, out)  # fmt: skip
        path = snapshot_download(
            source, revision=resolved, cache_dir=cache, token=token,
            allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS),
        )  # fmt: skip
    return Path(path), pinned.record()


def fetch_overlapped(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    token: str | None = None,
    out: Path,
    parallel: int = PARALLEL_DOWNLOADS,
) -> tuple[Path, dict[str, Any], Downloads | None]:
    """Like :func:`fetch`, but returns at once with a directory of stubs to plan from and the
    :class:`Downloads` that will fill the cache's snapshot while the conversion runs.

    Nothing to overlap (offline, or everything already cached): the snapshot and ``None``,
    exactly what :func:`fetch` gives. Disk space is checked first, as :func:`fetch` does.
    """
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        path, record = fetch(source, revision=revision, cache_dir=cache_dir, token=token, out=out)
        return path, record, None
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    requested = revision or constants.DEFAULT_REVISION
    with _hub_errors(source, requested, cache):
        resolved = HfApi(token=token).resolve_revision(source, revision=revision, cache_dir=cache)
        pinned = Pinned(source, resolved.resolved, requested)
        _cache_tree(pinned, cache, token)
        files = list_files(pinned, cache, token)
        missing = missing_bytes(pinned, files, cache)
        if missing == 0:  # where snapshot_download would return without a request
            return _snapshot_dir(pinned, cache), pinned.record(), None
        check_disk_space(missing, sum(f.size for f in files), cache, out)
        stub = fetch_headers(pinned, cache, token)
    return stub, pinned.record(), Downloads(pinned, cache, token, files, parallel)


class DownloadStopped(Exception):
    """Raised inside a download thread to abandon its transfer (the run is stopping)."""


class Downloads:
    """The selection of a pinned repo, fetched with ``hf_hub_download`` into the Hugging Face
    cache (same files, sha and layout as ``snapshot_download``), ``parallel`` at a time in the
    order a plan first reads them; the executor waits per file (:meth:`wait_for`).

    Fail-fast: the first failed download stops the rest and is raised to every waiter. A
    stop abandons transfers at their next chunk (a rerun resumes their ``.incomplete``).
    Threads are daemons, so Ctrl-C never waits for a transfer to finish.
    """

    def __init__(
        self, pinned: Pinned, cache: Path, token: str | None, files: Iterable[RemoteFile],
        parallel: int = PARALLEL_DOWNLOADS,
    ) -> None:  # fmt: skip
        self.root = _snapshot_dir(pinned, cache)
        self._pinned, self._cache, self._token = pinned, cache, token
        self._paths = {str(self.root / f.path): f.path for f in files}
        self._futures: dict[str, Future[None]] = {p: Future() for p in self._paths}
        self._parallel = max(1, parallel)
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def start(self, plan: Plan) -> None:
        """Begin downloading: what ``plan``'s first files read first, then the rest."""
        needed = [p for p in read_order(plan) if p in self._paths]
        self._queue.extend(dict.fromkeys([*needed, *self._paths]))
        self._threads = [threading.Thread(target=self._work, name=f"gdnfuse-download-{i}",
                                          daemon=True) for i in range(self._parallel)]  # fmt: skip
        for t in self._threads:
            t.start()

    def wait_for(self, path: str, cancel: threading.Event | None = None) -> None:
        """Block until ``path`` is in the cache; return early once ``cancel`` is set (and stop
        the downloads); raise the first download failure. Paths not downloaded return at once."""
        future = self._futures.get(path)
        if future is None:
            return
        while not future.done():
            if cancel is not None and cancel.is_set():
                self.stop()
                return
            if self._error is not None:
                raise self._error
            wait([future], timeout=0.1)
        if self._error is not None:
            raise self._error
        if future.exception() is not None and not (cancel is not None and cancel.is_set()):
            raise GdnfuseError("downloads were stopped before this file arrived", path=path)

    def finish(self) -> None:
        """Wait for every file of the selection (a complete cache snapshot)."""
        for path in self._paths:
            self.wait_for(path)

    def stop(self) -> None:
        """Start no more transfers (queued files fail as stopped) and abandon running ones."""
        self._stop.set()
        with self._lock:
            while self._queue:
                self._futures[self._queue.popleft()].set_exception(DownloadStopped())

    def _work(self) -> None:
        from huggingface_hub import hf_hub_download

        bar = _stoppable_bar(self._stop)
        while not self._stop.is_set():
            with self._lock:
                if not self._queue:
                    return
                path = self._queue.popleft()
            try:
                with _hub_errors(self._pinned.repo_id, self._pinned.requested, self._cache):
                    hf_hub_download(self._pinned.repo_id, self._paths[path],
                                    revision=self._pinned.sha, cache_dir=self._cache,
                                    token=self._token, tqdm_class=bar)  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - handed to the waiting threads
                with self._lock:
                    if self._error is None and not isinstance(e, DownloadStopped):
                        self._error = e
                self._futures[path].set_exception(e)
                self.stop()
            else:
                self._futures[path].set_result(None)


def read_order(plan: Plan) -> list[str]:
    """Source paths in the order a run of ``plan`` first needs them: the executor starts its
    files largest first (``executor._run_parallel``), then the ``last`` ones."""
    files = [*sorted((f for f in plan.files if not f.last), key=lambda f: -f.size),
             *(f for f in plan.files if f.last)]  # fmt: skip
    order = (s for f in files for s in (f.whole_source, *(e.source for e in f.extents)))
    return [s for s in dict.fromkeys(order) if s is not None]


def _cache_tree(pinned: Pinned, cache: Path, token: str | None) -> None:
    """Store the commit's file listing where ``snapshot_download`` stores it (``trees/<sha>.json``,
    written before downloading, as it does), so the cache ``--overlap`` leaves is the one a
    download-then-convert leaves: offline runs check completeness against it."""
    from huggingface_hub import HfApi, get_cached_repo_tree
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        get_cached_repo_tree(pinned.repo_id, revision=pinned.sha, cache_dir=cache)
        return
    except CachedRepoTreeNotFoundError:
        pass
    tree = HfApi(token=token).list_repo_tree(pinned.repo_id, revision=pinned.sha, recursive=True)
    entries = {
        f.path: TreeCacheEntry(size=f.size, blob_id=f.blob_id, xet_hash=f.xet_hash,
                               lfs_sha256=f.lfs.sha256 if f.lfs else None,
                               lfs_size=f.lfs.size if f.lfs else None)
        for f in tree if isinstance(f, RepoFile)
    }  # fmt: skip
    write_tree_cache(str(_snapshot_dir(pinned, cache).parent.parent), pinned.sha, entries)


def _stoppable_bar(stop: threading.Event) -> type:
    """A silent tqdm for ``hf_hub_download`` (bars would garble the conversion's progress)
    whose per-chunk update abandons the transfer once ``stop`` is set."""
    from huggingface_hub.utils import tqdm

    class StoppableBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> bool | None:
            if stop.is_set():
                raise DownloadStopped
            return super().update(n)

    return StoppableBar


def list_files(pinned: Pinned, cache: Path, token: str | None = None) -> list[RemoteFile]:
    """The files a conversion needs, with sizes (from the cached tree listing if there is one)."""
    from huggingface_hub import HfApi, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.hf_api import RepoFile

    tree: Iterable[Any]
    try:
        tree = get_cached_repo_tree(pinned.repo_id, revision=pinned.sha, cache_dir=cache)
    except CachedRepoTreeNotFoundError:
        tree = HfApi(token=token).list_repo_tree(pinned.repo_id, revision=pinned.sha,
                                                 recursive=True)  # fmt: skip
    files = {f.path: RemoteFile(f.path, f.size) for f in tree if isinstance(f, RepoFile)}
    return [files[p] for p in wanted(files)]


def wanted(paths: Iterable[str]) -> list[str]:
    """The repo paths a conversion downloads (ALLOW_PATTERNS minus IGNORE_PATTERNS)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(list(paths), allow_patterns=list(ALLOW_PATTERNS),
                                    ignore_patterns=list(IGNORE_PATTERNS)))  # fmt: skip


def missing_bytes(pinned: Pinned, files: list[RemoteFile], cache: Path) -> int:
    """Bytes of ``files`` not yet in the cache's snapshot of ``pinned``: what a download costs."""
    snap = _snapshot_dir(pinned, cache)
    return sum(f.size for f in files if not (snap / f.path).is_file())


def check_disk_space(
    download: int, output: int, cache: Path, out: Path,
    disk_usage: Callable[[Path], Any] = shutil.disk_usage,
) -> None:  # fmt: skip
    """Refuse before downloading when the cache and output filesystems cannot hold it all.

    ``output`` is the size of the downloaded selection: a conversion writes about as many
    bytes as it reads (``--link`` would need less; convert checks that exactly later).
    """
    cache_fs, out_fs = existing_ancestor(cache), existing_ancestor(out)
    if cache_fs.stat().st_dev == out_fs.stat().st_dev:
        needs = [(cache_fs, download + output)]
    else:
        needs = [(cache_fs, download), (out_fs, output)]
    for where, needed in needs:
        free = disk_usage(where).free
        if needed > free:
            raise NoSpaceError(
                f"not enough free space: {download / 1e9:.2f} GB to download into {cache} plus "
                f"{output / 1e9:.2f} GB of output need {needed / 1e9:.2f} GB on that filesystem, "
                f"but only {free / 1e9:.2f} GB are free",
                path=str(where), needed=needed, free=free,
            )


def fetch_headers(pinned: Pinned, cache: Path, token: str | None = None) -> Path:
    """A temporary directory of stubs: config.json and the index in full, every shard's header
    at its real offset in a sparse file of the real size, other files as empty sparse files.

    Removed when the process exits. Reads only the header bytes of each shard.
    """
    from huggingface_hub import hf_hub_download

    files = list_files(pinned, cache, token)
    stub = Path(tempfile.mkdtemp(prefix=f"gdnfuse-{pinned.repo_id.replace('/', '--')}-"))
    atexit.register(shutil.rmtree, stub, ignore_errors=True)

    def one(f: RemoteFile) -> None:
        dst = stub / f.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f.path in (CONFIG_NAME, INDEX_NAME):
            src = hf_hub_download(pinned.repo_id, f.path, revision=pinned.sha, cache_dir=cache,
                                  token=token)  # fmt: skip
            shutil.copyfile(src, dst)
            return
        head = read_shard_header(_url(pinned, f.path), f.size, token) if f.path.endswith(
            ".safetensors") else b""  # fmt: skip
        with open(dst, "wb") as fh:
            fh.write(head)
            fh.truncate(f.size)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, files))
    return stub


def read_shard_header(url: str, size: int, token: str | None = None,
                      first: int = FIRST_READ) -> bytes:  # fmt: skip
    """The 8-byte length and the JSON header of the safetensors file at ``url`` (``size`` bytes)."""
    if size < 8:
        raise GdnfuseError(f"shard is {size} bytes, too short for a safetensors header", path=url)
    head = read_range(url, 0, min(size, first) - 1, size, token)
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise GdnfuseError(f"header length {n} does not fit a {size}-byte shard", path=url)
    if 8 + n > len(head):
        head += read_range(url, len(head), 8 + n - 1, size, token)
    return head[: 8 + n]


def read_range(url: str, start: int, end: int, size: int | None = None,
               token: str | None = None) -> bytes:  # fmt: skip
    """Bytes ``start..end`` (inclusive) of ``url``, following the Hub's redirect to its CDN.

    A 206 must carry the matching ``Content-Range``; a 200 means the server ignored the
    range (olah does), so only the first ``end + 1`` bytes of that stream are read.
    """
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    headers = build_hf_headers(token=token)
    headers.update({"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"})
    with http_stream_backoff("GET", url, headers=headers, follow_redirects=True) as r:
        hf_raise_for_status(r)
        if r.status_code == 206:
            got = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", "").strip())
            total = got and got[3] != "*" and int(got[3])
            if not got or (int(got[1]), int(got[2])) != (start, end) or (size and total != size):
                raise GdnfuseError(
                    f"asked for bytes {start}-{end} of {size} but the server answered "
                    f"Content-Range {r.headers.get('Content-Range')!r}", path=url,
                )  # fmt: skip
            data = r.read()
        elif r.status_code == 200:  # range not honoured: the body starts at byte 0
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > end:
                    break
            data = bytes(buf[start : end + 1])
        else:
            raise GdnfuseError(f"HTTP {r.status_code} to a range read", path=url)
    if len(data) != end - start + 1:
        raise GdnfuseError(f"asked for bytes {start}-{end}, got {len(data)} bytes", path=url)
    return data


def _url(pinned: Pinned, path: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(pinned.repo_id, path, revision=pinned.sha)


def _snapshot_dir(pinned: Pinned, cache: Path) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=pinned.repo_id, repo_type="model")
    return cache / folder / "snapshots" / pinned.sha


def _cached_snapshot(pinned: Pinned, cache: Path) -> Path | None:
    """The cached snapshot if an earlier download completed it (then no header reads at all)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        get_cached_repo_tree(pinned.repo_id, revision=pinned.sha, cache_dir=cache)
    except CachedRepoTreeNotFoundError:
        return None
    files = list_files(pinned, cache)
    return _snapshot_dir(pinned, cache) if missing_bytes(pinned, files, cache) == 0 else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _root_cause(e: BaseException) -> str:
    """The innermost cause, as ``Type: message``: huggingface_hub's own text around it says
    again what gdnfuse's message already said (unreachable, not in the cache)."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    return f"{type(e).__name__}: {_one_line(e)}"


@contextmanager
def _hub_errors(repo_id: str, revision: str, cache: Path) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line GdnfuseErrors that say what to do."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    where = f"{repo_id}@{revision}"
    try:
        yield
    except GatedRepoError as e:
        denied = e.response is not None and e.response.status_code == 403
        raise GdnfuseError(
            f"{repo_id} is gated and "
            + ("your token has not been granted access" if denied else "no valid token was sent")
            + f": accept its conditions at {constants.ENDPOINT}/{repo_id}, then {TOKEN_HINT}"
        ) from None
    except RepositoryNotFoundError:
        raise GdnfuseError(
            f"no local directory {repo_id} exists, and no repository {repo_id} was found on "
            f"{constants.ENDPOINT} either (a typo? if it is a private repo, {TOKEN_HINT})"
        ) from None
    except RevisionNotFoundError:
        raise GdnfuseError(
            f"revision {revision!r} not found in {repo_id} (use a branch, tag or commit sha)"
        ) from None
    except (RevisionResolutionError, LocalEntryNotFoundError) as e:
        local = f"no local directory {repo_id}; as a Hub repo: "
        if constants.is_offline_mode():
            raise GdnfuseError(
                f"{local}HF_HUB_OFFLINE is set and {where} is not (completely) in the Hugging "
                f"Face cache {cache}: run once online, or unset HF_HUB_OFFLINE"
            ) from None
        raise GdnfuseError(
            f"{local}cannot reach {constants.ENDPOINT} and {where} is not (completely) in the "
            f"cache {cache} ({_root_cause(e)})"
        ) from None
    except HfHubHTTPError as e:
        raise GdnfuseError(f"Hub request for {where} failed: {_one_line(e)}") from None
    except (httpx2.HTTPError, OSError) as e:
        raise GdnfuseError(f"download of {where} failed: {_one_line(e)}") from None
