"""Check 2 of ``gdnfuse verify --against``: the output is the source, bit for bit, re-ordered.

Each fused tensor is read back through the recorded layout's run table
(:func:`gdnfuse.layout.fused_runs`): fused rows ``i..j`` must equal rows ``k..l`` of one
source tensor. Every other tensor, and every side file, must be byte-identical. Bytes are
compared in bounded chunks with ``os.pread`` by a few workers, so memory stays constant
whatever the size of the checkpoint, and nothing is decoded (any dtype, FP8 scales included).
A failure names the fused tensor, the source tensor and the rows; when the bytes match another
layout, it says so.

A ``--arch qwen3-next`` output is compared under the renaming, expert split and vision-tower
drop that :mod:`gdnfuse.verify.arch` rebuilds from the source's headers.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from gdnfuse.arch import TARGET_MODEL_TYPE, VISION_SIDE_FILES
from gdnfuse.checkpoint import CONFIG_NAME, Checkpoint
from gdnfuse.errors import GdnfuseError, option
from gdnfuse.fusion import local_source
from gdnfuse.layout import BA, FUSED_SOURCES, QKVZ, GdnDims, Layout, RowRun, fused_runs, valid_tp
from gdnfuse.model import GdnGroup, TensorRef, describe_config, find_gdn_groups
from gdnfuse.quant import group_dims, rewrite_quantization_config
from gdnfuse.record import RECORD_KEY
from gdnfuse.safetensors_file import DTYPE_BYTES
from gdnfuse.verify.arch import (
    Expected,
    Names,
    Source,
    check_arch_config,
    dropped_result,
    expected_tensors,
    names_for,
)
from gdnfuse.verify.report import CheckResult, failed, outcome, passed, timed
from gdnfuse.verify.structure import FusedCheckpoint

CHUNK = 16 << 20
"""Bytes read per side per step of one worker."""
PIECE = 256 << 20
"""Bytes of one comparison job: long tensors are cut into pieces that workers share."""
WORKERS = 8
"""Concurrent comparison jobs. Direct reads have no readahead, so the queue depth is what the
workers keep in flight: comparing a 10 GB checkpoint with its source (2-core VM, virtio
disk) took 17-19 s with 4 workers x 8 MB, 14.5 s with 8 x 16 MB and 13 s with 12 x 16 MB;
one range at a time through the page cache, 20-28 s. Memory: ``2 * CHUNK`` per worker."""
DIRECT = True
"""Read around the page cache (``O_DIRECT``) where the filesystem allows it."""
DIRECT_MIN = 1 << 20
"""Shorter reads go through the page cache: neighbouring small tensors (a MoE's 16 KB experts)
then come from the kernel's readahead instead of one disk round trip each (a 93k-tensor MoE:
27 s direct)."""
ALIGN = 4096
"""Direct I/O alignment of offsets, lengths and buffers (any logical block size divides it)."""
MAX_HINTS = 4
"""Failing fused tensors for which other layouts are tried (each try re-reads the tensor)."""

Span = tuple[tuple[str, int], tuple[str, int], int]
"""``((file_a, offset_a), (file_b, offset_b), length)``: two byte ranges to compare."""
Piece = tuple[int, tuple[str, int], tuple[str, int], int, int]
"""``(span index, a, b, start, length)``: part of a span, one worker's unit of reading."""

# memcmp from the C library: compares two aligned read buffers at any offsets without a
# copy and without the GIL (ctypes releases it), which Python's bytes offer only for whole
# objects (slicing copies; memoryview equality goes element by element, 60x slower).
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int


class _Buffer:
    """A page-aligned read buffer (anonymous mmap), as direct I/O needs, and its address."""

    def __init__(self, size: int) -> None:
        self.mem = mmap.mmap(-1, size)
        self.view = memoryview(self.mem)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))


