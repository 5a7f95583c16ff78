"""The output directory of a run: when it may be used, who holds it, and the journal.

Knows nothing about models or about how bytes are copied (:mod:`gdnfuse.copier`); the
executor (:mod:`gdnfuse.executor`) uses both. gdnfuse's own files live in ``OUT/.gdnfuse/``
(no side file of a checkpoint can collide with them):

- ``lock``: an advisory ``flock`` through filelock, held for the whole run, so a second run on
  the same output is refused at once; the kernel releases it when a killed run dies;
- ``owner``: who holds the lock (renamed into place, so it is never read half-written);
- ``journal``: what a resumed run must share with the interrupted one (plan fingerprint,
  options, source identity), every name the output may hold from gdnfuse (this plan's and
  any earlier run's, listed *before* ``overwrite`` removes anything, so an interrupted run
  or an interrupted clean-up never leaves stale shards behind a later ``overwrite``), then
  one line per finished file;
- ``tmp/``: temporaries, unique per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from gdnfuse.errors import GdnfuseError, OutputError, option

STATE_DIR = ".gdnfuse"
JOURNAL_NAME = f"{STATE_DIR}/journal"
LOCK_NAME = f"{STATE_DIR}/lock"
OWNER_NAME = f"{STATE_DIR}/owner"
TMP_DIR = f"{STATE_DIR}/tmp"


def tmp_path(out: Path, name: str, run_id: str) -> Path:
    """A temporary for output ``name``, unique to this run (never shared with another)."""
    key = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return out / TMP_DIR / f"{run_id}-{key}"


# --- the lock -------------------------------------------------------------------------------


def lock(out: Path) -> FileLock:
    """Hold ``OUT/.gdnfuse/lock`` for the whole run, or refuse naming the run that holds it."""
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError.writing(e, out / STATE_DIR) from None
    held = FileLock(out / LOCK_NAME, timeout=0)
    try:
        held.acquire()
    except Timeout:
        raise _held(out) from None
    return held


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


def claim(out: Path) -> None:
    """Say who holds the lock (after the checks: a refused run changes nothing)."""
    owner = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    staged = out / f"{OWNER_NAME}.new"  # only the lock holder writes it
    try:  # renamed into place: a second run never reads a half-written owner
        staged.write_text(json.dumps(owner) + "\n")
        os.replace(staged, out / OWNER_NAME)
    except OSError as e:
        raise OutputError.writing(e, out / OWNER_NAME) from None


def remove_state(out: Path, out_too: bool) -> None:
    """Drop the lock, owner and temporaries (and ``out`` itself if ``out_too`` and empty)."""
    for name in (LOCK_NAME, OWNER_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    with contextlib.suppress(OSError):
        (out / STATE_DIR).rmdir()
        if out_too:
            out.rmdir()


# --- the journal ----------------------------------------------------------------------------


def journal_head(
    fingerprint: str,
    *,
    link: bool,
    checksum: bool,
    sources: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the plan (every output byte),
    the options that decide how files are made (linked or copied, hashed or not) and the
    identity of every source file. ``settings`` only explain a mismatch."""
    return {"fingerprint": fingerprint, "link": link, "checksum": checksum,
            "sources": dict(sources or {}), "settings": dict(settings or {})}  # fmt: skip


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
    same = {k: v for k, v in head.items() if k != "settings"}
    if same != {k: v for k, v in expected_head.items() if k != "settings"}:
        raise OutputError(_resume_mismatch(head, expected_head), path=str(out))
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


def record_done(journal: Any, out: Path, name: str, linked: bool, sha256: str | None) -> None:
    """Append one finished file to the open journal (flushed: a kill keeps it)."""
    try:
        journal.write(json.dumps({"done": name, "linked": linked, "sha256": sha256}) + "\n")
        journal.flush()
    except OSError as e:
        raise OutputError.writing(e, out / JOURNAL_NAME) from None


# --- may this run use the directory? --------------------------------------------------------


