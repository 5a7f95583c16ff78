"""Plan the fusion of a Qwen3.5 checkpoint: pure, from headers alone, no I/O.

Every shard keeps its name. A shard that holds a split GDN projection is rewritten: its
tensors keep their order, the fused ``in_proj_qkvz`` takes the place of ``in_proj_qkv``
and ``in_proj_ba`` that of ``in_proj_b`` (the other two sources are dropped), and each
fused tensor is assembled from row runs of its sources (:mod:`gdnfuse.layout`), which
may live in other shards. Every other shard is an unchanged whole-file copy (or link).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gdnfuse import __version__
from gdnfuse.arch import Arch, Relabel, plan_relabel, vision_side_files, vision_tensors
from gdnfuse.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from gdnfuse.errors import GdnfuseError, option
from gdnfuse.layout import FUSED_SOURCES, Layout, check_tp, coalesce, fused_runs, valid_tp
from gdnfuse.model import (
    GdnGroup,
    ModelInfo,
    TensorRef,
    check_layer_types,
    describe_config,
    find_gdn_groups,
    is_fused_gdn_key,
)
from gdnfuse.plan import Extent, OutputFile, Plan, clonable_bytes, coalesce_extents
from gdnfuse.quant import block_rows, check_quantization, group_dims, rewrite_quantization_config
from gdnfuse.record import RECORD_FORMAT, RECORD_KEY, STAMP_KEY, stamp_config
from gdnfuse.safetensors_file import encode_header

CLONE_BLOCK = 4096
"""Block size assumed when planning without a filesystem to ask (XFS and btrfs default)."""


@dataclass(frozen=True)
class ConversionPlan:
    """A :class:`Plan` plus what it means, for summaries, ``inspect`` and ``--dry-run``."""

    plan: Plan
    model: ModelInfo
    layout: Layout
    tp: int
    groups: tuple[GdnGroup, ...]
    rewritten: tuple[str, ...]  # shards that get a new header and fused tensors
    untouched: tuple[str, ...]  # shards copied or linked whole
    record: Mapping[str, Any]
    side_files: tuple[str, ...] = field(default=())
    arch: Mapping[str, Any] | None = None  # what --arch re-labelling did (Relabel.summary)
    ignored: tuple[str, ...] = ()  # *.safetensors not named by the index: left out
    not_regular: tuple[str, ...] = ()  # FIFOs, sockets, devices in the source: never read
    vision_tensors: int = 0  # the source's vision tower (kept, or left out with text_only)
    engines: Mapping[str, Mapping[str, str]] | None = None
    """Per engine, whether it loads the output (``gdnfuse.loaders.to_json``); set by
    :func:`gdnfuse.convert.plan_source`, which knows the engine rules (this planner does not)."""

    @property
    def layers(self) -> int:
        return len({g.prefix for g in self.groups})

    @property
    def bytes_rewritten(self) -> int:
        return sum(f.size for f in self.plan.files if f.name in self.rewritten)

    @property
    def bytes_clonable(self) -> int:
        """Bytes a copy-on-write filesystem (XFS, btrfs; 4 KiB blocks) can share with the
        source instead of writing: whole untouched shards and the congruent blocks of the
        rewritten ones."""
        return sum(clonable_bytes(f, CLONE_BLOCK) for f in self.plan.files)

    @property
    def bytes_untouched(self) -> int:
        return sum(f.size for f in self.plan.files if f.name in self.untouched)

    def summary(self) -> dict[str, Any]:
        d = self.model.dims
        return {
            "model_type": self.model.model_type,
            "dims": {
                "nk": d.nk,
                "nv": d.nv,
                "dk": d.dk,
                "dv": d.dv,
                "r": d.r,
                "hidden_size": self.model.hidden_size,
            },  # fmt: skip
            "layout": str(self.layout),
            "tp": self.tp,
            "valid_tp": valid_tp(d.nk),
            "gdn_layers": self.layers,
            "fused_tensors": len(self.groups),
            "shards_rewritten": len(self.rewritten),
            "shards_untouched": len(self.untouched),
            "bytes_rewritten": self.bytes_rewritten,
            "bytes_untouched": self.bytes_untouched,
            "bytes_total": self.plan.total_bytes,
            "bytes_clonable": self.bytes_clonable,
            "layers": sorted({g.prefix.removesuffix(".") for g in self.groups}),
            **({"vision_tower_tensors": self.vision_tensors} if self.vision_tensors else {}),
            **({"arch": dict(self.arch)} if self.arch else {}),
            **({"ignored_files": list(self.ignored)} if self.ignored else {}),
            **({"not_regular_files": list(self.not_regular)} if self.not_regular else {}),
            **({"engines": {k: dict(v) for k, v in self.engines.items()},
                "loaded_by": [v["engine"] for v in self.engines.values()
                              if v["outcome"] == "loads"]} if self.engines is not None
               else {}),  # fmt: skip
        }


def plan_conversion(
    ckpt: Checkpoint,
    layout: Layout = Layout.QWEN3_NEXT,
    tp: int = 1,
    source: Mapping[str, Any] | None = None,
    arch: Arch = Arch.QWEN3_5,
    *,
    stamp: bool = False,
    serves: Mapping[str, Any] | None = None,
    block: int | None = CLONE_BLOCK,
    text_only: bool = False,
) -> ConversionPlan:
    """Plan the conversion of ``ckpt``; raises :class:`GdnfuseError` for anything unfit.

    ``arch=Arch.QWEN3_NEXT`` also re-labels every tensor and the config as a Qwen3-Next
    checkpoint (:mod:`gdnfuse.arch`); the fused GDN tensors are planned the same way.
    ``stamp`` gives config.json gdnfuse's own model_type and architectures, so that engines
    which would misread the rows refuse instead (:func:`gdnfuse.engines.stamp_config`).
    ``serves`` is recorded as the record's ``engine`` entry (what the output was made for).
    ``block``: the output filesystem's block size; each rewritten shard's header is padded
    so that its data starts at its source's data start modulo ``block`` whenever that lets
    more bytes be cloned on a copy-on-write filesystem (None: never pad). ``text_only``:
    leave a vision tower out (``arch=Arch.QWEN3_NEXT`` only; without it such a source is
    refused, never silently reduced to text).
    """
    gdn = refuse_fused(ckpt)
    model = describe_config(ckpt.config, str(ckpt.root / CONFIG_NAME))
    block_rows(model)  # refuse an unsupported scheme by name before its tensors confuse grouping
    groups = find_gdn_groups(gdn, model)
    if not groups:
        raise GdnfuseError(
            "no split GDN projections (linear_attn.in_proj_qkv/z/b/a) found", path=str(ckpt.root)
        )
    check_layer_types(groups, ckpt.config, model)
    vision = len(vision_tensors(ckpt.tensors, model))
    check_tp(model.dims, tp)
    check_quantization(model, groups)
    relabel: Relabel | None = None
    if Arch(arch) is Arch.QWEN3_NEXT:
        if layout is not Layout.QWEN3_NEXT:
            raise GdnfuseError(
                f"{option('arch', 'qwen3-next')} needs {option('layout', 'qwen3-next')} "
                f"(Qwen3-Next loaders expect it), not {layout}"
            )
        tensors = ckpt.tensors
        relabel = plan_relabel(tensors, ckpt.config, model, text_only=text_only)
    elif text_only and vision:
        raise GdnfuseError(
            f"{option('text_only', True)} drops the vision tower only from Qwen3-Next outputs "
            f"({option('arch', 'qwen3-next')} or {option('engine')}); a Qwen3.5 output keeps it"
        )
    left_out = vision_side_files(ckpt.side_files, relabel)
    if relabel is not None and left_out:
        relabel = replace(relabel, summary={**relabel.summary, "dropped_files": left_out})
    record = {
        "format": RECORD_FORMAT,
        "layout": str(layout),
        "tp": tp,
        "source": dict(source or local_source(ckpt)),
        "gdn_layers": len({g.prefix for g in groups}),
        "gdnfuse_version": __version__,
        **({"arch": dict(relabel.summary)} if relabel else {}),
        **({"engine": dict(serves)} if serves else {}),
    }
    shard_meta = {
        f"{RECORD_KEY}.format": str(RECORD_FORMAT),
        f"{RECORD_KEY}.layout": str(layout),
        f"{RECORD_KEY}.tp": str(tp),
        f"{RECORD_KEY}.source": json.dumps(record["source"], sort_keys=True),
    }

    # Where each fused tensor goes: the shard and slot of its first source (the anchor).
    anchored = {g.parts[g.anchor].info.name: g for g in groups}
    dropped = {g.parts[p].info.name for g in groups for p in FUSED_SOURCES[g.fused][1:]}
    touched = {ref.file for g in groups for ref in g.parts.values()}  # anchors are parts too
    if relabel is not None:  # a shard whose names or tensors change gets a new header
        touched |= {
            ref.file for n, ref in tensors.items() if n in relabel.pieces or relabel.rename(n) != n
        }
    # Loaders (transformers 4.x) refuse a shard whose __metadata__ lacks format "pt": such a
    # shard gets a new header too, its data copied whole.
    touched |= {s for s, h in ckpt.shards.items() if (h.metadata or {}).get("format") != "pt"}
    # A source shard with gdnfuse.* keys (copied from some earlier output) must not carry a
    # record that is not this conversion's: its keys are dropped, so its header is new too.
    touched |= {s for s, h in ckpt.shards.items()
                if any(k.startswith(f"{RECORD_KEY}.") for k in h.metadata or {})}  # fmt: skip

    files: list[OutputFile] = []
    weight_map: dict[str, str] = {}
    total_size = 0
    rewritten, untouched = [], []
    for shard, header in ckpt.shards.items():
        src_path = str(ckpt.root / shard)
        if shard not in touched:
            files.append(OutputFile(shard, extents=((Extent(src_path, 0, header.file_size)),),
                                    whole_source=src_path))  # fmt: skip
            untouched.append(shard)
            weight_map.update(dict.fromkeys((t.name for t in header.tensors), shard))
            total_size += header.file_size - header.data_start  # validated: tensors tile it
            continue
        entries, extents = [], []
        for t in header.tensors:
            if t.name in dropped:
                continue
            if t.name in anchored:
                g = anchored[t.name]
                name, rows, t_extents = _fused_tensor(ckpt, g, model, layout, tp)
                name = relabel.rename(name) if relabel else name
                new = [(name, t.dtype, (rows, *t.shape[1:]), sum(e.length for e in t_extents))]
                extents += t_extents
            elif relabel is not None:
                start, _ = header.file_range(t)
                new = []
                for piece in relabel.outputs(t.name, t.shape, t.nbytes):
                    new.append((piece.name, t.dtype, piece.shape, piece.length))
                    extents.append(Extent(src_path, start + piece.offset, piece.length,
                                          (piece.name,)))  # fmt: skip
            else:
                new = [(t.name, t.dtype, t.shape, t.nbytes)]
                extents.append(Extent(src_path, *header.file_range(t), (t.name,)))
            for entry in new:
                entries.append(entry)
                weight_map[entry[0]] = shard
                total_size += entry[3]
        if not entries:  # every tensor left out (a vision-only shard): no file at all
            continue
        kept = {k: v for k, v in (header.metadata or {}).items()
                if not k.startswith(f"{RECORD_KEY}.")}  # fmt: skip
        metadata = {**kept, "format": "pt", **shard_meta}
        files.append(_congruent(shard, entries, metadata, coalesce_extents(extents), header, block))
        rewritten.append(shard)

    side = [f for f in ckpt.side_files if f != CONFIG_NAME and f not in left_out]
    files += [
        OutputFile(f, extents=(Extent(str(ckpt.root / f), 0, ckpt.side_files[f]),)) for f in side
    ]
    config = dict(relabel.config if relabel else ckpt.config)
    if model.quantization is not None:
        config = rewrite_quantization_config(config, groups)
    if stamp:
        config, record[STAMP_KEY] = stamp_config(config)
    config[RECORD_KEY] = record
    files.append(OutputFile(CONFIG_NAME, _json_bytes(config), last=True))
    index_meta = dict((ckpt.index or {}).get("metadata") or {})
    index_meta["total_size"] = total_size
    index = {**(ckpt.index or {}), "metadata": index_meta,
             "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
    files.append(OutputFile(INDEX_NAME, _index_bytes(index), last=True))
    return ConversionPlan(
        Plan(tuple(files)), model, layout, tp, groups, tuple(rewritten), tuple(untouched),
        record, tuple(side), relabel.summary if relabel else None, ckpt.ignored,
        ckpt.not_regular, vision,
    )  # fmt: skip


SAMPLE = 64 << 10  # bytes read from each end of every shard's data for the fingerprint


def _congruent(
    shard: str,
    entries: list[tuple[str, str, tuple[int, ...], int]],
    metadata: Mapping[str, str],
    extents: tuple[Extent, ...],
    source: Any,
    block: int | None,
) -> OutputFile:
    """The rewritten shard, its header padded to the source's data phase when that makes more
    of its bytes congruent to their sources (cloneable); today's layout otherwise."""
    plain = OutputFile(shard, encode_header(entries, metadata), extents)
    if not block:
        return plain
    phase = source.data_start % block
    padded = OutputFile(shard, encode_header(entries, metadata, (block, phase)), extents)
    return padded if clonable_bytes(padded, block) > clonable_bytes(plain, block) else plain


