"""Helpers for the fault tests: corrupt checkpoints on purpose, snapshot trees, run the CLI.

The corruptions work on raw bytes (not through gdnfuse's own encoder), so a bug in the
reader cannot hide the fault it should catch. Every helper returns what the error message
must name: the shard file and, where there is one, the tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX = "model.safetensors.index.json"
STATE = ".gdnfuse"  # gdnfuse's own files in an output: lock, owner, journal, tmp/
TMP_DIR = ".gdnfuse/tmp"
JOURNAL = ".gdnfuse/journal"

Header = dict[str, Any]


# --- raw shard access ---------------------------------------------------------------------


def read_raw(path: Path) -> tuple[Header, bytes]:
    """A shard's header JSON and data buffer, without any validation."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path: Path, header: Header, data: bytes) -> None:
    """Write ``header`` (padded to 8 bytes like the official writer) and ``data``."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tensors_in_order(header: Header) -> list[str]:
    """Tensor names of a header sorted by their data offset."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def edit_header(path: Path, edit: Callable[[Header], None]) -> None:
    """Change a shard's header JSON in place; the data buffer is kept as it is."""
    header, data = read_raw(path)
    edit(header)
    write_raw(path, header, data)


def weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / INDEX).read_text())["weight_map"]


def shard_of(root: Path, tensor: str) -> str:
    return weight_map(root)[tensor]


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


def _rebuild(path: Path, edit: Callable[[list[tuple[str, Header, bytes]]], None]) -> None:
    """Re-lay a shard: ``edit`` changes a list of (name, entry, bytes) in data order."""
    header, data = read_raw(path)
    items = [
        (name, dict(header[name]), data[slice(*header[name]["data_offsets"])])
        for name in tensors_in_order(header)
    ]
    edit(items)
    new: Header = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    buf, offset = bytearray(), 0
    for name, entry, payload in items:
        entry["data_offsets"] = [offset, offset + len(payload)]
        new[name] = entry
        buf += payload
        offset += len(payload)
    write_raw(path, new, bytes(buf))


# --- the corruptions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What a refusal must name: the file (a name, not a path) and maybe the tensor."""

    file: str
    tensor: str | None = None
    says: str = ""  # a further word the message must contain


def truncate_shard(root: Path, tensor: str, cut: int = 10) -> Fault:
    """Cut the last ``cut`` bytes of the shard holding ``tensor`` (a download cut short)."""
    shard = root / shard_of(root, tensor)
    last = tensors_in_order(read_raw(shard)[0])[-1]
    os.truncate(shard, shard.stat().st_size - cut)
    return Fault(shard.name, last, "truncated")


def truncate_into_header(root: Path, tensor: str) -> Fault:
    shard = root / shard_of(root, tensor)
    os.truncate(shard, 20)
    return Fault(shard.name, None, "header length")


def header_length(root: Path, tensor: str, length: int | None = None) -> Fault:
    """Overwrite the 8-byte header length (default: the file size, past the end)."""
    shard = root / shard_of(root, tensor)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.write(struct.pack("<Q", size if length is None else length))
    return Fault(shard.name, None, "header length")


def huge_header(root: Path, tensor: str) -> Fault:
    """A header length just over 100 MB in a (sparse) file that is longer still: only the
    size limit is broken."""
    shard = root / shard_of(root, tensor)
    os.truncate(shard, 100_000_100)
    header_length(root, tensor, 100_000_001)
    return Fault(shard.name, None, "limit")


def header_not_json(root: Path, tensor: str) -> Fault:
    shard = root / shard_of(root, tensor)
    blob = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    blob[8 : 8 + n] = b"{not json" + b" " * (n - 9)
    shard.write_bytes(bytes(blob))
    return Fault(shard.name, None, "JSON")


def shift_offsets(root: Path, tensor: str, delta: int) -> Fault:
    """Move ``tensor``'s byte range by ``delta`` (negative: overlap; positive: hole)."""
    shard = root / shard_of(root, tensor)

    def edit(h: Header) -> None:
        begin, end = h[tensor]["data_offsets"]
        h[tensor]["data_offsets"] = [begin + delta, end + delta]

    edit_header(shard, edit)
    return Fault(shard.name, tensor)


def last_tensor(root: Path, shard_name: str) -> str:
    return tensors_in_order(read_raw(root / shard_name)[0])[-1]


