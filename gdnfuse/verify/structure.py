"""Check 1 of ``gdnfuse verify``: the converted checkpoint is well-formed on its own.

Reads only config.json, the index, the manifest and each shard's header (plus whole files
when the manifest records their sha256). Unlike :func:`gdnfuse.checkpoint.open_checkpoint`,
which refuses the first inconsistency of a *source*, this reports every fault it finds in an
*output* as a failed check naming the file and tensor; only input that is not a checkpoint at
all (no directory, no config.json, no shard) is bad input.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from gdnfuse.arch import TARGET_ARCHITECTURE, TARGET_MODEL_TYPE
from gdnfuse.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, list_files, require_dir
from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import BA, QKVZ, Layout
from gdnfuse.model import (
    OUTPUT_FAMILIES,
    ModelInfo,
    TensorRef,
    describe_config,
    is_split_gdn_key,
    natural_key,
)
from gdnfuse.names import (
    CONV_KEY,
    EXPERT_KEY,
    FUSED_EXPERTS,
    FUSED_KEY,
    LAYER_NUMBER,
    VISUAL_PREFIX,
)
from gdnfuse.outdir import JOURNAL_NAME
from gdnfuse.quant import block_rows
from gdnfuse.record import RECORD_KEY, STAMP_MODEL_TYPE, Record, parse_record, unstamp_config
from gdnfuse.safetensors_file import SafetensorsHeader, read_header
from gdnfuse.verify.report import CheckResult, failed, outcome, skipped, timed


@dataclass(frozen=True)
class FusedCheckpoint:
    """A converted checkpoint as far as it could be read; faults are kept, not raised."""

    root: Path
    config: Mapping[str, Any]
    model: ModelInfo
    shard_names: tuple[str, ...]
    shards: Mapping[str, SafetensorsHeader]  # readable shards only
    unreadable: Mapping[str, GdnfuseError]  # shard -> why its header is invalid
    raw_record: Any
    record: Record | None
    record_error: str | None
    stamped: bool = False
    """config.json carries gdnfuse's own model_type (``config`` is the unstamped one)."""
    ignored: tuple[str, ...] = ()
    """*.safetensors the index does not name: not part of the model, as for convert."""
    rows_from: str = "record"
    """Where :attr:`record` (the row order the checks read) comes from: ``record`` (gdnfuse's
    layout record), ``format`` (a Qwen3-Next checkpoint without one: that format defines
    grouped rows) or ``detected`` (found against the source's bytes)."""

    @cached_property
    def tensors(self) -> dict[str, TensorRef]:
        """Tensors of the readable shards (first shard wins if one is in two)."""
        out: dict[str, TensorRef] = {}
        for name, header in self.shards.items():
            for t in header.tensors:
                out.setdefault(t.name, TensorRef(name, t))
        return out

    @cached_property
    def gdn_layers(self) -> tuple[str, ...]:
        """Prefixes (ending in ``linear_attn.``) of layers with a conv1d or a fused tensor."""
        prefixes = set()
        for name in self.tensors:
            m = FUSED_KEY.match(name) or CONV_KEY.match(name)
            if m:
                prefixes.add(m["prefix"])
        return tuple(sorted(prefixes, key=natural_key))

    def fused_name(self, prefix: str, fused: str, leaf: str = "weight") -> str:
        return f"{prefix}in_proj_{fused}.{leaf}"


def layer_number(prefix: str) -> int | None:
    m = LAYER_NUMBER.search(prefix)
    return int(m[1]) if m else None


