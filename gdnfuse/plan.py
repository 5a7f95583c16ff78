"""A conversion plan: which bytes of which input files make each output file.

Plain data, built by a planner that knows the model (:mod:`gdnfuse.fusion`) and executed
by an engine that does not (:mod:`gdnfuse.executor`). Every output byte is either in a
file's ``prefix`` (a new header, a rewritten config) or an :class:`Extent` of a source
file, so a plan can be printed, diffed, fingerprinted and tested without any I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Extent:
    """``length`` bytes of file ``source`` starting at byte ``offset``.

    ``tensors`` says what the bytes are (for ``--dry-run`` readers; not part of the output's
    identity): tensor names, or ``NAME[rows a:b]`` for a run of a fused tensor's rows.
    """

    source: str
    offset: int
    length: int
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputFile:
    """One output file: ``prefix`` then each extent, in order.

    ``whole_source`` is set when the file is an unchanged copy of one source file, which
    the executor may hard-link instead of copying. ``last`` files (config.json, the index)
    are written only after every other file is complete, so an interrupted output never
    looks like a finished checkpoint.
    """

    name: str
    prefix: bytes = b""
    extents: tuple[Extent, ...] = ()
    whole_source: str | None = None
    last: bool = False

    @property
    def size(self) -> int:
        return len(self.prefix) + sum(e.length for e in self.extents)

    @property
    def how(self) -> str:
        """``copy`` (one whole source file; ``--link`` may link it when ``whole_source``),
        ``rewrite`` (a new header and byte ranges) or ``new`` (written from scratch)."""
        if not self.extents:
            return "new"
        if not self.prefix and len(self.extents) == 1 and self.extents[0].offset == 0:
            return "copy"
        return "rewrite"


@dataclass(frozen=True)
class Plan:
    files: tuple[OutputFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> str:
        """Hash of everything that determines the output bytes; ``--resume`` checks it."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(json.dumps([f.name, f.whole_source, f.last, f.size]).encode())
            h.update(hashlib.sha256(f.prefix).digest())
            for e in f.extents:
                # surrogateescape: file names need not be UTF-8 (they are bytes on Linux)
                h.update(f"{e.source}\0{e.offset}\0{e.length}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "name": f.name,
                "size": f.size,
                "prefix_bytes": len(f.prefix),
                "whole_source": f.whole_source,
                "last": f.last,
                "how": f.how,
                "extents": [
                    {"source": e.source, "offset": e.offset, "length": e.length,
                     "tensors": list(e.tensors)}
                    for e in f.extents
                ],  # fmt: skip
            }
            for f in self.files
        ]


def clonable_bytes(f: OutputFile, block: int) -> int:
    """Bytes of ``f`` a copy-on-write filesystem with ``block``-byte blocks can share with its
    sources: the whole blocks of every extent that lands congruent to its source offset."""
    total, position = 0, len(f.prefix)
    for e in f.extents:
        if (position - e.offset) % block == 0:
            head = -position % block
            total += max(0, e.length - head) // block * block
        position += e.length
    return total


def coalesce_extents(extents: Iterable[Extent]) -> tuple[Extent, ...]:
    """Merge extents that continue each other in the same file: one copy call, not many."""
    out: list[Extent] = []
    for e in extents:
        if e.length == 0:
            continue
        last = out[-1] if out else None
        if last and last.source == e.source and last.offset + last.length == e.offset:
            out[-1] = Extent(e.source, last.offset, last.length + e.length,
                             last.tensors + e.tensors)  # fmt: skip
        else:
            out.append(e)
    return tuple(out)