class Reader(AbstractContextManager["Reader"]):
    """Read-only file descriptors, opened on first use by each thread and closed together,
    and the worker pool that compares byte ranges with them.

    Reads bypass the page cache (``O_DIRECT``) where the filesystem allows: every byte is
    read once, so caching it only costs CPU, which the numeric check running alongside needs,
    and evicts what the machine had cached (on a 2-core VM, 20 GB read through the cache
    took 11-30 s of kernel time, the more the fuller the cache; read directly, 1.5 s).

    ``on_read(n)`` is told each time ``n`` more output bytes were compared (progress); calls
    are serialised. Ranges at the same offset of the same file (an output shard hard-linked to
    the source) are identical by construction and are not read; ``linked`` counts their bytes.
    """

    def __init__(self, on_read: Callable[[int], None] | None = None) -> None:
        self._opened: list[int] = []
        self._ids: dict[str, tuple[int, int]] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._on_read = on_read
        self._pool: ThreadPoolExecutor | None = None
        self.linked = 0

    def _open(self, path: str, direct: bool) -> tuple[int, bool]:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags | (getattr(os, "O_DIRECT", 0) if direct else 0))
        except OSError as e:
            if direct and e.errno == errno.EINVAL:  # tmpfs and others: no direct I/O
                return self._open(path, False)
            raise GdnfuseError(f"cannot read: {e.strerror or e}", path=str(path)) from None
        with self._lock:
            self._opened.append(fd)
            st = os.fstat(fd)
            self._ids[path] = (st.st_dev, st.st_ino)
        return fd, direct

    def fd(self, path: str, direct: bool = False) -> tuple[int, bool]:
        """This thread's descriptor for ``path`` (``direct``: one around the page cache, where
        the filesystem allows), and whether it reads directly."""
        fds: dict[tuple[str, bool], tuple[int, bool]] = self._local.__dict__.setdefault(
            "fds", {})  # fmt: skip
        if (path, direct) not in fds:
            fds[path, direct] = self._open(path, direct and DIRECT and hasattr(os, "O_DIRECT"))
        return fds[path, direct]

    def _buffered(self, path: str) -> None:
        """Read ``path`` through the page cache instead: direct reads were refused."""
        self._local.fds[path, True] = self.fd(path)

    def _read(self, n: int) -> None:
        if self._on_read is not None:
            with self._lock:
                self._on_read(n)

    def first_differences(self, spans: Sequence[Span]) -> list[int | None]:
        """For each span, the offset of the first byte where its two ranges differ, else None.

        The spans are cut, or grouped, into jobs of about ``PIECE`` bytes compared
        concurrently (a 93k-tensor MoE is a few hundred jobs, not 93k); a file that ends early
        differs where it ends."""
        jobs: list[list[Piece]] = [[]]
        size = 0
        for i, (a, b, length) in enumerate(spans):
            self.fd(a[0]), self.fd(b[0])  # fails here, in order, on an unreadable file
            if self._ids[a[0]] == self._ids[b[0]] and a[1] == b[1]:
                self.linked += length
                self._read(length)
                continue
            for p in range(0, length, PIECE):
                n = min(PIECE, length - p)
                if size + n > PIECE and jobs[-1]:
                    jobs.append([])
                    size = 0
                jobs[-1].append((i, a, b, p, n))
                size += n
        jobs = [j for j in jobs if j]
        found: list[int | None] = [None] * len(spans)
        if self._pool is None and len(jobs) > 1:
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="gdnfuse-compare")
        results = self._pool.map(self._job, jobs) if self._pool else map(self._job, jobs)
        for job, ds in zip(jobs, results, strict=True):
            for (i, *_), d in zip(job, ds, strict=True):
                if d is not None and (found[i] is None or d < found[i]):  # type: ignore[operator]
                    found[i] = d
        return found

    def _job(self, job: list[Piece]) -> list[int | None]:
        return [self._piece(piece) for piece in job]

    def _chunk(self, path: str, buf: _Buffer, offset: int, n: int) -> tuple[int, int]:
        """Read ``n`` bytes at ``offset`` into ``buf``: ``(where in buf, bytes got)``."""
        fd, direct = self.fd(path, n >= DIRECT_MIN)
        if direct:
            start = offset - offset % ALIGN
            end = -(-(offset + n) // ALIGN) * ALIGN
            try:
                got = _read_into(fd, buf.view[: end - start], start)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered(path)
                return self._chunk(path, buf, offset, n)
            return offset - start, max(0, min(n, got - (offset - start)))
        return 0, _read_into(fd, buf.view[:n], offset)

    def _piece(self, piece: Piece) -> int | None:
        _, (pa, oa), (pb, ob), start, length = piece
        bufs = self._local.__dict__.get("bufs")
        if bufs is None:
            bufs = self._local.bufs = (_Buffer(CHUNK + 2 * ALIGN), _Buffer(CHUNK + 2 * ALIGN))
        x, y = bufs
        pos = start
        while pos < start + length:
            n = min(CHUNK, start + length - pos)
            at_x, got_x = self._chunk(pa, x, oa + pos, n)
            at_y, got_y = self._chunk(pb, y, ob + pos, n)
            self._read(got_x)
            if not (got_x == got_y == n and _memcmp(x.addr + at_x, y.addr + at_y, n) == 0):
                return pos + _mismatch(bytes(x.view[at_x : at_x + got_x]),
                                       bytes(y.view[at_y : at_y + got_y]))  # fmt: skip
            pos += n
        return None

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        for fd in self._opened:
            os.close(fd)
        self._opened.clear()


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; fewer bytes only at end of file."""
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if not k:
            break
        got += k
    return got


def _mismatch(x: bytes, y: bytes) -> int:
    """Index of the first differing byte (or the shorter length)."""
    n, step, lo = min(len(x), len(y)), 4096, 0
    while lo < n and x[lo : lo + step] == y[lo : lo + step]:
        lo += step
    return next((i for i in range(lo, min(lo + step, n)) if x[i] != y[i]), n)


def first_difference(
    reader: Reader, a: tuple[str | Path, int], b: tuple[str | Path, int], length: int
) -> int | None:
    """Offset of the first byte where ``length`` bytes at ``a`` and ``b`` differ, else None.

    ``a`` and ``b`` are ``(file, offset)``; a file that ends early differs where it ends.
    """
    return reader.first_differences([((str(a[0]), a[1]), (str(b[0]), b[1]), length)])[0]


def check_exact(
    ck: FusedCheckpoint, src: Checkpoint, on_read: Callable[[int], None] | None = None
) -> list[CheckResult]:
    """Every exact comparison; raises GdnfuseError only when ``src`` is not a split source.

    ``on_read(n)``: ``n`` more bytes compared (for a progress display)."""
    model = describe_config(src.config, str(src.root / CONFIG_NAME))
    groups = find_gdn_groups(src.tensors, model)
    if not groups:
        raise GdnfuseError(
            f"has no split GDN projections: {option('against')} must be the unconverted source",
            path=str(src.root),
        )
    names = names_for(ck, model)
    consumed = frozenset(ref.info.name for g in groups for ref in g.parts.values())
    expected = expected_tensors(names, src.tensors, consumed)
    config = (
        timed(check_arch_config, ck, src, model, expected)
        if names.relabelled
        else timed(_config, ck, src, model.quantization is not None)
    )
    left_out = _left_out(src, expected) if names.relabelled else ()
    with Reader(on_read) as reader:
        return [
            *timed(_source, ck, src),
            *config,
            *timed(_side_files, ck, src, reader, left_out),
            *timed(_fused, ck, src, groups, model, names, reader),
            *timed(_others, ck, src, groups, names, expected, reader),
            *([dropped_result(expected)] if names.relabelled else []),
        ]


def _source(ck: FusedCheckpoint, src: Checkpoint) -> list[CheckResult]:
    """One line first when ``--against`` is not the source the record names (then every
    per-tensor failure below follows from that)."""
    recorded = ck.raw_record.get("source") if isinstance(ck.raw_record, Mapping) else None
    if not isinstance(recorded, Mapping) or not any(k.endswith("_sha256") for k in recorded):
        return []  # a Hub source (repo id and commit) or an older record: nothing to compare
    given = local_source(src)
    if all(recorded.get(k) == v for k, v in given.items() if k.endswith("_sha256")):
        return [passed("exact.source", f"--against is the recorded source ({given['name']})")]
    key = next(k for k in given if k.endswith("_sha256"))
    return [failed(
        "exact.source",
        f"--against is not the recorded source: the output was made from {recorded.get('name')!r} "
        f"({key} {str(recorded.get(key))[:12]}...), --against is {given['name']!r} "
        f"({given[key][:12]}...); the differences below follow from that",
        file=CONFIG_NAME,
    )]  # fmt: skip


def _config(ck: FusedCheckpoint, src: Checkpoint, quantized: bool) -> list[CheckResult]:
    want = rewrite_quantization_config(src.config) if quantized else dict(src.config)
    have = {k: v for k, v in ck.config.items() if k != RECORD_KEY}
    keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    fails = (
        [
            failed(
                "exact.config",
                f"config.json differs from the source's in {', '.join(keys)} "
                f'(beyond the "{RECORD_KEY}" record and fused ignore-list names)',
                file=CONFIG_NAME,
            )
        ]
        if keys
        else []
    )
    return outcome("exact.config", fails, "config.json = source's + layout record")


def _left_out(src: Checkpoint, expected: Expected) -> tuple[str, ...]:
    """Side files a text-only output leaves out with the vision tower it drops."""
    if not expected.dropped:
        return ()
    return tuple(sorted(f for f in src.side_files if f in VISION_SIDE_FILES))


def _side_files(
    ck: FusedCheckpoint, src: Checkpoint, reader: Reader, left_out: tuple[str, ...] = ()
) -> list[CheckResult]:
    fails = []
    for name in left_out:  # the vision tower's processors: present would offer images
        if (ck.root / name).exists():
            fails.append(failed("exact.side_files", "the vision tower is left out, yet its "
                                "processor config was carried over", file=name))  # fmt: skip
    names = [f for f in src.side_files if f != CONFIG_NAME and f not in left_out]
    for name in names:
        ours, theirs = ck.root / name, src.root / name
        if not ours.is_file():
            fails.append(
                failed("exact.side_files", "source file missing from the output", file=name)
            )
            continue
        size = theirs.stat().st_size
        if ours.stat().st_size != size:
            fails.append(
                failed(
                    "exact.side_files",
                    f"{ours.stat().st_size} bytes, the source has {size}",
                    file=name,
                )
            )
        elif (d := first_difference(reader, (ours, 0), (theirs, 0), size)) is not None:
            fails.append(
                failed("exact.side_files", f"differs from the source at byte {d}", file=name)
            )
    gone = f"; {', '.join(left_out)} left out with the vision tower" if left_out else ""
    return outcome("exact.side_files", fails,
                   f"{len(names)} side files identical to the source{gone}")  # fmt: skip


def _start(root: Path, shards: Any, ref: TensorRef) -> tuple[str, int]:
    """File and absolute offset of a tensor's first byte (a ``str``: a ``Path`` per tensor
    cost a 93k-tensor MoE seconds of parsing and hashing)."""
    return os.path.join(root, ref.file), shards[ref.file].data_start + ref.info.begin


def _first_bad_run(
    ck: FusedCheckpoint,
    src: Checkpoint,
    g: GdnGroup,
    out: TensorRef,
    runs: Sequence[RowRun],
    reader: Reader,
) -> tuple[int, RowRun, int] | None:
    """``(fused_row, run, first_bad_row_in_run)`` of the first run that differs, else None."""
    row_bytes = out.info.row_bytes
    out_path, out_start = _start(ck.root, ck.shards, out)
    spans, rows, row = [], [], 0
    for run in runs:
        src_path, src_start = _start(src.root, src.shards, g.parts[run.source])
        out_at, src_at = out_start + row * row_bytes, src_start + run.start * row_bytes
        spans.append(((out_path, out_at), (src_path, src_at), run.count * row_bytes))
        rows.append(row)
        row += run.count
    for run, at, d in zip(runs, rows, reader.first_differences(spans), strict=True):
        if d is not None:
            return at, run, d // row_bytes
    return None


def candidate_layouts(dims: GdnDims) -> list[tuple[Layout, int]]:
    """Every distinct row order a fused tensor of these dims can hold: qwen3-next (grouped),
    then tp-blocked for each T dividing ``nk`` (T = 1: plain ``[Q;K;V;Z]``); orders that
    coincide for these dims (``nk / T == 1``) are listed once, under the first name."""
    seen, out = set(), []
    for cand in [(Layout.QWEN3_NEXT, 1), *((Layout.TP_BLOCKED, t) for t in valid_tp(dims.nk))]:
        runs = (fused_runs(QKVZ, dims, *cand), fused_runs(BA, dims, *cand))
        if runs not in seen:
            seen.add(runs)
            out.append(cand)
    return out


def layout_name(layout: Layout, tp: int) -> str:
    if layout is Layout.QWEN3_NEXT:
        return "qwen3-next (grouped per key head)"
    return "plain [Q;K;V;Z]" if tp == 1 else f"tp-blocked T={tp}"


def detect_layout(ck: FusedCheckpoint, src: Checkpoint) -> tuple[Layout, int] | str | None:
    """The row order the fused tensors hold, found against the source's bytes: the first of
    :func:`candidate_layouts` under which the first GDN layer's fused weights equal their
    source rows (a wrong order fails at its first misplaced run, so trying is cheap), or
    None when none fits, or why nothing could be compared (a string). ``exact.fused`` then
    checks every layer under it."""
    model = describe_config(src.config, str(src.root / CONFIG_NAME))
    groups = [g for g in find_gdn_groups(src.tensors, model) if g.leaf == "weight"]
    if not groups:
        return "the source has no split GDN projections to compare with"
    names = names_for(ck, model)
    first = [g for g in groups if g.prefix == groups[0].prefix]
    outs = [ck.tensors.get(names.to_output(g.name)) for g in first]
    missing = [names.to_output(g.name) for g, o in zip(first, outs, strict=True) if o is None]
    if missing:
        return (f"no fused {missing[0]} in the output (or its shard header is invalid): the "
                "row order cannot be found")
    with Reader() as reader:
        for cand in candidate_layouts(model.dims):
            if all(
                o is not None and o.info.nbytes == sum(r.info.nbytes for r in g.parts.values())
                and _first_bad_run(ck, src, g, o, fused_runs(g.fused, group_dims(g, model), *cand),
                                   reader) is None
                for g, o in zip(first, outs, strict=True)
            ):  # fmt: skip
                return cand
    return None


def _alternatives(dims: GdnDims, fused: str, layout: Layout, tp: int) -> list[tuple[Layout, int]]:
    """Other (layout, tp) choices whose row order differs from the recorded one."""
    seen = {fused_runs(fused, dims, layout, tp)}
    out = []
    for cand in [(Layout.QWEN3_NEXT, 1), *((Layout.TP_BLOCKED, t) for t in valid_tp(dims.nk))]:
        runs = fused_runs(fused, dims, *cand)
        if runs not in seen:
            seen.add(runs)
            out.append(cand)
    return out


def _fused(
    ck: FusedCheckpoint,
    src: Checkpoint,
    groups: Sequence[GdnGroup],
    model: Any,
    names: Names,
    reader: Reader,
) -> list[CheckResult]:
    name = "exact.fused"
    if ck.record is None:
        return [failed(name, f"cannot un-fuse: {ck.record_error}", file=CONFIG_NAME)]
    layout, tp = ck.record.layout, ck.record.tp
    tensors = ck.tensors
    fails: list[CheckResult] = []
    nbytes = 0
    for g in groups:
        out_name = names.to_output(g.name)
        out = tensors.get(out_name)
        if out is None:
            fails.append(
                failed(
                    name,
                    "fused tensor missing from the output (or in a shard whose header is invalid)",
                    tensor=out_name,
                )
            )
            continue
        dims = group_dims(g, model)
        first = g.parts[FUSED_SOURCES[g.fused][0]].info
        want = (sum(g.parts[p].info.shape[0] for p in FUSED_SOURCES[g.fused]), *first.shape[1:])
        if out.info.dtype != first.dtype or out.info.shape != want:
            fails.append(
                failed(
                    name,
                    f"is {out.info.dtype}{list(out.info.shape)}, its sources "
                    f"make {first.dtype}{list(want)}",
                    tensor=out_name,
                    file=out.file,
                )
            )
            continue
        bad = _first_bad_run(ck, src, g, out, fused_runs(g.fused, dims, layout, tp), reader)
        if bad is None:
            nbytes += out.info.nbytes
            continue
        row, run, k = bad
        detail = (
            f"fused rows {row}..{row + run.count - 1} should be {g.split_name(run.source)} rows "
            f"{run.start}..{run.start + run.count - 1} (layout {layout}, tp {tp}); first "
            f"difference at fused row {row + k} (source row {run.start + k})"
        )
        if len(fails) < MAX_HINTS:
            match = next(
                (
                    c
                    for c in _alternatives(dims, g.fused, layout, tp)
                    if _first_bad_run(ck, src, g, out, fused_runs(g.fused, dims, *c), reader)
                    is None
                ),
                None,
            )
            if match:
                detail += (
                    f"; its bytes are layout {match[0]}"
                    + (f", tp {match[1]}" if match[0] is Layout.TP_BLOCKED else "")
                    + ": the layout record is wrong"
                )
        fails.append(failed(name, detail, tensor=out_name, file=out.file))
    return outcome(
        name,
        fails,
        f"{len(groups)} fused tensors un-fuse to their sources bit for "
        f"bit (layout {layout}, tp {tp}; {nbytes:,} bytes)",
    )


def _others(
    ck: FusedCheckpoint,
    src: Checkpoint,
    groups: Sequence[GdnGroup],
    names: Names,
    expected: Expected,
    reader: Reader,
) -> list[CheckResult]:
    name = "exact.tensors"
    fused = {names.to_output(g.name) for g in groups}
    ours, theirs = ck.tensors, src.tensors
    fails: list[CheckResult] = []
    count = nbytes = 0
    compare: list[tuple[str, TensorRef, Source]] = []
    for tensor, out in ours.items():
        if tensor in fused:
            continue
        want = expected.tensors.get(tensor)
        if want is None:
            fails.append(failed(name, "not in the source checkpoint", tensor=tensor, file=out.file))
            continue
        a, b = out.info, theirs[want.tensor].info
        if (a.dtype, a.shape) != (b.dtype, want.shape):
            fails.append(
                failed(
                    name,
                    f"is {a.dtype}{list(a.shape)}, {_label(names, want)} is "
                    f"{b.dtype}{list(want.shape)}",
                    tensor=tensor,
                    file=out.file,
                )
            )
            continue
        compare.append((tensor, out, want))
    linked = reader.linked
    found = reader.first_differences([_span(ck, src, out, want) for _, out, want in compare])
    linked = reader.linked - linked
    for (tensor, out, want), d in zip(compare, found, strict=True):
        a = out.info
        if d is not None:
            detail = (
                f"differs from {_label(names, want)} ({theirs[want.tensor].file}) at byte {d} "
                f"of {a.nbytes} (element {d // DTYPE_BYTES[a.dtype]})"
            )
            sib = want.sibling
            if sib is not None and sib[0] in theirs:
                other = Source(sib[0], sib[1], want.length, want.shape, sib[2])
                if reader.first_differences([_span(ck, src, out, other)])[0] is None:
                    detail += (
                        f"; its bytes are {sib[0]} {sib[2]}".rstrip() + ": gate and up swapped"
                    )
            fails.append(failed(name, detail, tensor=tensor, file=out.file))
            continue
        count += 1
        nbytes += a.nbytes
    unreadable = (
        f" (shards with invalid headers: {', '.join(ck.unreadable)})" if ck.unreadable else ""
    )
    for tensor in sorted(expected.required - ours.keys()):
        want = expected.tensors[tensor]
        source = f"{want.tensor} {want.what}".rstrip()
        fails.append(
            failed(
                name,
                f"missing from the output (source: {source}, from "
                f"{theirs[want.tensor].file})" + unreadable,
                tensor=tensor,
            )
        )
    how = ""
    if names.relabelled:
        renamed = (
            "decoder names kept"
            if names.source_prefix == "model."
            else f"{names.source_prefix}* -> model.*"
        )
        how = (
            f" under the {TARGET_MODEL_TYPE} names ({renamed}; "
            f"{expected.split_experts} fused expert tensors cut per expert)"
        )
    return outcome(
        name,
        fails,
        f"{count} other tensors byte-identical to the source{how} ({nbytes:,} bytes"
        + (f"; {linked:,} of them in shards hard-linked to the source's" if linked else "")
        + ")",
    )


def _label(names: Names, want: Source) -> str:
    return f"{want.tensor} {want.what}".rstrip() if names.relabelled or want.what else "the source"


def _span(ck: FusedCheckpoint, src: Checkpoint, out: TensorRef, want: Source) -> Span:
    """An output tensor's bytes and the source bytes it must equal."""
    path, start = _start(src.root, src.shards, src.tensors[want.tensor])
    return _start(ck.root, ck.shards, out), (path, start + want.offset), want.length