def open_fused(root: str | os.PathLike[str]) -> FusedCheckpoint:
    """Read what can be read; raises :class:`GdnfuseError` only when it is not a checkpoint."""
    root = Path(root).expanduser()
    require_dir(root)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        hint = (
            "; a gdnfuse conversion into it was interrupted (finish it with --resume)"
            if (root / JOURNAL_NAME).exists()
            else ""
        )
        raise GdnfuseError(f"no config.json: not a Hugging Face checkpoint{hint}", path=str(root))
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise GdnfuseError(f"cannot read config.json: {e}", path=str(config_path)) from None
    if not isinstance(config, dict):
        raise GdnfuseError("config is not a JSON object", path=str(config_path))
    stamped = config.get("model_type") == STAMP_MODEL_TYPE
    config = unstamp_config(config)  # checks read it as the source declared it
    model = describe_config(config, str(config_path), families=OUTPUT_FAMILIES)
    names = tuple(f for f in list_files(root) if f.endswith(".safetensors"))
    # Like convert (and loaders): with an index, only the shards it names are the model.
    named = _indexed_shards(root / INDEX_NAME)
    ignored = tuple(n for n in names if named is not None and n not in named)
    names = tuple(n for n in names if n not in ignored)
    if not names:
        raise GdnfuseError("no *.safetensors files: not a checkpoint", path=str(root))
    shards, unreadable = {}, {}
    for name in names:
        try:
            shards[name] = read_header(root / name)
        except GdnfuseError as e:
            unreadable[name] = e
    raw = config.get(RECORD_KEY)
    record, error = parse_record(raw, model.dims)
    rows_from = "record"
    if raw is None and model.model_type == TARGET_MODEL_TYPE:
        # A Qwen3-Next checkpoint gdnfuse did not write (or one re-saved without the record):
        # the format itself defines the row order, as every Qwen3-Next loader reads it.
        record, error, rows_from = Record(Layout.QWEN3_NEXT, 1), None, "format"
    return FusedCheckpoint(root, config, model, names, shards, unreadable, raw, record, error,
                           stamped, ignored, rows_from)  # fmt: skip


def _indexed_shards(path: Path) -> set[str] | None:
    """Shard names the index maps tensors to; None without a readable index (the structure
    check reports a broken one)."""
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(weight_map, dict):
        return None
    return {v for v in weight_map.values() if isinstance(v, str)}


def check_structure(ck: FusedCheckpoint) -> list[CheckResult]:
    """Every structural check, in a fixed order."""
    checks = (_headers, _index, _split_keys, _fused_shapes, _record, _arch, _manifest)
    return [r for check in checks for r in timed(check, ck)]


def _headers(ck: FusedCheckpoint) -> list[CheckResult]:
    fails = [
        failed("structure.header", e.reason, tensor=e.tensor, file=name)
        for name, e in ck.unreadable.items()
    ]
    left_out = (
        f"; not part of the model (the index does not name them, so convert and loaders leave "
        f"them out): {', '.join(ck.ignored)}"
        if ck.ignored
        else ""
    )
    return outcome(
        "structure.header",
        fails,
        f"{len(ck.shards)} shard headers valid: within the file, offsets contiguous with no holes "
        f"or overlaps, byte lengths = shape x dtype{left_out}",
    )


def _load_index(path: Path) -> tuple[Any, list[str]]:
    """The index JSON and the keys that occur twice in one object (json.loads keeps the last)."""
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                duplicates.append(key)
            seen.add(key)
        return dict(items)

    return json.loads(path.read_text(), object_pairs_hook=pairs), duplicates


def _index(ck: FusedCheckpoint) -> list[CheckResult]:
    """The index lists every tensor once, in the shard that holds it; total_size is right."""
    fails: list[CheckResult] = []
    where: dict[str, str] = {}
    for name, header in ck.shards.items():
        for t in header.tensors:
            if t.name in where:
                fails.append(
                    failed(
                        "structure.index",
                        f"tensor is in two shards, {where[t.name]} and {name}",
                        tensor=t.name,
                        file=name,
                    )
                )
            else:
                where[t.name] = name
    path = ck.root / INDEX_NAME
    results: list[CheckResult] = []
    if not path.is_file():
        if len(ck.shard_names) > 1:
            fails.append(
                failed(
                    "structure.index",
                    f"no {INDEX_NAME} for {len(ck.shard_names)} shards",
                    file=INDEX_NAME,
                )
            )
        results += outcome("structure.index", fails, "single shard, no index needed")
        return results + [skipped("structure.total_size", "no index")]
    try:
        index, duplicates = _load_index(path)
    except (OSError, ValueError) as e:
        fails.append(failed("structure.index", f"cannot read the index: {e}", file=INDEX_NAME))
        return outcome("structure.index", fails, "") + [
            failed("structure.total_size", "index unreadable", file=INDEX_NAME)
        ]
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        fails.append(
            failed("structure.index", "index has no weight_map of tensor -> shard", file=INDEX_NAME)
        )
        weight_map = {}
    for tensor in duplicates:
        if tensor in weight_map:
            fails.append(
                failed(
                    "structure.index",
                    "tensor is listed twice in the index",
                    tensor=tensor,
                    file=INDEX_NAME,
                )
            )
    for tensor, shard in weight_map.items():
        if shard not in ck.shard_names:
            fails.append(
                failed(
                    "structure.index",
                    f"index names shard {shard}, which is missing",
                    tensor=tensor,
                    file=INDEX_NAME,
                )
            )
        elif shard in ck.unreadable:
            continue  # reported by structure.header; its tensors are unknown
        elif where.get(tensor) != shard:
            holder = f"it is in {where[tensor]}" if tensor in where else "no shard has it"
            fails.append(
                failed(
                    "structure.index",
                    f"index maps tensor to {shard} but {holder}",
                    tensor=tensor,
                    file=INDEX_NAME,
                )
            )
    for tensor, shard in where.items():
        if tensor not in weight_map:
            fails.append(
                failed(
                    "structure.index",
                    "tensor is in a shard but not in the index",
                    tensor=tensor,
                    file=shard,
                )
            )
    results += outcome(
        "structure.index",
        fails,
        f"{len(weight_map)} tensors, each listed once and in the shard that holds it",
    )
    meta = index.get("metadata") if isinstance(index, dict) else None
    total = meta.get("total_size") if isinstance(meta, dict) else None
    actual = sum(t.nbytes for h in ck.shards.values() for t in h.tensors)
    if ck.unreadable:
        results.append(
            skipped("structure.total_size", "not checked: some shard headers are invalid")
        )
    elif total != actual:
        results.append(
            failed(
                "structure.total_size",
                f"index metadata total_size is {total!r}, the tensors hold {actual} bytes",
                file=INDEX_NAME,
            )
        )
    else:
        results.append(outcome("structure.total_size", [], f"{actual} bytes")[0])
    return results


