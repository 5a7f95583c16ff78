"""Execute a :class:`~gdnfuse.plan.Plan`: write every planned file into an output directory,
crash-safely and in parallel.

Knows nothing about models, engines or which files a checkpoint holds: the plan says what
each file is, and which are written ``last`` (after all others, so an interrupted run never
looks finished). How one file is made is :mod:`gdnfuse.copier`; the directory's rules, lock
and journal are :mod:`gdnfuse.outdir`. The journal records finished files, so ``resume``
redoes only what is missing and yields the same bytes.

Failures: the journal stays after any failure once writing has begun (the run can be
finished with ``resume`` after freeing space or fixing the cause) and is removed on
success. A kill -9 leaves temporaries too; ``resume`` and ``overwrite`` remove them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdnfuse import outdir
from gdnfuse.copier import Cancelled, ProgressFn, write_file
from gdnfuse.plan import OutputFile, Plan

# Blocks until source ``path`` is complete on disk (e.g. still downloading); returns early
# once the event is set (the run is stopping); raises when the source will never arrive.
WaitFn = Callable[[str, threading.Event], None]

__all__ = ["Cancelled", "ExecuteOptions", "FileResult", "ProgressFn", "WaitFn", "execute"]


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


def journal_head(
    plan: Plan,
    options: ExecuteOptions,
    sources: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The journal head this run writes (and a ``resume`` must find): see
    :func:`gdnfuse.outdir.journal_head`."""
    return outdir.journal_head(plan.fingerprint(), link=options.link, checksum=options.checksum,
                               sources=sources, settings=settings)  # fmt: skip


def check_output_dir(out: Path, plan: Plan, options: ExecuteOptions) -> None:
    """Refuse before creating anything in a directory this run must not touch."""
    outdir.check_output_dir(out, resume=options.resume, overwrite=options.overwrite,
                            complete=[f.name for f in plan.files if f.last])  # fmt: skip


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
    check_output_dir(out, plan, options)
    new_out, new_state = not out.exists(), not (out / outdir.STATE_DIR).exists()
    held = outdir.lock(out)
    try:
        results = _execute(plan, out, options, head, progress, before_last, stale, wait_for)
        outdir.remove_state(out, out_too=False)  # done: nothing of gdnfuse's state is left
        return results
    except BaseException:
        if new_state and not (out / outdir.JOURNAL_NAME).exists():  # refused before writing
            outdir.remove_state(out, out_too=new_out)
        raise
    finally:
        held.release()


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
    done = outdir.prepare(
        out, [f.name for f in plan.files], head, resume=options.resume,
        overwrite=options.overwrite, stale=stale, last=[f.name for f in plan.files if f.last],
    )  # fmt: skip
    outdir.claim(out)
    run_id = f"{os.getpid()}-{os.urandom(4).hex()}"
    block = outdir.fs_block(out)  # clone granularity of the output's filesystem
    journal = open(out / outdir.JOURNAL_NAME, "a")  # noqa: SIM115 - open for the whole run
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
        linked, digest = write_file(
            f, out / f.name, outdir.tmp_path(out, f.name, run_id), link=options.link,
            fsync=options.fsync, checksum=options.checksum, report=report, cancel=cancel,
            block=block,
        )  # fmt: skip
        with lock:
            outdir.record_done(journal, out, f.name, linked, digest)
        return FileResult(f.name, f.size, linked, False, digest)

    try:
        results = _run_parallel([f for f in plan.files if not f.last], run, options.workers, cancel)
        extra = list(before_last(results)) if before_last else []
        results += [run(f) for f in [*extra, *(f for f in plan.files if f.last)]]
    finally:
        journal.close()
    outdir.finish(out, ((out / f.name).parent for f in plan.files), options.fsync)
    order = {f.name: i for i, f in enumerate(plan.files)}
    return tuple(sorted(results, key=lambda r: order.get(r.name, len(order))))


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