def middle_tensor(root: Path, shard_name: str) -> str:
    names = tensors_in_order(read_raw(root / shard_name)[0])
    return names[len(names) // 2]


def set_entry(root: Path, tensor: str, **fields: Any) -> Fault:
    """Replace header fields (dtype, shape) of one tensor, keeping its byte range."""
    shard = root / shard_of(root, tensor)
    edit_header(shard, lambda h: h[tensor].update(fields))
    return Fault(shard.name, tensor)


def append_garbage(root: Path, tensor: str, n: int = 16) -> Fault:
    shard = root / shard_of(root, tensor)
    last = last_tensor(root, shard.name)
    with open(shard, "ab") as f:
        f.write(b"\0" * n)
    return Fault(shard.name, last, "trailing")


def duplicate_tensor(root: Path, tensor: str) -> Fault:
    """Put a copy of ``tensor`` into another shard as well (left out of the index)."""
    home = shard_of(root, tensor)
    other = next(s for s in sorted(set(weight_map(root).values())) if s != home)
    header, data = read_raw(root / home)
    payload = data[slice(*header[tensor]["data_offsets"])]
    entry = {k: v for k, v in header[tensor].items() if k != "data_offsets"}
    _rebuild(root / other, lambda items: items.append((tensor, entry, payload)))
    return Fault(other, tensor, "two shards")


def index_missing_file(root: Path, tensor: str) -> Fault:
    edit_json(root / INDEX, lambda i: i["weight_map"].update({tensor: "model-99999.safetensors"}))
    return Fault(INDEX, tensor, "model-99999.safetensors")


def index_extra_tensor(root: Path, tensor: str) -> Fault:
    """The index lists a tensor that no shard has."""
    ghost = tensor.replace(".weight", "_ghost.weight")
    shard = shard_of(root, tensor)
    edit_json(root / INDEX, lambda i: i["weight_map"].update({ghost: shard}))
    return Fault(INDEX, ghost, "no shard has it")


def drop_tensor(root: Path, tensor: str) -> str:
    """Remove ``tensor`` (entry and bytes) from its shard and from the index; returns the shard."""
    shard = shard_of(root, tensor)

    def edit(items: list[tuple[str, Header, bytes]]) -> None:
        items[:] = [it for it in items if it[0] != tensor]

    _rebuild(root / shard, edit)
    edit_json(root / INDEX, lambda i: i["weight_map"].pop(tensor))
    return shard


def set_rows(root: Path, tensor: str, rows: int) -> Fault:
    """Give ``tensor`` ``rows`` rows (bytes cut or zero-padded), consistently in the header."""
    shard = shard_of(root, tensor)

    def edit(items: list[tuple[str, Header, bytes]]) -> None:
        for i, (name, entry, payload) in enumerate(items):
            if name == tensor:
                row = len(payload) // entry["shape"][0]
                new = (payload + b"\0" * rows * row)[: rows * row]
                items[i] = (name, {**entry, "shape": [rows, *entry["shape"][1:]]}, new)

    _rebuild(root / shard, edit)
    return Fault(shard, tensor, "disagrees with the config")


def edit_config(root: Path, edit: Callable[[dict[str, Any]], None]) -> Fault:
    edit_json(root / "config.json", edit)
    return Fault("config.json")


# --- snapshots ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileState:
    sha256: str
    size: int
    mtime_ns: int
    mode: int
    ino: int


def snapshot(root: Path) -> dict[str, FileState]:
    """Bytes, mtime, mode and inode of every file under ``root`` (the source must keep all)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            out[str(p.relative_to(root))] = FileState(
                digest, st.st_size, st.st_mtime_ns, st.st_mode, st.st_ino
            )
    return out


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (to compare two outputs)."""
    return {name: s.sha256 for name, s in snapshot(root).items()}


def listing(root: Path, skip: Sequence[str] = ()) -> set[str]:
    """Relative paths of everything under ``root``, not descending into ``skip``."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found |= {str(rel / n) for n in dirnames + filenames}
        dirnames[:] = [d for d in dirnames if str(rel / d) not in skip]
    return found


def leftovers(root: Path) -> list[str]:
    """Temporary files a run left under ``root``."""
    tmp = root / TMP_DIR
    return sorted(str(p.relative_to(root)) for p in tmp.rglob("*") if p.is_file())


def dir_bytes(root: Path) -> int:
    """Bytes currently in ``root``'s files (temporaries included); 0 while it is missing."""
    total = 0
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    for e in entries:
        with contextlib.suppress(FileNotFoundError):  # renamed or removed meanwhile
            total += e.stat(follow_symlinks=False).st_size
    return total


def looks_complete(out: Path) -> bool:
    return (out / INDEX).exists() or (out / "config.json").exists()


# --- the CLI as a separate process --------------------------------------------------------


def sigint_default() -> None:
    """``preexec_fn`` for CLI processes the tests interrupt: a shell starts background jobs
    with SIGINT ignored, and Python keeps an ignored SIGINT ignored (no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "gdnfuse.cli", *map(str, args)]


def run_cli(*args: str | os.PathLike[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=120, **kw)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error message, which must be exactly one line."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]
