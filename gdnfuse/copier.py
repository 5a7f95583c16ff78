"""Write one planned file: a header prefix, then byte ranges of source files, or a hard link.

Knows nothing about models or about the output directory's rules (:mod:`gdnfuse.outdir`).

Why hand-written rather than a library: no library streams byte *ranges* of one file into
another. ``os.copy_file_range`` copies inside the kernel (no user-space buffer; a
reflink on filesystems that share extents), which keeps conversion at disk speed with
constant memory; a large-buffer ``pread``/``pwrite`` is the fallback where it is unsupported.

Safety: an existing output file is never opened for writing. New bytes always go to a
freshly created temporary file (``O_EXCL``) that is renamed over the old name, so an output
file that is a hard link to a source file (``link`` mode) can never write through into the
source. The temporary is removed on every error and on Ctrl-C.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from gdnfuse.errors import GdnfuseError, OutputError
from gdnfuse.plan import Extent, OutputFile

CHUNK = 64 << 20  # bytes per copy call: bounds latency of progress and cancellation
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}

ProgressFn = Callable[[int], None]


class Cancelled(Exception):
    """Raised inside workers once the run is being stopped (SIGINT or another failure)."""


def write_file(
    f: OutputFile,
    final: Path,
    tmp: Path,
    *,
    link: bool,
    fsync: bool,
    checksum: bool,
    report: ProgressFn,
    cancel: threading.Event,
    block: int,
) -> tuple[bool, str | None]:
    """Make ``final`` through the temporary ``tmp``: ``(linked, sha256 or None)``.

    ``link``: hard-link ``f.whole_source`` where the filesystem allows, else copy.
    ``block``: the output filesystem's clone granularity (see :func:`_copy_extent`)."""
    linked = False
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a stale temporary may be a hard link: never reuse it
        if link and f.whole_source is not None:
            linked = _try_link(f.whole_source, tmp)
        if linked:
            report(f.size)
        else:
            _assemble(f, tmp, fsync, report, cancel, block)
        digest = _sha256(tmp) if checksum else None
        os.replace(tmp, final)
        # rename(2) does nothing when both names are links to one inode (re-linking over an
        # earlier link): drop the temporary name, which removes no data.
        tmp.unlink(missing_ok=True)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError.writing(e, final) from None
        raise
    return linked, digest


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
