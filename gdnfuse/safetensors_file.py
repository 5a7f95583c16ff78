"""The safetensors file format: read and validate headers, encode new ones. No torch.

gdnfuse never decodes tensor data: it only needs each tensor's byte range, which the
header gives. The official ``safetensors`` bindings map or load whole tensors, and their
errors do not name the file; this reader checks every invariant a converter relies on
(offsets contiguous, sizes matching shape x dtype, header inside the file) and reports
the file and tensor in one line, so that a truncated or odd shard is refused up front.

Format: 8-byte little-endian header length N, N bytes of JSON, then the data buffer.
JSON maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]} (relative to
the buffer), plus an optional "__metadata__" of str -> str.
"""

from __future__ import annotations

import json
import operator
import os
import reprlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from gdnfuse.errors import GdnfuseError

MAX_HEADER_BYTES = 100_000_000
"""The official reader's limit; a larger header is corrupt (or hostile)."""

DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class TensorInfo(NamedTuple):
    """One tensor's entry; ``begin``/``end`` are offsets into the data buffer.

    A NamedTuple rather than a frozen dataclass: MoE checkpoints have 200k+ entries, and
    construction cost shows up in ``inspect`` time (3x cheaper, equally immutable).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (first-dimension slice); rows are contiguous byte ranges."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated header; ``data_start`` is the file offset of the data buffer."""

    path: str
    tensors: tuple[TensorInfo, ...]  # in data order
    metadata: Mapping[str, str] | None
    data_start: int
    file_size: int

    @property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def file_range(self, tensor: TensorInfo) -> tuple[int, int]:
        """Absolute ``(offset, length)`` of a tensor's bytes in the file."""
        return self.data_start + tensor.begin, tensor.nbytes


def _fail(path: str, message: str, tensor: str | None = None) -> GdnfuseError:
    return GdnfuseError(message, path=path, tensor=tensor)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: a hostile header must not make a huge message."""
    r = reprlib.Repr()  # attributes, not keywords: Python 3.11
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _nbytes(shape: list[int], item: int, limit: int) -> int | None:
    """``prod(shape) * item``, or None once it passes ``limit`` by more than 64 bits' worth.

    A hostile shape of thousands of huge dims would otherwise build a million-digit integer
    (seconds of CPU, and too many digits to print); such a size can only be a mismatch.
    """
    if 0 in shape:
        return 0
    n = item
    for d in shape:
        n *= d
        if n > limit:
            return n if n.bit_length() <= 64 else None
    return n


_BY_OFFSETS = operator.itemgetter(3, 4)  # (begin, end) of a TensorInfo


def _fast_entry(name: str, entry: Any, data_size: int) -> TensorInfo | None:
    """The common, well-formed entry in few operations; None sends it to :func:`_entry`.

    Only ever accepts: anything unusual (including a valid entry with a zero dimension
    after a large one) falls through to the precise checks, which decide and explain.
    """
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        n = DTYPE_BYTES[dtype]
        begin, end = offsets
    except (TypeError, KeyError, ValueError):
        return None
    if not (type(shape) is list and type(offsets) is list and type(begin) is int
            and type(end) is int and 0 <= begin <= end <= data_size):  # fmt: skip
        return None
    size = end - begin
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        n *= d
        if n > size:  # stop before a hostile shape builds a huge integer
            return None
    return TensorInfo(name, dtype, tuple(shape), begin, end) if n == size else None


def _entry(path: str, name: str, entry: Any, data_size: int) -> TensorInfo:
    """Validate one tensor entry; raise the precise error for what is wrong with it."""
    if not isinstance(entry, dict):
        raise _fail(path, "entry is not an object", name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _fail(path, f"unsupported dtype {_short(dtype)}", name)
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise _fail(path, f"shape {_short(shape)} is not a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _fail(path, f"data_offsets {_short(offsets)} is not [begin, end]", name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _fail(path, f"data_offsets [{_short(begin)}, {_short(end)}] are not increasing", name)
    if end > data_size:
        raise _fail(
            path,
            f"data_offsets end {_short(end)} exceeds the {data_size}-byte data buffer "
            "(file truncated?)",
            name,
        )
    expected = _nbytes(shape, DTYPE_BYTES[dtype], limit=end - begin)
    if end - begin != expected:
        need = f"more than {end - begin}" if expected is None else str(expected)
        raise _fail(
            path,
            f"byte length {end - begin} but shape {_short(shape)} x {dtype} needs {need}",
            name,
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def parse_header(raw: bytes, file_size: int, path: str) -> SafetensorsHeader:
    """Validate a header's JSON bytes against the file size (pure, for fuzzing)."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    tensors = []
    for name, entry in obj.items():
        tensors.append(_fast_entry(name, entry, data_size) or _entry(path, name, entry, data_size))
    tensors.sort(key=_BY_OFFSETS)
    position, previous = 0, None
    for t in tensors:
        if t.begin < position:
            raise _fail(path, f"bytes overlap tensor {_short(previous)}", t.name)
        if t.begin > position:
            raise _fail(path, f"hole of {t.begin - position} bytes before this tensor", t.name)
        position, previous = t.end, t.name
    if position != data_size:
        raise _fail(
            path,
            f"data buffer is {data_size} bytes but tensors cover only {position} (trailing "
            "bytes after the last tensor)",
            previous,
        )
    return SafetensorsHeader(path, tuple(tensors), metadata, data_start, file_size)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file (reads only the header bytes)."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(p, f"file is {file_size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise _fail(p, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > file_size:
                raise _fail(
                    p,
                    f"header length {n} runs past the end of the {file_size}-byte file",
                )
            raw = f.read(n)
    except OSError as e:
        raise _fail(p, f"cannot read: {e.strerror or e}") from None
    return parse_header(raw, file_size, p)


def encode_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...], int]],
    metadata: Mapping[str, str] | None,
    data_phase: tuple[int, int] | None = None,
) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in the given order.

    ``tensors`` yields ``(name, dtype, shape, nbytes)``; offsets follow from the order.
    The JSON is padded with spaces to a multiple of 8 bytes, as the official writer does,
    so the data buffer stays aligned. ``data_phase=(block, phase)`` pads further (spaces,
    which the format allows) so that the data starts at ``phase`` modulo ``block``: a
    rewritten shard then keeps its source's tensors at offsets congruent to theirs, which
    copy-on-write filesystems can clone instead of copy (see :mod:`gdnfuse.executor`).
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        obj[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    if data_phase is not None:
        block, phase = data_phase
        if (phase - 8) % 8 == 0:  # keep the 8-byte alignment of the data buffer
            raw += b" " * ((phase - 8 - len(raw)) % block)
    return struct.pack("<Q", len(raw)) + raw
