"""Execute a :class:`~gdnfuse.plan.Plan`: copy byte ranges into new files, crash-safely.

Knows nothing about models. Each output file is written to a temporary name in the
output directory and renamed when complete; files marked ``last`` (config, index) are
written after all others, so an interrupted run never looks finished. A journal records
finished files, so ``resume`` redoes only what is missing and yields the same bytes.

Why hand-written rather than a library: no library streams byte *ranges* of one file into
another. ``os.copy_file_range`` copies inside the kernel (no user-space buffer; a
reflink on filesystems that share extents), which keeps conversion at disk speed with
constant memory; a large-buffer ``pread``/``pwrite`` is the fallback where it is unsupported.

Failures: a file being written is a temporary that is removed on every error and on
Ctrl-C; the journal stays after any failure once writing has begun (the run can be
finished with ``resume`` after freeing space or fixing the cause) and is removed on
success. A kill -9 leaves temporaries too; ``resume`` and ``overwrite`` remove them.

gdnfuse's own files live in ``OUT/.gdnfuse/`` (no side file of a checkpoint can collide
with them): ``lock`` (an advisory ``flock`` through filelock, held for the whole run, so a
second run on the same output is refused at once, and released by the kernel when a killed
run dies), ``owner`` (who holds it), ``journal`` and ``tmp/`` (temporaries, unique per run).
The journal lists every name the output may hold from gdnfuse (this plan's and any earlier
run's) *before* ``overwrite`` removes anything, so an interrupted run or an interrupted
clean-up never leaves stale shards behind a later ``overwrite``.

Safety: an existing output file is never opened for writing. New bytes always go to a
freshly created temporary file that is renamed over the old name, so an output file that
is a hard link to a source file (``link`` mode) can never write through into the source.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from gdnfuse.errors import GdnfuseError, OutputError, option
from gdnfuse.plan import Extent, OutputFile, Plan

STATE_DIR = ".gdnfuse"
JOURNAL_NAME = f"{STATE_DIR}/journal"
LOCK_NAME = f"{STATE_DIR}/lock"
OWNER_NAME = f"{STATE_DIR}/owner"
TMP_DIR = f"{STATE_DIR}/tmp"
CHUNK = 64 << 20  # bytes per copy call: bounds latency of progress and cancellation
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}

ProgressFn = Callable[[int], None]
# Blocks until source ``path`` is complete on disk (e.g. still downloading); returns early
# once the event is set (the run is stopping); raises when the source will never arrive.
WaitFn = Callable[[str, threading.Event], None]


class Cancelled(Exception):
    """Raised inside workers once the run is being stopped (SIGINT or another failure)."""


@dataclass(frozen=True)
class ExecuteOptions:
    workers: int = 4
    link: bool = False  # hard-link unchanged files instead of copying them
    resume: bool = False
    overwrite: bool = False
    checksum: bool = False  # sha256 of every output file, for the manifest
    fsync: bool = False  # fsync each file before its rename (power-loss safety)


@dataclass(frozen=True)
class FileResult:
    name: str
    size: int
    linked: bool
    resumed: bool
    sha256: str | None


def tmp_path(out: Path, name: str, run_id: str) -> Path:
    """A temporary for output ``name``, unique to this run (never shared with another)."""
    key = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return out / TMP_DIR / f"{run_id}-{key}"


def _lock(out: Path) -> FileLock:
    """Hold ``OUT/.gdnfuse/lock`` for the whole run, or refuse naming the run that holds it."""
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(e, out / STATE_DIR) from None
    lock = FileLock(out / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise _held(out) from None
    return lock


def _held(out: Path) -> GdnfuseError:
    try:
        who = json.loads((out / OWNER_NAME).read_text())
        holder = f"pid {who['pid']}, started {who['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        holder = "another process"
    return OutputError(
        f"another gdnfuse run ({holder}) is writing this output; wait for it or stop it",
        path=str(out),
    )


def _refuse_if_held(out: Path) -> None:
    """A live run's output is refused as such, before any other check reads its files."""
    if not (out / LOCK_NAME).exists():
        return
    probe = FileLock(out / LOCK_NAME, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        raise _held(out) from None
    probe.release()


def _claim(out: Path) -> None:
    """Say who holds the lock (after the checks: a refused run changes nothing)."""
    owner = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    staged = out / f"{OWNER_NAME}.new"  # only the lock holder writes it
    try:  # renamed into place: a second run never reads a half-written owner
        staged.write_text(json.dumps(owner) + "\n")
        os.replace(staged, out / OWNER_NAME)
    except OSError as e:
        raise _write_error(e, out / OWNER_NAME) from None


def execute(
    plan: Plan,
    out_dir: str | os.PathLike[str],
    options: ExecuteOptions = ExecuteOptions(),
    progress: ProgressFn | None = None,
    before_last: Callable[[Sequence[FileResult]], Sequence[OutputFile]] | None = None,
    stale: Iterable[str] = (),
    wait_for: WaitFn | None = None,
    sources: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[FileResult, ...]:
    """Write every file of ``plan`` under ``out_dir``; returns one result per file.

    ``settings``: the caller's options that shaped the plan (``{"tp": 2, ...}``), kept in
    the journal so that a mismatching ``resume`` can say which one differs.

    ``sources``: what identifies each source file (recorded in the journal; ``resume``
    refuses when it changed, since the plan would then read other bytes).

    ``before_last`` may return more files (a manifest of the results so far); they are
    written after the bulk and before the plan's ``last`` files. ``stale``: files of an
    earlier output that ``overwrite`` removes (after unmarking completion, before writing).
    ``wait_for``: called for each source of a file before that file is begun, so a file
    can be written as soon as its own sources exist (sources still arriving).
    """
    out = Path(out_dir)
    head = journal_head(plan, options, sources, settings)
    check_output_dir(out, options)
    new_out, new_state = not out.exists(), not (out / STATE_DIR).exists()
    held = _lock(out)
    try:
        results = _execute(plan, out, options, head, progress, before_last, stale, wait_for)
        _remove_state(out, out_too=False)  # done: the output holds nothing of gdnfuse's state
        return results
    except BaseException:
        if new_state and not (out / JOURNAL_NAME).exists():  # refused before writing anything
            _remove_state(out, out_too=new_out)
        raise
    finally:
        held.release()


def _remove_state(out: Path, out_too: bool) -> None:
    for name in (LOCK_NAME, OWNER_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    with contextlib.suppress(OSError):
        (out / STATE_DIR).rmdir()
        if out_too:
            out.rmdir()


def _execute(
    plan: Plan,
    out: Path,
    options: ExecuteOptions,
    head: Mapping[str, Any],
    progress: ProgressFn | None,
    before_last: Callable[[Sequence[FileResult]], Sequence[OutputFile]] | None,
    stale: Iterable[str],
    wait_for: WaitFn | None,
) -> tuple[FileResult, ...]:
    done = _prepare(out, plan, head, options, stale)
    _claim(out)
    run_id = f"{os.getpid()}-{os.urandom(4).hex()}"
    block = fs_block(out)  # clone granularity of the output's filesystem
    journal = open(out / JOURNAL_NAME, "a")  # noqa: SIM115 - kept open for the whole run
    lock = threading.Lock()
    cancel = threading.Event()
    report = progress or (lambda n: None)

    def run(f: OutputFile) -> FileResult:
        if f.name in done:
            report(f.size)
            return FileResult(f.name, f.size, done[f.name].get("linked", False), True,
                              done[f.name].get("sha256"))  # fmt: skip
        if wait_for is not None:
            for source in dict.fromkeys([f.whole_source, *(e.source for e in f.extents)]):
                if source is not None:
                    wait_for(source, cancel)
                if cancel.is_set():
                    raise Cancelled()
        result = _write_file(f, out, options, report, cancel, run_id, block)
        with lock:
            try:
                journal.write(json.dumps({"done": f.name, "linked": result.linked,
                                          "sha256": result.sha256}) + "\n")  # fmt: skip
                journal.flush()
            except OSError as e:
                raise _write_error(e, out / JOURNAL_NAME) from None
        return result

    try:
        results = _run_parallel([f for f in plan.files if not f.last], run, options.workers, cancel)
        extra = list(before_last(results)) if before_last else []
        results += [run(f) for f in [*extra, *(f for f in plan.files if f.last)]]
    finally:
        journal.close()
    if options.fsync:  # the renames themselves survive a power loss only once the dirs are
        for d in sorted({(out / f.name).parent for f in plan.files}, key=str):
            _fsync_dir(d)
    for name in (JOURNAL_NAME, OWNER_NAME):
        (out / name).unlink()
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    order = {f.name: i for i, f in enumerate(plan.files)}
    return tuple(sorted(results, key=lambda r: order.get(r.name, len(order))))


def journal_head(
    plan: Plan,
    options: ExecuteOptions,
    sources: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the plan (every output byte),
    the options that decide how files are made (linked or copied, hashed or not) and the
    identity of every source file."""
    return {"fingerprint": plan.fingerprint(), "link": options.link,
            "checksum": options.checksum, "sources": dict(sources or {}),
            "settings": dict(settings or {})}  # fmt: skip


def _read_journal(out: Path) -> tuple[dict[str, Any], set[str], dict[str, dict]]:
    """Head, every name gdnfuse may have written here, and the ``done`` entries."""
    try:
        lines = (out / JOURNAL_NAME).read_text().splitlines()
    except OSError:
        return {}, set(), {}
    head: dict[str, Any] = {}
    owned: set[str] = set()
    done: dict[str, dict] = {}
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut by the kill: that file is redone
            continue
        if not isinstance(entry, dict):
            continue
        if i == 0:
            head = entry
        elif isinstance(entry.get("owned"), list):
            owned |= {n for n in entry["owned"] if isinstance(n, str)}
        elif isinstance(entry.get("done"), str):
            done[entry["done"]] = entry
            owned.add(entry["done"])
    return head, owned, done


def finished_files(out: Path, expected_head: Mapping[str, Any]) -> dict[str, dict]:
    """Files an interrupted run with this plan finished (journal entries whose file exists).

    Raises when the journal belongs to another plan, options or source: resuming would mix
    outputs.
    """
    head, _, done = _read_journal(out)
    if head.get("sources") == {}:  # began before its sources existed (--overlap, from the
        # Hub cache, whose blobs are named by their hash): nothing to compare them with
        expected_head = {**expected_head, "sources": {}}
    # The settings only explain a mismatch; the fingerprint decides.
    same = {k: v for k, v in head.items() if k != "settings"}
    if same != {k: v for k, v in expected_head.items() if k != "settings"}:
        raise GdnfuseError(_resume_mismatch(head, expected_head), path=str(out))
    return {name: e for name, e in done.items() if (out / name).is_file()}


def _resume_mismatch(head: Mapping[str, Any], want: Mapping[str, Any]) -> str:
    """Say what differs between the interrupted run and this one."""
    then, now = head.get("sources") or {}, want.get("sources") or {}
    changed = sorted(p for p in set(then) & set(now) if then[p] != now[p])
    if changed:
        return (
            f"{option('resume', True)}: source file {changed[0]} changed since the interrupted "
            "run (size, mtime, inode or header differ), so the finished files may hold other "
            f"bytes; use {option('overwrite', True)} to start again"
        )
    was, given = head.get("settings") or {}, want.get("settings") or {}
    for key in sorted(set(was) | set(given)):
        if was.get(key) != given.get(key):
            name = key.removeprefix("--")  # journals written before this keying said "--tp"
            return (
                f"{option('resume', True)} with {option(name, given.get(key))} but the "
                f"interrupted run used {option(name, was.get(key))}; rerun with the same "
                f"options, or {option('overwrite', True)} to start again"
            )
    for key in ("link", "checksum"):
        if key in head and head.get(key) != want.get(key):
            return (
                f"{option('resume', True)} with {option(key, want.get(key))} but the "
                f"interrupted run used {option(key, head.get(key))}; rerun with the same "
                f"options, or {option('overwrite', True)}"
            )
    return (
        f"{option('resume', True)} with different options or inputs than the interrupted run; "
        f"rerun with the same options, or use {option('overwrite', True)} to start again"
    )


def _entries(out: Path) -> list[str]:
    """What is in ``out`` besides gdnfuse's own lock: an interrupted run's journal counts."""
    try:
        names = [n for n in os.listdir(out) if n != STATE_DIR]
        return names + ([JOURNAL_NAME] if (out / JOURNAL_NAME).is_file() else [])
    except FileNotFoundError:
        return []
    except OSError as e:
        raise GdnfuseError(f"cannot read: {e.strerror or e}", path=str(out)) from None


def _nothing_to_resume(out: Path) -> str:
    last = [n for n in ("config.json", "model.safetensors.index.json") if (out / n).exists()]
    if len(last) == 2 and (out / "gdnfuse-manifest.json").exists():
        return ("nothing to resume: this output is complete (check it with verify; "
                f"{option('overwrite', True)} to convert again)")  # fmt: skip
    return (f"nothing to resume: no interrupted gdnfuse run here (use {option('overwrite', True)} "
            "to replace the directory's conversion)")  # fmt: skip


def _not_empty() -> str:
    return (f"output directory is not empty; pass {option('overwrite', True)} to replace it or "
            f"{option('resume', True)} to finish an interrupted run")  # fmt: skip


def check_output_dir(out: Path, options: ExecuteOptions) -> None:
    """Refuse before creating anything (not even the lock) in a directory we must not touch."""
    if out.exists() and not out.is_dir():
        raise OutputError("output exists and is not a directory", path=str(out))
    _refuse_if_held(out)
    if _entries(out) and options.resume and not (out / JOURNAL_NAME).is_file():
        raise OutputError(_nothing_to_resume(out), path=str(out))
    if _entries(out) and not (options.overwrite or options.resume):
        raise OutputError(_not_empty(), path=str(out))


def _prepare(
    out: Path, plan: Plan, head: Mapping[str, Any], options: ExecuteOptions, stale: Iterable[str]
) -> dict[str, dict]:
    """Check the output directory against the options (under the lock); returns files done."""
    journal = out / JOURNAL_NAME
    names = [f.name for f in plan.files]
    if options.resume and journal.is_file():
        done = finished_files(out, head)
        _remove_temporaries(out)
        return done
    _, owned, _ = _read_journal(out)  # an interrupted run's files (or an interrupted clean-up's)
    old = sorted((set(stale) | owned) - {JOURNAL_NAME, OWNER_NAME, LOCK_NAME})
    if _entries(out):
        if options.resume:
            raise GdnfuseError(_nothing_to_resume(out), path=str(out))
        if not options.overwrite:
            raise OutputError(_not_empty(), path=str(out))
    try:  # name everything gdnfuse may leave here before removing any of it
        listed = {"owned": sorted(set(names) | set(old))}
        fresh = journal.with_name("journal.new")  # whole or absent, whenever a kill lands
        fresh.write_text(json.dumps(dict(head)) + "\n" + json.dumps(listed) + "\n")
        os.replace(fresh, journal)
    except OSError as e:
        journal.unlink(missing_ok=True)
        raise _write_error(e, journal) from None
    if options.overwrite:
        # Unmark completion first: from here on the directory must not look finished.
        for name in [*(f.name for f in plan.files if f.last), *old]:
            _remove_old(out, name)
    _remove_temporaries(out)
    return {}


def _remove_old(out: Path, name: str) -> None:
    """Remove a file of an earlier output; never anything outside ``out``, never a folder."""
    rel = Path(name)
    path = out / rel
    if (
        rel.is_absolute()
        or ".." in rel.parts
        or not path.parent.resolve().is_relative_to(out.resolve())
    ):
        return  # a manifest naming files elsewhere is not ours to act on
    if path.is_dir() and not path.is_symlink():
        raise GdnfuseError(
            "a directory is where the output needs a file; remove it", path=str(path)
        )
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise _write_error(e, path) from None


def _remove_temporaries(out: Path) -> None:
    """Every run's temporaries: safe under the lock, since no other run is alive."""
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    (out / TMP_DIR).mkdir(parents=True, exist_ok=True)


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing ancestor: where a not-yet-created output will live."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def fs_block(path: Path) -> int:
    """Block size of the filesystem holding ``path`` (or its nearest existing parent)."""
    try:
        return os.statvfs(existing_ancestor(path)).f_bsize or 4096
    except OSError:
        return 4096


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run_parallel(
    files: Sequence[OutputFile],
    fn: Callable[[OutputFile], FileResult],
    workers: int,
    cancel: threading.Event,
) -> list[FileResult]:
    """Largest files first across ``workers`` threads (copy calls release the GIL)."""
    ordered = sorted(files, key=lambda f: -f.size)
    # Not a `with` block: its exit waits for the workers before an `except` could cancel
    # them, so a Ctrl-C landing while the files are submitted would wait for every worker
    # to finish (on a Hub source: for the downloads). Cancel first, then wait.
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    futures: list[Future[FileResult]] = []
    try:
        for f in ordered:
            futures.append(pool.submit(fn, f))
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in finished:
            if fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]
    except BaseException:
        cancel.set()
        for fut in futures:
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
    return [fut.result() for fut in futures]


def _write_file(
    f: OutputFile,
    out: Path,
    options: ExecuteOptions,
    report: ProgressFn,
    cancel: threading.Event,
    run_id: str,
    block: int,
) -> FileResult:
    final = out / f.name
    tmp = tmp_path(out, f.name, run_id)
    linked = False
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a stale temporary may be a hard link: never reuse it
        if options.link and f.whole_source is not None:
            linked = _try_link(f.whole_source, tmp)
        if linked:
            report(f.size)
        else:
            _assemble(f, tmp, options.fsync, report, cancel, block)
        digest = _sha256(tmp) if options.checksum else None
        os.replace(tmp, final)
        # rename(2) does nothing when both names are links to one inode (re-linking over an
        # earlier link): drop the temporary name, which removes no data.
        tmp.unlink(missing_ok=True)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(e, final) from None
        raise
    return FileResult(f.name, f.size, linked, False, digest)


def _write_error(e: OSError, path: Path) -> GdnfuseError:
    """One clear line for a failed write; a full disk says how to finish the run."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"no space left on the device (ENOSPC); free space and rerun with "
            f"{option('resume', True)}",
            path=str(path),
        )
    return OutputError(f"cannot write: {e.strerror or e}", path=str(path))


def _try_link(source: str, tmp: Path) -> bool:
    try:  # link(2) links a symlink itself (Hub snapshots are symlinks): link its target
        os.link(os.path.realpath(source), tmp)
    except OSError as e:  # another filesystem, or links not allowed: copy instead
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            return False
        raise
    return True


def _assemble(
    f: OutputFile,
    tmp: Path,
    fsync: bool,
    report: ProgressFn,
    cancel: threading.Event,
    block: int = 4096,
) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(f.prefix)
        while view:
            view = view[os.write(fd, view) :]
        position = len(f.prefix)
        report(position)
        sources: dict[str, int] = {}
        try:
            for extent in f.extents:
                if extent.source not in sources:
                    sources[extent.source] = _open_source(extent.source)
                _copy_extent(sources[extent.source], fd, extent, position, report, cancel, block)
                position += extent.length
        finally:
            for sfd in sources.values():
                os.close(sfd)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _open_source(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise GdnfuseError(f"cannot read source: {e.strerror or e}", path=path) from None


def _copy_extent(
    src: int,
    dst: int,
    e: Extent,
    dst_offset: int,
    report: ProgressFn,
    cancel: threading.Event,
    block: int = 4096,
) -> None:
    """Copy one extent. When it lands congruent to its source modulo the block size, it is
    copied as head / whole blocks / tail: copy_file_range clones (XFS, btrfs, OpenZFS 2.2+)
    only a request whose offsets and length are all block multiples, and copies the rest
    as any other filesystem does."""
    head = -dst_offset % block if (dst_offset - e.offset) % block == 0 else e.length
    middle = (e.length - min(head, e.length)) // block * block
    pieces = (min(head, e.length), middle, e.length - min(head, e.length) - middle)
    offset = e.offset
    for n in pieces:
        if n:
            _copy_range(src, dst, e, offset, dst_offset, n, report, cancel)
            offset, dst_offset = offset + n, dst_offset + n


def _copy_range(
    src: int,
    dst: int,
    e: Extent,
    offset: int,
    dst_offset: int,
    remaining: int,
    report: ProgressFn,
    cancel: threading.Event,
) -> None:
    use_kernel = True
    while remaining:
        if cancel.is_set():
            raise Cancelled()
        n = min(remaining, CHUNK)  # CHUNK is a multiple of every block size: clones stay whole
        if use_kernel:
            try:
                copied = os.copy_file_range(src, dst, n, offset, dst_offset)
            except OSError as err:
                if err.errno not in _FALLBACK_ERRNOS:
                    raise
                use_kernel = False
                continue
        else:
            copied = _copy_buffered(src, dst, n, offset, dst_offset)
        if copied == 0:
            raise GdnfuseError(
                f"source ended at byte {offset}, before the {e.length}-byte range at "
                f"{e.offset} (file changed or truncated during conversion?)",
                path=e.source,
            )
        offset += copied
        dst_offset += copied
        remaining -= copied
        report(copied)


def _copy_buffered(src: int, dst: int, n: int, offset: int, dst_offset: int) -> int:
    """Fallback: one large pread and pwrite (filesystems without copy_file_range)."""
    data = os.pread(src, min(n, 16 << 20), offset)
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(dst, view[written:], dst_offset + written)
    return len(data)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
