"""Qwen3.5 model description: which family a config is, its GDN dims, its GDN layers.

The tensors present are the truth (docs/layouts.md section 5): every layer that has
``linear_attn.in_proj_qkv`` is a GDN layer to fuse, whatever its prefix (``mtp.`` too);
the config only supplies the head counts and sizes, and is cross-checked against shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import BA, FUSED_SOURCES, QKVZ, GdnDims
from gdnfuse.names import DECODER_GDN_LAYER, FUSED_KEY, SPLIT_KEY
from gdnfuse.record import STAMP_MODEL_TYPE
from gdnfuse.safetensors_file import TensorInfo

FAMILIES: dict[str, str] = {
    "qwen3_5": "model.language_model.",
    "qwen3_5_moe": "model.language_model.",
    "qwen3_5_text": "model.",
    "qwen3_5_moe_text": "model.",
}
"""Supported ``model_type`` values and where their decoder layers live."""

OUTPUT_FAMILIES: dict[str, str] = {**FAMILIES, "qwen3_next": "model."}
"""What a converted checkpoint may declare: ``--arch qwen3-next`` writes ``qwen3_next``.
Only ``gdnfuse verify`` reads these; conversion accepts :data:`FAMILIES` alone."""

SPLIT_SUFFIXES: dict[str, str] = {
    "qkv": "in_proj_qkv",
    "z": "in_proj_z",
    "b": "in_proj_b",
    "a": "in_proj_a",
}
FUSED_SUFFIXES: dict[str, str] = {"qkvz": "in_proj_qkvz", "ba": "in_proj_ba"}



@dataclass(frozen=True)
class ModelInfo:
    """What gdnfuse needs from config.json."""

    model_type: str
    dims: GdnDims
    hidden_size: int
    text_config_key: str | None  # "text_config" when the GDN dims live there
    quantization: Mapping[str, Any] | None

    @property
    def layer_prefix(self) -> str:
        return OUTPUT_FAMILIES[self.model_type]


def describe_config(
    config: Mapping[str, Any],
    path: str = "config.json",
    *,
    families: Mapping[str, str] = FAMILIES,
) -> ModelInfo:
    """Detect the family and read the GDN dims (from ``text_config`` or the top level).

    ``families``: the accepted ``model_type`` values (verify passes :data:`OUTPUT_FAMILIES`).
    """
    model_type = config.get("model_type")
    if model_type == STAMP_MODEL_TYPE:
        raise GdnfuseError(
            f"model_type {STAMP_MODEL_TYPE}: a gdnfuse output, already fused (in_proj_qkvz, "
            "in_proj_ba), not a split source; check it with `gdnfuse verify`",
            path=path,
        )
    if model_type not in families:
        arch = config.get("architectures")
        raise GdnfuseError(
            f"model_type {model_type!r} (architectures {arch}) is not a Qwen3.5 model; "
            f"supported: {', '.join(families)}",
            path=path,
        )
    # Like transformers: a text_config, when present, holds the language model's dims.
    text = config.get("text_config")
    key = "text_config" if isinstance(text, Mapping) else None
    fields: Mapping[str, Any] = text if isinstance(text, Mapping) else config
    where = f"{path} ({key})" if key else path
    names = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
             "linear_value_head_dim", "hidden_size")  # fmt: skip
    missing = [n for n in names if not isinstance(fields.get(n), int)]
    if missing:
        raise GdnfuseError(f"config lacks integer {', '.join(missing)}", path=where)
    try:
        dims = GdnDims(
            nk=fields["linear_num_key_heads"],
            nv=fields["linear_num_value_heads"],
            dk=fields["linear_key_head_dim"],
            dv=fields["linear_value_head_dim"],
        )
    except GdnfuseError as e:  # say which file holds the bad numbers
        raise GdnfuseError(e.message, path=path) from None
    quant = config.get("quantization_config") or fields.get("quantization_config")
    return ModelInfo(str(model_type), dims, fields["hidden_size"], key, quant)


class TensorRef(NamedTuple):
    """A tensor and the shard (file name, relative to the checkpoint) that holds it.

    A NamedTuple for the same reason as :class:`TensorInfo`: one per tensor, 200k+ in MoE.
    """

    file: str
    info: TensorInfo


def norm_eps(config: Mapping[str, Any], model: ModelInfo, path: str = "config.json") -> float:
    """``rms_norm_eps`` of the language model (transformers' default 1e-6 when absent).

    Only the numeric checks need it, so conversion never refuses a config over it.
    """
    fields = config.get(model.text_config_key) if model.text_config_key else config
    eps = (fields or {}).get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise GdnfuseError(f"rms_norm_eps {eps!r} is not a positive number", path=path)
    return float(eps)


@dataclass(frozen=True)
class GdnGroup:
    """The split sources of one fused tensor of one GDN layer, for one leaf.

    ``fused`` is ``qkvz`` (sources ``qkv``, ``z``) or ``ba`` (``b``, ``a``); ``leaf`` is
    ``weight`` or, in FP8 checkpoints, ``weight_scale_inv``; ``prefix`` ends in
    ``linear_attn.``. The fused tensor goes into the shard that held its first source.
    """

    prefix: str
    fused: str
    leaf: str
    parts: Mapping[str, TensorRef]

    @property
    def name(self) -> str:
        return f"{self.prefix}{FUSED_SUFFIXES[self.fused]}.{self.leaf}"

    def split_name(self, part: str) -> str:
        return f"{self.prefix}{SPLIT_SUFFIXES[part]}.{self.leaf}"

    @property
    def anchor(self) -> str:
        return FUSED_SOURCES[self.fused][0]


def is_split_gdn_key(name: str) -> bool:
    return SPLIT_KEY.match(name) is not None


def is_fused_gdn_key(name: str) -> bool:
    return FUSED_KEY.match(name) is not None


def find_gdn_groups(tensors: Mapping[str, TensorRef], model: ModelInfo) -> tuple[GdnGroup, ...]:
    """Group split GDN tensors by layer, fused target and leaf; check them against the config.

    Refuses: a layer missing one of the four ``weight`` parts, a fused target with only one
    of its sources for some leaf, rows or columns that disagree with the config, and
    sources of one fused tensor that differ in dtype or row size (fp8 and bf16 rows must
    never share a tensor).
    """
    found: dict[tuple[str, str, str], dict[str, TensorRef]] = {}
    layers: dict[str, dict[str, TensorRef]] = {}
    for name, ref in tensors.items():
        m = SPLIT_KEY.match(name)
        if m:
            fused = QKVZ if m["part"] in FUSED_SOURCES[QKVZ] else BA
            found.setdefault((m["prefix"], fused, m["leaf"]), {})[m["part"]] = ref
            if m["leaf"] == "weight":
                layers.setdefault(m["prefix"], {})[m["part"]] = ref
    for prefix, parts in layers.items():
        for part in SPLIT_SUFFIXES:
            if part not in parts:
                have = next(iter(parts))
                raise GdnfuseError(
                    f"layer has {', '.join(SPLIT_SUFFIXES[p] for p in parts)} but no "
                    f"{SPLIT_SUFFIXES[part]}",
                    path=parts[have].file,
                    tensor=f"{prefix}{SPLIT_SUFFIXES[have]}.weight",
                )
    groups = []
    for (prefix, fused, leaf), parts in sorted(
        found.items(), key=lambda kv: (natural_key(kv[0][0]), kv[0][1], kv[0][2])
    ):
        group = GdnGroup(prefix, fused, leaf, parts)
        for part in FUSED_SOURCES[fused]:
            if part not in parts:
                have = next(iter(parts))
                raise GdnfuseError(
                    f"has no matching {group.split_name(part)} to fuse with",
                    path=parts[have].file,
                    tensor=group.split_name(have),
                )
        if leaf == "weight":
            _check_weight_shapes(group, model)
        first, second = (parts[p].info for p in FUSED_SOURCES[fused])
        if first.dtype != second.dtype or first.shape[1:] != second.shape[1:]:
            raise GdnfuseError(
                f"cannot fuse {first.dtype}{list(first.shape)} with {second.dtype}"
                f"{list(second.shape)} of {group.split_name(FUSED_SOURCES[fused][1])}: "
                "rows of different dtype or width never share a tensor",
                path=parts[FUSED_SOURCES[fused][0]].file,
                tensor=group.split_name(FUSED_SOURCES[fused][0]),
            )
        groups.append(group)
    return tuple(groups)




def check_layer_types(
    groups: tuple[GdnGroup, ...], config: Mapping[str, Any], model: ModelInfo
) -> None:
    """The config's ``layer_types`` must name exactly the decoder layers that hold GDN
    projections (engines build layers from it; the tensors are the truth)."""
    fields = config.get(model.text_config_key) if model.text_config_key else config
    kinds = (fields or {}).get("layer_types")
    if not isinstance(kinds, list):
        return
    have = {int(m[1]): g for g in groups if (m := DECODER_GDN_LAYER.match(g.prefix))}
    for i, kind in enumerate(kinds):
        if (kind == "linear_attention") != (i in have):
            ref = next(iter(have[i].parts.values())) if i in have else None
            says = f"layer_types[{i}] is {kind!r}"
            raise GdnfuseError(
                f"{says} but layer {i} {'has' if i in have else 'has no'} linear_attn "
                "in_proj tensors; the config disagrees with the checkpoint",
                path=ref.file if ref else "config.json",
                tensor=have[i].split_name("qkv") if i in have else None,
            )
    beyond = sorted(i for i in have if i >= len(kinds))
    if beyond:
        raise GdnfuseError(
            f"layer {beyond[0]} has GDN projections but layer_types has only {len(kinds)} "
            "entries",
            path="config.json",
        )


def _check_weight_shapes(group: GdnGroup, model: ModelInfo) -> None:
    dims = model.dims
    for part, ref in group.parts.items():
        shape = ref.info.shape
        want = dims.source_rows(part)
        if len(shape) != 2 or shape[0] != want or shape[1] != model.hidden_size:
            raise GdnfuseError(
                f"shape {list(shape)} disagrees with the config, which implies "
                f"[{want}, {model.hidden_size}] (nk={dims.nk}, nv={dims.nv}, dk={dims.dk}, "
                f"dv={dims.dv}, hidden_size={model.hidden_size})",
                path=ref.file,
                tensor=group.split_name(part),
            )


def natural_key(s: str) -> list[Any]:
    """Sort key that puts layers.10 after layers.9."""
    return [int(t) if t.isascii() and t.isdigit() else t for t in re.split(r"([0-9]+)", s)]