def _entries(out: Path) -> list[str]:
    """What is in ``out`` besides gdnfuse's own lock: an interrupted run's journal counts."""
    try:
        names = [n for n in os.listdir(out) if n != STATE_DIR]
        return names + ([JOURNAL_NAME] if (out / JOURNAL_NAME).is_file() else [])
    except FileNotFoundError:
        return []
    except OSError as e:
        raise GdnfuseError(f"cannot read: {e.strerror or e}", path=str(out)) from None


def _nothing_to_resume(out: Path, complete: Sequence[str]) -> OutputError:
    if complete and all((out / n).exists() for n in complete):
        return OutputError(
            "nothing to resume: this output is complete (check it with verify; "
            f"{option('overwrite', True)} to convert again)",
            path=str(out),
        )
    return OutputError(
        f"nothing to resume: no interrupted gdnfuse run here (use {option('overwrite', True)} "
        "to replace the directory's conversion)",
        path=str(out),
    )


def _not_empty(out: Path) -> OutputError:
    return OutputError(
        f"output directory is not empty; pass {option('overwrite', True)} to replace it or "
        f"{option('resume', True)} to finish an interrupted run",
        path=str(out),
    )


def check_output_dir(
    out: Path, *, resume: bool, overwrite: bool, complete: Sequence[str] = ()
) -> None:
    """Refuse before creating anything (not even the lock) in a directory we must not touch.

    ``complete``: the files whose presence marks a finished output (the plan's ``last``
    files), to tell "already complete" from "never converted" when there is nothing to resume.
    """
    if out.exists() and not out.is_dir():
        raise OutputError("output exists and is not a directory", path=str(out))
    _refuse_if_held(out)
    if _entries(out) and resume and not (out / JOURNAL_NAME).is_file():
        raise _nothing_to_resume(out, complete)
    if _entries(out) and not (overwrite or resume):
        raise _not_empty(out)


def prepare(
    out: Path,
    names: Sequence[str],
    head: Mapping[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    stale: Iterable[str],
    last: Sequence[str],
) -> dict[str, dict]:
    """Under the lock: check the directory again, write the journal's head and the names this
    run may leave, remove an earlier output's files (``overwrite``: ``last`` ones first, so
    the directory stops looking finished) and temporaries. Returns the files already done."""
    journal = out / JOURNAL_NAME
    if resume and journal.is_file():
        done = finished_files(out, head)
        _remove_temporaries(out)
        return done
    _, owned, _ = _read_journal(out)  # an interrupted run's files (or an interrupted clean-up's)
    old = sorted((set(stale) | owned) - {JOURNAL_NAME, OWNER_NAME, LOCK_NAME})
    if _entries(out):
        if resume:
            raise _nothing_to_resume(out, last)
        if not overwrite:
            raise _not_empty(out)
    try:  # name everything gdnfuse may leave here before removing any of it
        listed = {"owned": sorted(set(names) | set(old))}
        fresh = journal.with_name("journal.new")  # whole or absent, whenever a kill lands
        fresh.write_text(json.dumps(dict(head)) + "\n" + json.dumps(listed) + "\n")
        os.replace(fresh, journal)
    except OSError as e:
        journal.unlink(missing_ok=True)
        raise OutputError.writing(e, journal) from None
    if overwrite:
        for name in [*last, *old]:
            remove_old(out, name)
    _remove_temporaries(out)
    return {}


def finish(out: Path, dirs: Iterable[Path], fsync: bool) -> None:
    """A run succeeded: make the renames durable (``fsync``) and drop the journal."""
    if fsync:  # the renames themselves survive a power loss only once the dirs are synced
        for d in sorted(set(dirs), key=str):
            _fsync_dir(d)
    for name in (JOURNAL_NAME, OWNER_NAME):
        (out / name).unlink()
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)


def remove_old(out: Path, name: str) -> None:
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
        raise OutputError("a directory is where the output needs a file; remove it", path=str(path))
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError.writing(e, path) from None


def _remove_temporaries(out: Path) -> None:
    """Every run's temporaries: safe under the lock, since no other run is alive."""
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    (out / TMP_DIR).mkdir(parents=True, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the filesystem under it ----------------------------------------------------------------


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