def local_source(ckpt: Checkpoint) -> dict[str, str]:
    """What identifies a local source without leaking the machine's paths into published
    outputs: the folder's name and a content fingerprint (config.json, the index, every shard
    header and the first and last 64 KiB of its data: cheap, and two models of one shape
    differ in it)."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, INDEX_NAME):
        if (ckpt.root / name).is_file():
            h.update((ckpt.root / name).read_bytes())
    for shard, header in sorted(ckpt.shards.items()):
        with open(ckpt.root / shard, "rb") as f:
            h.update(f.read(header.data_start))
            data = header.file_size - header.data_start
            h.update(f.read(min(SAMPLE, data)))
            f.seek(max(header.data_start, header.file_size - SAMPLE))
            h.update(f.read(SAMPLE))
    return {"name": ckpt.root.resolve().name, "fingerprint_sha256": h.hexdigest()}


def refuse_fused(ckpt: Checkpoint) -> dict[str, TensorRef]:
    """The checkpoint's GDN projection tensors; refuses one that is already fused (a gdnfuse
    output, stamped or not), naming a fused tensor and its shard."""
    gdn = ckpt.select(lambda name: ".linear_attn.in_proj_" in name)
    fused = next((n for n in gdn if is_fused_gdn_key(n)), None)
    if fused is not None:
        raise GdnfuseError(
            "checkpoint is already fused (has in_proj_qkvz/in_proj_ba); check it with "
            "`gdnfuse verify`",
            path=str(ckpt.root / gdn[fused].file),
            tensor=fused,
        )
    return gdn


def _fused_tensor(
    ckpt: Checkpoint, g: GdnGroup, model: ModelInfo, layout: Layout, tp: int
) -> tuple[str, int, list[Extent]]:
    """Name, row count and source byte ranges of one fused tensor."""
    dims = group_dims(g, model)
    runs = coalesce(fused_runs(g.fused, dims, layout, tp))
    extents = []
    for run in runs:
        ref = g.parts[run.source]
        header = ckpt.shards[ref.file]
        row = ref.info.row_bytes
        start, _ = header.file_range(ref.info)
        what = f"{g.split_name(run.source)}[rows {run.start}:{run.start + run.count}]"
        extents.append(Extent(str(ckpt.root / ref.file), start + run.start * row, run.count * row,
                              (what,)))  # fmt: skip
    rows = sum(run.count for run in runs)
    return g.name, rows, extents


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _index_bytes(index: Mapping[str, Any]) -> bytes:
    """The index laid out like ``json.dumps(indent=2)``, one tensor per line.

    ``indent`` switches json to its pure-Python encoder (about 1 s for a 200k-tensor MoE
    index); separators that carry the newline keep the C encoder and the same layout.
    """
    head = {k: v for k, v in index.items() if k != "weight_map"}
    inner = _json_bytes(head).decode().rstrip()[1:-1].rstrip()  # "\n  ..." or ""
    tensors = json.dumps(index["weight_map"], ensure_ascii=False, separators=(",\n    ", ": "))
    if tensors != "{}":
        tensors = f"{{\n    {tensors[1:-1]}\n  }}"
    text = f'{{{inner}{"," if inner else ""}\n  "weight_map": {tensors}\n}}\n'
    return text.encode()