def _split_keys(ck: FusedCheckpoint) -> list[CheckResult]:
    fails = [
        failed(
            "structure.split_keys",
            "split GDN projection left in a fused checkpoint",
            tensor=name,
            file=ref.file,
        )
        for name, ref in ck.tensors.items()
        if is_split_gdn_key(name)
    ]
    return outcome("structure.split_keys", fails, "no in_proj_qkv/z/b/a left")


def expected_fused_shape(ck: FusedCheckpoint, fused: str, leaf: str) -> tuple[int, ...]:
    """Shape a fused tensor must have by the config; raises GdnfuseError when undefined."""
    dims, hidden = ck.model.dims, ck.model.hidden_size
    if leaf == "weight":
        return (dims.qkvz_rows if fused == QKVZ else dims.ba_rows, hidden)
    if leaf == "weight_scale_inv" and fused == QKVZ:
        block = block_rows(ck.model)
        if block is None:
            raise GdnfuseError("a weight_scale_inv in a checkpoint without quantization_config")
        cols = int((ck.model.quantization or {})["weight_block_size"][1])
        return (dims.in_blocks(block).qkvz_rows, math.ceil(hidden / cols))
    raise GdnfuseError(f"unexpected fused tensor kind in_proj_{fused}.{leaf}")


def _fused_shapes(ck: FusedCheckpoint) -> list[CheckResult]:
    fails: list[CheckResult] = []
    tensors = ck.tensors
    count = 0
    for name, ref in tensors.items():
        m = FUSED_KEY.match(name)
        if not m:
            continue
        count += 1
        try:
            want = expected_fused_shape(ck, m["fused"], m["leaf"])
        except GdnfuseError as e:
            fails.append(failed("structure.fused_shapes", e.reason, tensor=name, file=ref.file))
            continue
        if ref.info.shape != want:
            d = ck.model.dims
            fails.append(
                failed(
                    "structure.fused_shapes",
                    f"shape {list(ref.info.shape)} but the "
                    f"config implies {list(want)} (nk={d.nk}, nv={d.nv}, dk={d.dk}, "
                    f"dv={d.dv}, hidden_size={ck.model.hidden_size})",
                    tensor=name,
                    file=ref.file,
                )
            )
    for prefix in ck.gdn_layers:
        for fused in (QKVZ, BA):
            name = ck.fused_name(prefix, fused)
            if name not in tensors:
                fails.append(
                    failed(
                        "structure.fused_shapes",
                        "GDN layer has no fused tensor (a shard holding it may be unreadable)",
                        tensor=name,
                    )
                )
    return outcome(
        "structure.fused_shapes",
        fails,
        f"{count} fused tensors in {len(ck.gdn_layers)} GDN layers, shapes follow the config",
    )


