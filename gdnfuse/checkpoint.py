"""A local checkpoint directory: config, shard headers, index, side files. Read-only.

Opening a checkpoint reads only config.json, the index and each shard's header, so it is
fast on an 800 GB model, and it refuses inconsistent input (a tensor in two shards, an
index naming a missing file or tensor) before anything is planned or written.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from gdnfuse.errors import GdnfuseError
from gdnfuse.model import TensorRef
from gdnfuse.safetensors_file import SafetensorsHeader, read_header

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "gdnfuse-manifest.json"
"""What ``convert`` writes beside the model: sizes and hashes of the files it wrote."""

# Files a converted checkpoint must not carry along: weight duplicates in other formats
# would still hold the split projections, and caches are not part of the model.
SKIPPED_SUFFIXES = (".bin", ".pth", ".pt", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
SKIPPED_DIRS = ("original", ".cache", ".git", ".huggingface", ".gdnfuse")


@dataclass(frozen=True)
class Checkpoint:
    """What gdnfuse knows about a source directory, without having read any tensor data."""

    root: Path
    config: Mapping[str, Any]
    shards: Mapping[str, SafetensorsHeader]  # file name (relative) -> header
    index: Mapping[str, Any] | None
    side_files: Mapping[str, int]  # relative path -> size, copied as they are
    ignored: tuple[str, ...] = ()  # *.safetensors the index does not name (not part of the model)
    not_regular: tuple[str, ...] = ()  # FIFOs and other non-regular files: never read

    @cached_property
    def tensors(self) -> dict[str, TensorRef]:
        """Every tensor, built once (a MoE has 200k: callers in loops must not rebuild it)."""
        return self.select(lambda name: True)

    def select(self, keep: Callable[[str], bool]) -> dict[str, TensorRef]:
        """Tensors whose name passes ``keep`` (cheaper than all 200k of a MoE checkpoint)."""
        return {
            t.name: TensorRef(shard, t)
            for shard, header in self.shards.items()
            for t in header.tensors
            if keep(t.name)
        }


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise GdnfuseError(f"cannot read: {e.strerror or e}", path=str(path)) from None
    except ValueError as e:
        raise GdnfuseError(f"not valid JSON ({e})", path=str(path)) from None


@dataclass(frozen=True)
class Listing:
    """The regular files under a checkpoint folder, and what was passed over."""

    files: list[str]
    not_regular: list[str]  # FIFOs, sockets, devices: never read (a FIFO would block forever)


def list_files(root: Path) -> list[str]:
    """Relative paths of regular files under ``root``, skipping caches and weight duplicates."""
    return walk(root).files


def walk(root: Path) -> Listing:
    """Regular files under ``root``, following symlinks to files and folders anywhere (a Hugging
    Face snapshot is all symlinks), refusing a symlink loop, skipping caches, weight
    duplicates, gdnfuse's own state folder and anything that is not a regular file."""
    files: list[str] = []
    odd: list[str] = []
    ancestors: dict[str, frozenset[tuple[int, int]]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            raise GdnfuseError(f"cannot read: {e.strerror or e}", path=dirpath) from None
        mine = ancestors.get(dirpath, frozenset()) | {(st.st_dev, st.st_ino)}
        keep = []
        for d in sorted(x for x in dirnames if x not in SKIPPED_DIRS):
            full = os.path.join(dirpath, d)
            try:
                sd = os.stat(full)
            except OSError as e:  # a dangling symlink to a folder
                raise GdnfuseError(f"cannot read: {e.strerror or e}", path=full) from None
            if (sd.st_dev, sd.st_ino) in mine:
                raise GdnfuseError(
                    "symlink loop: this folder leads back to one that contains it", path=full
                )
            ancestors[full] = mine
            keep.append(d)
        dirnames[:] = keep
        rel = Path(dirpath).relative_to(root)
        for f in sorted(filenames):
            if f.startswith(".") or f.endswith(SKIPPED_SUFFIXES):
                continue
            name = str(rel / f) if rel != Path(".") else f
            try:
                regular = stat.S_ISREG(os.stat(os.path.join(dirpath, f)).st_mode)
            except OSError as e:  # a dangling symlink (a deleted cache blob), permissions
                where = str(root / name)
                raise GdnfuseError(f"cannot read: {e.strerror or e}", path=where) from None
            (files if regular else odd).append(name)
    return Listing(files, odd)


def _utf8(name: str, root: Path) -> str:
    """A shard name must be UTF-8: the index (JSON text) names it."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise GdnfuseError(
            "shard file name is not valid UTF-8, so the index (JSON) cannot name it; rename it",
            path=str(root / name),
        ) from None
    return name


def require_dir(root: Path) -> None:
    """One line for a checkpoint path that is missing or not a folder."""
    if not root.is_dir():
        raise GdnfuseError("does not exist" if not root.exists() else "not a directory",
                           path=str(root), kind="directory")  # fmt: skip


def open_checkpoint(root: str | os.PathLike[str]) -> Checkpoint:
    """Read and cross-check a checkpoint directory's config, index and shard headers."""
    root = Path(root).expanduser()
    require_dir(root)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise GdnfuseError("no config.json: not a Hugging Face checkpoint", path=str(root))
    config = load_json(config_path)
    if not isinstance(config, dict):
        raise GdnfuseError("config is not a JSON object", path=str(config_path))
    listing = walk(root)
    files = listing.files
    index = load_json(root / INDEX_NAME) if INDEX_NAME in files else None
    shard_names = sorted(f for f in files if f.endswith(".safetensors"))
    ignored: list[str] = []
    if index is not None:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise GdnfuseError("index has no weight_map object", path=str(root / INDEX_NAME))
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise GdnfuseError(
                "index maps a tensor to a non-string shard name",
                path=str(root / INDEX_NAME),
                tensor=bad,
            )
        if not isinstance(index.get("metadata", {}), dict):
            raise GdnfuseError("index metadata is not an object", path=str(root / INDEX_NAME))
        # Loaders read the shards the index names; another *.safetensors beside them (a
        # consolidated copy, an adapter) is not part of this model.
        named = set(weight_map.values())
        ignored = [f for f in shard_names if f not in named]
        shard_names = [f for f in shard_names if f in named]
        for name in sorted(named):
            if name not in shard_names:
                tensor = next(k for k, v in weight_map.items() if v == name)
                raise GdnfuseError(
                    f"index names shard {name}, which is missing",
                    path=str(root / INDEX_NAME),
                    tensor=tensor,
                )
    if not shard_names:
        raise GdnfuseError("no *.safetensors files", path=str(root))
    shards = {_utf8(name, root): read_header(root / name) for name in shard_names}
    seen: dict[str, str] = {}  # tensor -> shard
    for name, header in shards.items():
        before = len(seen)
        seen.update(dict.fromkeys((t.name for t in header.tensors), name))
        if len(seen) != before + len(header.tensors):  # some name was already seen
            names = {t.name for t in header.tensors}
            other, twice = next(
                (other, t.name)
                for other, h in shards.items()
                for t in h.tensors
                if other != name and t.name in names
            )
            raise GdnfuseError(
                f"tensor is in two shards, {other} and {name}", path=str(root / name), tensor=twice
            )
    if index is not None and index["weight_map"] != seen:  # one C-level comparison when fine
        for tensor, name in index["weight_map"].items():
            if seen.get(tensor) != name:
                where = f"it is in {seen[tensor]}" if tensor in seen else "no shard has it"
                raise GdnfuseError(
                    f"index maps tensor to {name} but {where}",
                    path=str(root / INDEX_NAME),
                    tensor=tensor,
                )
        unlisted = sorted(set(seen) - set(index["weight_map"]))
        raise GdnfuseError(
            f"{len(unlisted)} tensor(s) in shards are missing from the index",
            path=str(root / seen[unlisted[0]]),
            tensor=unlisted[0],
        )
    # A manifest of an earlier gdnfuse output describes that output, not this model.
    own = [f for f in files if f == MANIFEST_NAME]
    side = {f: _size(root / f) for f in files
            if not f.endswith(".safetensors") and f not in (INDEX_NAME, MANIFEST_NAME)}  # fmt: skip
    return Checkpoint(root, config, shards, index, side, (*ignored, *own),
                      tuple(listing.not_regular))  # fmt: skip


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:  # a dangling symlink (a deleted cache blob), permissions
        raise GdnfuseError(f"cannot read: {e.strerror or e}", path=str(path)) from None
