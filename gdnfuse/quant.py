"""Quantized checkpoints: which schemes can be fused, and keeping their configs consistent.

Supported: FP8 with square weight blocks (``quant_method: fp8``, ``weight_block_size``),
as in the official Qwen3.5 FP8 checkpoints (docs/layouts.md section 7): ``weight_scale_inv``
rows follow the weight plan in units of blocks. Everything else is refused by name,
since a packed int4 or per-group scheme would need its own row math.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import BA, GdnDims
from gdnfuse.model import GdnGroup, ModelInfo
from gdnfuse.names import SPLIT_MODULE

IGNORE_LISTS = ("modules_to_not_convert", "ignored_layers", "ignore")
_FUSED_OF = {"qkv": "qkvz", "z": "qkvz", "b": "ba", "a": "ba"}


_SCHEME_KEYS = ("quant_method", "quant_algo", "fmt", "format", "bits")


def _scheme(q: Mapping[str, Any]) -> str:
    parts = [str(q.get(k)) for k in _SCHEME_KEYS if q.get(k)]
    return "/".join(parts) or "unknown"


def _block(q: Mapping[str, Any]) -> list[int] | None:
    """``weight_block_size`` as two positive ints, else None."""
    block = q.get("weight_block_size")
    if (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        return block
    return None


def block_rows(model: ModelInfo) -> int | None:
    """Rows per scale block for block-FP8 checkpoints; None when unquantized."""
    q = model.quantization
    if q is None:
        return None
    block = _block(q)
    if q.get("quant_method") == "fp8" and block is not None:
        return block[0]
    kind = (
        "per-tensor/per-channel fp8 (no weight_block_size)"
        if q.get("quant_method") == "fp8"
        else _scheme(q)
    )
    raise GdnfuseError(
        f"quantization scheme {kind} is not supported (supported: unquantized, and fp8 with "
        f"weight_block_size as in the official Qwen3.5 FP8 checkpoints); "
        f"quantization_config has quant_method={q.get('quant_method')!r}, "
        f"weight_block_size={q.get('weight_block_size')!r}"
    )


def check_quantization(model: ModelInfo, groups: Iterable[GdnGroup]) -> None:
    """Refuse tensors or schemes whose rows cannot be permuted exactly.

    A block scale must belong to an fp8 weight of the same layer and have
    ``[rows / block_n, ceil(H / block_k)]`` entries, or the permuted scales would not
    line up with the permuted rows.
    """
    groups = tuple(groups)
    block = block_rows(model)
    block_size = _block(model.quantization or {}) or [1, 1]
    weights = {(g.prefix, g.fused): g for g in groups if g.leaf == "weight"}
    for g in groups:
        if g.leaf == "weight":
            continue
        ref = next(iter(g.parts.values()))
        if block is None or g.leaf != "weight_scale_inv":
            raise GdnfuseError(
                f"unsupported GDN tensor kind {g.leaf!r}"
                + ("" if block is None else f" for scheme {_scheme(model.quantization or {})}"),
                path=ref.file,
                tensor=g.split_name(next(iter(g.parts))),
            )
        if g.fused == BA:
            raise GdnfuseError(
                "quantized in_proj_b/in_proj_a are not supported (official FP8 checkpoints "
                "keep them in bf16)",
                path=ref.file,
                tensor=g.split_name("b"),
            )
        dims = group_dims(g, model)
        cols = -(-model.hidden_size // block_size[1])
        weight = weights.get((g.prefix, g.fused))
        for part, r in g.parts.items():
            want = dims.source_rows(part)
            if tuple(r.info.shape) != (want, cols):
                raise GdnfuseError(
                    f"scale shape {list(r.info.shape)} is not [{want}, {cols}] "
                    f"(weight_block_size {block_size}, "
                    f"hidden_size {model.hidden_size})",
                    path=r.file,
                    tensor=g.split_name(part),
                )
            w = weight.parts[part].info if weight is not None else None
            if w is None or not w.dtype.startswith("F8_"):
                raise GdnfuseError(
                    "block scale without an fp8 weight "
                    f"({'no weight' if w is None else w.dtype}); scales and rows would not "
                    "line up",
                    path=r.file,
                    tensor=g.split_name(part),
                )


def group_dims(g: GdnGroup, model: ModelInfo) -> GdnDims:
    """Dims in the rows of this group's tensors: rows for weights, blocks for scales."""
    if g.leaf == "weight_scale_inv":
        block = block_rows(model)
        assert block is not None
        try:
            return model.dims.in_blocks(block)
        except GdnfuseError as e:
            ref = g.parts["qkv"]
            raise GdnfuseError(
                f"{e.message} (weight_block_size {block}, scale shape {list(ref.info.shape)})",
                path=ref.file,
                tensor=g.split_name("qkv"),
            ) from None
    return model.dims


def fused_module_names(names: Iterable[Any]) -> list[Any]:
    """An ignore list that names both the split and the fused GDN modules, order kept.

    Engines disagree on which form they match (sglang's ``is_layer_skipped`` matches the
    split shard names of a packed module, vLLM 0.32's honours the fused name too), so every
    split name stays and its fused name (``in_proj_b`` and ``in_proj_a`` of one layer give
    one ``in_proj_ba``) is added after the first of them; other entries are kept as they are.
    """
    names = list(names)
    out: list[Any] = []
    for name in names:
        out.append(name)
        if isinstance(name, str) and SPLIT_MODULE.search(name):
            new = SPLIT_MODULE.sub(lambda m: f"in_proj_{_FUSED_OF[m[1]]}", name)
            if new not in out and new not in names:
                out.append(new)
    return out


def rewrite_quantization_config(config: Mapping[str, Any], groups: Any = None) -> dict[str, Any]:
    """config.json with every ignore list naming the fused modules; nothing else changed."""
    out = dict(config)
    for holder_key in (None, "text_config"):
        holder = out if holder_key is None else out.get(holder_key)
        if not isinstance(holder, dict) or not isinstance(holder.get("quantization_config"), dict):
            continue
        q = dict(holder["quantization_config"])
        for key in IGNORE_LISTS:
            if isinstance(q.get(key), list):
                q[key] = fused_module_names(q[key])
        holder = dict(holder)
        holder["quantization_config"] = q
        if holder_key is None:
            out = holder
        else:
            out[holder_key] = holder
    return out