def _record(ck: FusedCheckpoint) -> list[CheckResult]:
    """The record in config.json is valid and every rewritten shard's metadata that carries
    ``gdnfuse.*`` keys agrees (metadata is a cross-check: re-saving a checkpoint drops it)."""
    if ck.record_error:
        return [failed("structure.record", ck.record_error, file=CONFIG_NAME)]
    assert ck.record is not None
    if ck.rows_from != "record":
        how = ("the row order is the source's under the layout found against it"
               if ck.rows_from == "detected" else
               f"{ck.model.model_type} defines the row order (grouped per key head)")  # fmt: skip
        return outcome("structure.record", _metadata_disagrees(ck),
                       f"no gdnfuse layout record (not written by gdnfuse, or re-saved without "
                       f"it): {how}")  # fmt: skip
    fails: list[CheckResult] = []
    layers = ck.raw_record.get("gdn_layers")
    if layers != len(ck.gdn_layers):
        fails.append(
            failed(
                "structure.record",
                f"record says gdn_layers={layers!r}, the shards "
                f"hold {len(ck.gdn_layers)} GDN layers",
                file=CONFIG_NAME,
            )
        )
    want = {f"{RECORD_KEY}.layout": str(ck.record.layout), f"{RECORD_KEY}.tp": str(ck.record.tp)}
    rewritten, bare = 0, 0
    for name, header in ck.shards.items():
        meta = header.metadata or {}
        fused = next((t.name for t in header.tensors if FUSED_KEY.match(t.name)), None)
        if not any(k.startswith(f"{RECORD_KEY}.") for k in meta):
            bare += fused is not None  # re-saved (transformers drops unknown metadata)
            continue
        rewritten += 1
        for key, value in want.items():
            if meta.get(key) != value:
                fails.append(
                    failed(
                        "structure.record",
                        f"__metadata__ {key}={meta.get(key)!r} but config.json records {value!r}",
                        tensor=fused,
                        file=name,
                    )
                )
    without = f"; {bare} shards with fused tensors carry no gdnfuse metadata" if bare else ""
    return outcome(
        "structure.record",
        fails,
        f"layout {ck.record.layout}, tp {ck.record.tp}; the {rewritten} rewritten "
        f"shards' __metadata__ agree{without}",
    )


def _metadata_disagrees(ck: FusedCheckpoint) -> list[CheckResult]:
    """Shards whose ``gdnfuse.*`` metadata (a cross-check, where present) states another row
    order than the one the checks read."""
    from gdnfuse.engines.spec import Rows, same_rows

    assert ck.record is not None
    want = Rows(ck.record.layout, ck.record.tp)
    fails = []
    for name, header in ck.shards.items():
        meta = header.metadata or {}
        layout, tp = meta.get(f"{RECORD_KEY}.layout"), meta.get(f"{RECORD_KEY}.tp")
        if layout is None and tp is None:
            continue
        try:
            said = Rows(Layout(str(layout)), int(tp or 1))
            agrees = said.tp >= 1 and ck.model.dims.nk % said.tp == 0 and same_rows(
                ck.model.dims, said, want)  # fmt: skip
        except (ValueError, TypeError):
            agrees = False
        if not agrees:
            fails.append(failed("structure.record", f"__metadata__ says layout {layout!r}, tp "
                                f"{tp!r}, but the fused rows are {ck.record.layout}, tp "
                                f"{ck.record.tp}", file=name))  # fmt: skip
    return fails


def _arch(ck: FusedCheckpoint) -> list[CheckResult]:
    """A ``qwen3_next`` output (``--arch qwen3-next``) says so in its record, holds only
    Qwen3-Next names, and has every expert of every MoE layer as the loaders want it."""
    name = "structure.arch"
    relabelled = ck.model.model_type == TARGET_MODEL_TYPE
    arch = ck.raw_record.get("arch") if isinstance(ck.raw_record, Mapping) else None
    if not relabelled and arch is None:
        return []
    fails: list[CheckResult] = []
    if not relabelled:
        fails.append(
            failed(
                name,
                f"the record has an arch entry ({arch!r:.80}) but model_type is "
                f"{ck.model.model_type}, not {TARGET_MODEL_TYPE}",
                file=CONFIG_NAME,
            )
        )
    elif ck.raw_record is not None and not isinstance(arch, Mapping):
        fails.append(
            failed(
                name,
                f'model_type is {TARGET_MODEL_TYPE} but the "{RECORD_KEY}" record has no arch '
                "entry (what was relabelled, what was dropped)",
                file=CONFIG_NAME,
            )
        )
    if isinstance(arch, Mapping) and arch.get("target") != TARGET_MODEL_TYPE:
        fails.append(
            failed(name, f"record arch.target is {arch.get('target')!r}", file=CONFIG_NAME)
        )
    if relabelled:
        if TARGET_ARCHITECTURE not in (ck.config.get("architectures") or []):
            fails.append(
                failed(
                    name,
                    f"architectures {ck.config.get('architectures')!r} lacks {TARGET_ARCHITECTURE}",
                    file=CONFIG_NAME,
                )
            )
        fails += _qwen3_next_names(ck)
        fails += _experts(ck)
    entry = ("record arch entry present" if isinstance(arch, Mapping)
             else "no gdnfuse record (none needed)")  # fmt: skip
    return outcome(
        name,
        fails,
        f"{TARGET_MODEL_TYPE} checkpoint: {entry}, Qwen3-Next names only, "
        "every expert of every MoE layer present with the config's shapes",
    )


