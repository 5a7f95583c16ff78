"""Check 3 of ``gdnfuse verify``: run each GDN layer split and fused, in float64, and compare.

The fused side is :func:`gdnfuse.reference.naive.fused_forward`: each TP rank of a consumer of
the recorded layout takes its contiguous slice of the fused rows, splits it the way that
consumer does, runs its heads, and the ranks' partial outputs are summed. The split side is
:func:`~gdnfuse.reference.naive.split_forward` with the source's weights (``--against``), or,
without a source, with the fused weights re-split through the recorded layout's run table.
That second form can only catch what is wrong *relative to the record*: a consumer TP the
record's layout cannot serve, a split that disagrees with the consumer's, and non-finite
weights; a head moved before fusion, or a wrong but self-consistent record, needs the source.

Only the tensors of one layer are loaded at a time (FP8 weights dequantized by their block
scales in float64), so memory is bounded by the largest layer. A ``--arch qwen3-next`` output's
layers are read under their Qwen3-Next names and the source's under its own
(:class:`gdnfuse.verify.arch.Names`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from gdnfuse.checkpoint import CONFIG_NAME, Checkpoint
from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import Layout
from gdnfuse.model import TensorRef, describe_config, norm_eps
from gdnfuse.reference.naive import GdnWeights, fused_forward, resplit, split_forward
from gdnfuse.verify.arch import Names, names_for
from gdnfuse.verify.report import CheckResult, failed, outcome, passed
from gdnfuse.verify.structure import FusedCheckpoint

TOLERANCE = 1e-12
"""Max |fused - split| relative to max |split|: float64 paths computing the same math."""
TOKENS = 6
"""Tokens of the random input: more than the conv width, so every conv tap is exercised."""
SEED = 0
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

Loader = Callable[[str], Tensor]


def _loader(
    root: Path,
    tensors: Mapping[str, TensorRef],
    block: tuple[int, int] | None,
    device: str,
    seen: dict[str, Tensor],
) -> Loader:
    """``load(name)``: the tensor in float64, dequantized when it has a ``_scale_inv``.

    Every loaded tensor is also put in ``seen``, to name the one holding a NaN or Inf.
    """

    def raw(name: str) -> Tensor:
        ref = tensors.get(name)
        if ref is None:
            raise GdnfuseError(
                "tensor not found (or in a shard whose header is invalid)", tensor=name
            )
        with safe_open(str(root / ref.file), framework="pt") as f:
            return f.get_tensor(name)

    def load(name: str) -> Tensor:
        t = raw(name)
        scale_name = f"{name}_scale_inv"
        if scale_name in tensors:
            if block is None:
                raise GdnfuseError(
                    "has a weight_scale_inv but the config has no "
                    "quantization_config.weight_block_size",
                    tensor=name,
                )
            t = dequantize(t.to(torch.float64), raw(scale_name).to(torch.float64), block)
        elif t.dtype in FP8_DTYPES:
            raise GdnfuseError(f"{t.dtype} weight without {scale_name}", tensor=name)
        seen[name] = t = t.to(device=device, dtype=torch.float64)
        return t

    return load


def dequantize(w: Tensor, scale: Tensor, block: tuple[int, int]) -> Tensor:
    """``w * scale`` with each scale entry covering a ``block`` of ``w`` (edge blocks cropped)."""
    rows, cols = w.shape
    want = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale.shape) != want:
        raise GdnfuseError(
            f"scale shape {list(scale.shape)} does not cover weight "
            f"{[rows, cols]} in {list(block)} blocks (expected {list(want)})"
        )
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w * full


def _block(quant: Mapping[str, object] | None) -> tuple[int, int] | None:
    size = (quant or {}).get("weight_block_size")
    if isinstance(size, list) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _eps(ck: FusedCheckpoint) -> float:
    return norm_eps(ck.config, ck.model, str(ck.root / "config.json"))


def _weights(load: Loader, prefix: str, eps: float) -> GdnWeights:
    return GdnWeights(
        conv1d=load(f"{prefix}conv1d.weight"),
        A_log=load(f"{prefix}A_log"),
        dt_bias=load(f"{prefix}dt_bias"),
        norm=load(f"{prefix}norm.weight"),
        out_proj=load(f"{prefix}out_proj.weight"),
        eps=eps,
    )


def _non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    return next((n for n, t in tensors.items() if not torch.isfinite(t).all()), None)


def check_numeric(
    ck: FusedCheckpoint,
    src: Checkpoint | None,
    layers: Sequence[str],
    *,
    tp: int | None = None,
    device: str = "cpu",
    on_layer: Callable[[int, str], None] | None = None,
) -> list[CheckResult]:
    """``numeric.tp`` (can a consumer at this TP read the record?) and ``numeric.forward``.

    ``on_layer(i, prefix)``: layer ``i`` of ``layers`` starts (for a progress display)."""
    if ck.record is None:
        return [
            failed(
                "numeric.forward",
                f"cannot run the fused layers: {ck.record_error}",
                file=CONFIG_NAME,
            )
        ]
    layout, rec_tp = ck.record.layout, ck.record.tp
    consumer = tp or rec_tp
    results = []
    if layout is Layout.TP_BLOCKED and consumer != rec_tp:
        results.append(
            failed(
                "numeric.tp",
                f"the record is tp-blocked for tp {rec_tp}: each of tp {rec_tp} ranks' rows are "
                f"contiguous, so a tp {consumer} consumer slicing contiguously reads other heads' "
                f"rows (only qwen3-next is TP-invariant; convert again with --tp {consumer})",
                file=CONFIG_NAME,
            )
        )
    else:
        why = (
            "qwen3-next holds whole key-head groups per slice"
            if (layout is Layout.QWEN3_NEXT)
            else "the recorded tp"
        )
        results.append(
            passed(
                "numeric.tp",
                f"a tp {consumer} consumer can read layout {layout} "
                f"recorded for tp {rec_tp} ({why})",
            )
        )

    dims, eps = ck.model.dims, _eps(ck)
    out_seen: dict[str, Tensor] = {}
    src_seen: dict[str, Tensor] = {}
    load_out = _loader(ck.root, ck.tensors, _block(ck.model.quantization), device, out_seen)
    load_src = None
    names = Names(None)
    if src is not None:
        src_model = describe_config(src.config, str(src.root / CONFIG_NAME))
        names = names_for(ck, src_model)
        load_src = _loader(src.root, src.tensors, _block(src_model.quantization), device, src_seen)
    fails: list[CheckResult] = []
    worst = 0.0
    for i, prefix in enumerate(layers):
        if on_layer is not None:
            on_layer(i, prefix)
        qkvz_name = f"{prefix}in_proj_qkvz.weight"
        out_seen.clear()
        src_seen.clear()
        try:
            qkvz, ba = load_out(qkvz_name), load_out(f"{prefix}in_proj_ba.weight")
            w_out = _weights(load_out, prefix, eps)
            if load_src is not None:
                src_prefix = names.to_source(prefix)
                split = tuple(
                    load_src(f"{src_prefix}in_proj_{p}.weight") for p in ("qkv", "z", "b", "a")
                )
                w_ref = _weights(load_src, src_prefix, eps)
            else:
                split, w_ref = resplit(qkvz, ba, dims, layout, rec_tp), w_out
            gen = torch.Generator().manual_seed(SEED)
            x = torch.randn(1, TOKENS, ck.model.hidden_size, generator=gen, dtype=torch.float64)
            x = x.to(device)
            qkv_w, z_w, b_w, a_w = split
            ref = split_forward(x, qkv_w, z_w, b_w, a_w, w_ref, dims)
            got = fused_forward(x, qkvz, ba, w_out, dims, layout, consumer)
        except (GdnfuseError, RuntimeError, ValueError, OSError) as e:
            tensor = getattr(e, "tensor", None) or qkvz_name
            fails.append(
                failed(
                    "numeric.forward",
                    f"cannot run the layer: {getattr(e, 'reason', None) or e}",
                    tensor=tensor,
                )
            )
            continue
        scale = float(ref.abs().max())
        diff = float((got - ref).abs().max())
        if not (math.isfinite(scale) and math.isfinite(diff)):
            bad = _non_finite(out_seen)
            where = (
                f"non-finite values in {bad}"
                if bad
                else (
                    f"non-finite values in the source's {_non_finite(src_seen)}"
                    if _non_finite(src_seen)
                    else "an overflow"
                )
            )
            fails.append(
                failed(
                    "numeric.forward", f"non-finite layer output: {where}", tensor=bad or qkvz_name
                )
            )
            continue
        rel = diff / scale if scale > 0 else diff
        worst = max(worst, rel)
        if not rel <= TOLERANCE:
            side = "source" if src else "re-split"
            fails.append(
                failed(
                    "numeric.forward",
                    f"fused (layout {layout}, consumer tp "
                    f"{consumer}) vs split ({side}) layer output: max |diff| "
                    f"{diff:.3g} = {rel:.3g} of the output scale {scale:.3g} (limit "
                    f"{TOLERANCE:g})",
                    tensor=qkvz_name,
                )
            )
            continue
    against = (
        "the source's split weights"
        if src
        else (
            "the same weights re-split by the recorded layout; without --against this catches a "
            "record a tp consumer cannot read, a wrong split and non-finite weights, but not a bad "
            "source mapping (a moved head, a wrong but self-consistent record)"
        )
    )
    results += outcome(
        "numeric.forward",
        fails,
        f"{len(layers)} GDN layers: fused (layout {layout}, consumer tp {consumer}, per-rank "
        f"split) vs {against}: max relative difference {worst:.1e} (limit {TOLERANCE:g}), "
        f"float64 on {device}, {TOKENS} random tokens",
    )
    return results