def _qwen3_next_names(ck: FusedCheckpoint) -> list[CheckResult]:
    fails = []
    for tensor, ref in ck.tensors.items():
        if tensor.startswith(("model.language_model.", VISUAL_PREFIX)):
            why = "a Qwen3.5 name: Qwen3NextForCausalLM has no such module"
        elif FUSED_EXPERTS.search(tensor):
            why = "fused experts: Qwen3-Next loaders read experts.N.{gate,up,down}_proj"
        else:
            continue
        fails.append(failed("structure.arch", why, tensor=tensor, file=ref.file))
    return fails


def _experts(ck: FusedCheckpoint) -> list[CheckResult]:
    """Every expert tensor the config implies exists with its shape (or the loader fails)."""
    cfg = ck.config
    experts, inter, hidden = (
        cfg.get("num_experts"),
        cfg.get("moe_intermediate_size"),
        ck.model.hidden_size,
    )
    layers, dense = cfg.get("num_hidden_layers"), cfg.get("mlp_only_layers") or []
    tensors = ck.tensors
    bases = {m["base"] for t in tensors if (m := EXPERT_KEY.match(t))}
    if not isinstance(experts, int) or experts <= 0:
        return [
            failed(
                "structure.arch",
                f"expert tensors under {base} but num_experts is {experts!r}",
                file=CONFIG_NAME,
            )
            for base in sorted(bases, key=natural_key)
        ]
    if isinstance(layers, int):
        bases |= {f"model.layers.{i}.mlp.experts." for i in range(layers) if i not in dense}
    want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    fails = []
    for base in sorted(bases, key=natural_key):
        for j in range(experts):
            for part, shape in want.items():
                tensor = f"{base}{j}.{part}_proj.weight"
                ref = tensors.get(tensor)
                if ref is None:
                    why = f"missing: num_experts={experts} implies experts 0..{experts - 1}"
                elif ref.info.shape != shape:
                    why = (
                        f"shape {list(ref.info.shape)}, the config implies {list(shape)} "
                        f"(moe_intermediate_size={inter}, hidden_size={hidden})"
                    )
                else:
                    continue
                fails.append(
                    failed("structure.arch", why, tensor=tensor, file=ref.file if ref else None)
                )
    return fails


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(ck: FusedCheckpoint) -> list[CheckResult]:
    path = ck.root / MANIFEST_NAME
    if not path.is_file():
        return [
            skipped("structure.manifest", f"no {MANIFEST_NAME}: file sizes and hashes not checked")
        ]
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise ValueError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [failed("structure.manifest", f"unreadable manifest: {e}", file=MANIFEST_NAME)]
    fails: list[CheckResult] = []
    if manifest.get("record") != ck.raw_record:
        fails.append(
            failed(
                "structure.manifest",
                "manifest record differs from config.json's",
                file=MANIFEST_NAME,
            )
        )
    hashed = 0
    for name, entry in files.items():
        target = ck.root / name
        if not target.is_file():
            fails.append(
                failed("structure.manifest", "listed in the manifest but missing", file=name)
            )
            continue
        size = target.stat().st_size
        if not isinstance(entry, dict) or entry.get("size") != size:
            want = entry.get("size") if isinstance(entry, dict) else entry
            fails.append(
                failed(
                    "structure.manifest",
                    f"file is {size} bytes, the manifest says {want!r}",
                    file=name,
                )
            )
            continue
        if entry.get("sha256") is not None:
            hashed += 1
            digest = _sha256(target)
            if digest != entry["sha256"]:
                fails.append(
                    failed(
                        "structure.manifest",
                        f"sha256 {digest} != manifest {entry['sha256']}",
                        file=name,
                    )
                )
    for name in ck.shard_names:
        if name not in files:
            fails.append(failed("structure.manifest", "shard is not in the manifest", file=name))
    return outcome(
        "structure.manifest",
        fails,
        f"{len(files)} files match their manifest sizes"
        + (f", {hashed} sha256 hashes match" if hashed else " (no hashes recorded)"),
    )
