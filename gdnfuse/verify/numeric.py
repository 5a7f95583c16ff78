"""Check 3 of ``gdnfuse verify``: run each GDN layer split and fused, in float64, and compare.

The fused side is :func:`gdnfuse.reference.naive.fused_heads`: each TP rank of a consumer of
the recorded layout takes its contiguous slice of the fused rows, splits it the way that
consumer does and runs its heads; ``out_proj`` then sums the ranks' parts. The split side is
:func:`~gdnfuse.reference.naive.split_heads` with the source's weights (``--against``), or,
without a source, with the fused projections re-split through the recorded layout's run table.
That second form can only catch what is wrong *relative to the record*: a consumer TP the
record's layout cannot serve, a split that disagrees with the consumer's, and non-finite
weights; a head moved before fusion, or a wrong but self-consistent record, needs the source.

Weights are never held whole: every projection ``h @ W.T`` is computed from row chunks of
``W`` read with ``os.pread`` and widened to float64 (FP8 dequantized by their block scales)
one chunk at a time, so memory is a few chunks plus the activations, whatever the model (a
Qwen3.5-27B layer in float64 is ~1.3 GB per side). A ``--arch qwen3-next`` output's layers are
read under their Qwen3-Next names and the source's under its own
(:class:`gdnfuse.verify.arch.Names`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gdnfuse.checkpoint import CONFIG_NAME, Checkpoint
from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import Layout
from gdnfuse.model import TensorRef, describe_config, norm_eps
from gdnfuse.reference.naive import GdnWeights, fused_heads, resplit, split_heads
from gdnfuse.verify.arch import Names, names_for
from gdnfuse.verify.report import CheckResult, failed, outcome, passed
from gdnfuse.verify.structure import FusedCheckpoint

TOLERANCE = 1e-12
"""Max |fused - split| relative to max |split|: float64 paths computing the same math."""
TOKENS = 6
"""Tokens of the random input: more than the conv width, so every conv tap is exercised."""
SEED = 0
READ = 16 << 20
"""Bytes of one read: large reads keep pace beside the byte comparison, which keeps the disk's
queue full (2.6 MB reads waited behind it: the check took 3x as long); 64 MB reads cost
65 MB more memory and were no faster."""
WIDEN = 4 << 20
"""Bytes of float64 widened at a time (~100 rows at 5120 columns): the widened chunk is still
in cache when it is multiplied (5x faster than 40 MB on a 2-core VM); much smaller chunks
pay per-chunk overhead instead (0.65 ms each)."""
DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
FP8 = ("F8_E4M3", "F8_E5M2")


class Weights:
    """One checkpoint's tensors, read by row ranges into float64, dequantized when a tensor has
    a ``_scale_inv`` (``block``: the config's ``weight_block_size``)."""

    def __init__(
        self,
        root: Path,
        shards: Mapping[str, Any],
        tensors: Mapping[str, TensorRef],
        block: tuple[int, int] | None,
        device: str,
    ) -> None:
        self.root, self.shards, self.tensors = root, shards, tensors
        self.block, self.device = block, device

    def _ref(self, name: str) -> TensorRef:
        ref = self.tensors.get(name)
        if ref is None:
            raise GdnfuseError(
                "tensor not found (or in a shard whose header is invalid)", tensor=name
            )
        if ref.info.dtype not in DTYPES:
            raise GdnfuseError(f"{ref.info.dtype} is not a float dtype", tensor=name)
        return ref

    def _raw(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` as stored (one pread; no memory map, so nothing stays resident)."""
        ref = self._ref(name)
        info, row = ref.info, ref.info.row_bytes
        shape = info.shape or (1,)
        offset = self.shards[ref.file].data_start + info.begin + start * row
        buf = bytearray((stop - start) * row if info.shape else info.nbytes)
        with open(self.root / ref.file, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [buf], offset)
        if got != len(buf):
            raise GdnfuseError(f"shard ends {len(buf) - got} bytes early", tensor=name)
        t = torch.frombuffer(buf, dtype=DTYPES[info.dtype]) if buf else torch.empty(0)
        return t.reshape(stop - start, *shape[1:]) if info.shape else t.reshape(())

    def _stored(self, name: str, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
        """Rows ``start:stop`` as stored, and their block scales (``start`` a multiple of the
        block height for a block-quantized tensor)."""
        info = self._ref(name).info
        scale = f"{name}_scale_inv"
        if scale not in self.tensors:
            if info.dtype in FP8:
                raise GdnfuseError(f"{DTYPES[info.dtype]} weight without {scale}", tensor=name)
            return self._raw(name, start, stop), None
        if self.block is None:
            raise GdnfuseError(
                "has a weight_scale_inv but the config has no "
                "quantization_config.weight_block_size",
                tensor=name,
            )
        bh, bw = self.block
        want = [math.ceil(info.shape[0] / bh), math.ceil(info.shape[1] / bw)]
        have = list(self.tensors[scale].info.shape)
        if have != want:
            raise GdnfuseError(
                f"scale shape {have} does not cover weight {list(info.shape)} in "
                f"{list(self.block)} blocks (expected {want})",
                tensor=name,
            )
        return self._raw(name, start, stop), self._raw(scale, start // bh, math.ceil(stop / bh))

    def widen(self, t: Tensor, scale: Tensor | None) -> Tensor:
        """Stored rows in float64 on the device, dequantized by their block scales."""
        if scale is not None:
            assert self.block is not None  # _stored checked it
            t = dequantize(t.to(torch.float64), scale.to(torch.float64), self.block)
        return t.to(device=self.device, dtype=torch.float64)

    def load(self, name: str) -> Tensor:
        """The whole tensor (for the small ones: conv, per-head vectors, norm)."""
        info = self._ref(name).info
        return self.widen(*self._stored(name, 0, info.shape[0] if info.shape else 1))

    def chunks(self, name: str) -> Iterator[tuple[int, Tensor]]:
        """``(first_row, rows)`` covering ``name``: read ``READ`` bytes at a time, widened
        ``WIDEN`` bytes at a time (both rounded to whole scale blocks)."""
        info = self._ref(name).info
        n, bh = info.shape[0], self.block[0] if self.block else 1
        cols = math.prod(info.shape[1:])
        step = max(1, WIDEN // max(1, 8 * cols) // bh) * bh
        slab = max(1, READ // max(1, info.row_bytes) // step) * step
        for s0 in range(0, n, slab):
            raw, scale = self._stored(name, s0, min(n, s0 + slab))
            for i in range(0, raw.shape[0], step):
                j = min(raw.shape[0], i + step)
                part = None if scale is None else scale[i // bh : math.ceil(j / bh)]
                yield s0 + i, self.widen(raw[i:j], part)
            del raw, scale  # before the next read: one slab at a time

    def project(self, h: Tensor, name: str) -> Tensor:
        """``h @ W.T`` for the 2-D weight ``name``, one chunk of rows at a time."""
        info = self._ref(name).info
        if len(info.shape) != 2 or info.shape[1] != h.shape[-1]:
            raise GdnfuseError(
                f"shape {list(info.shape)} cannot project {h.shape[-1]} features", tensor=name
            )
        out = h.new_empty(*h.shape[:-1], info.shape[0])
        for i, w in self.chunks(name):
            out[..., i : i + w.shape[0]] = h @ w.T
        return out

    def first_non_finite(self, names: Sequence[str]) -> str | None:
        """The first of ``names`` holding a NaN or an Inf (read again, chunk by chunk)."""
        for name in names:
            if name in self.tensors and any(
                not torch.isfinite(w).all() for _, w in self.chunks(name)
            ):
                return name
        return None


def dequantize(w: Tensor, scale: Tensor, block: tuple[int, int]) -> Tensor:
    """``w * scale`` with each scale entry covering a ``block`` of ``w`` (edge blocks cropped;
    :meth:`Weights._stored` checked that the scales cover the whole weight)."""
    rows, cols = w.shape
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w * full


def _block(quant: Mapping[str, object] | None) -> tuple[int, int] | None:
    size = (quant or {}).get("weight_block_size")
    if isinstance(size, list) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _eps(ck: FusedCheckpoint) -> float:
    return norm_eps(ck.config, ck.model, str(ck.root / "config.json"))


SMALL = ("conv1d.weight", "A_log", "dt_bias", "norm.weight")
"""A GDN layer's tensors besides the projections: read whole (they are small)."""


def _weights(w: Weights, prefix: str, eps: float) -> GdnWeights:
    conv1d, a_log, dt_bias, norm = (w.load(prefix + n) for n in SMALL)
    return GdnWeights(conv1d=conv1d, A_log=a_log, dt_bias=dt_bias, norm=norm, eps=eps)


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
    out_w = Weights(ck.root, ck.shards, ck.tensors, _block(ck.model.quantization), device)
    src_w = None
    names = Names(None)
    if src is not None:
        src_model = describe_config(src.config, str(src.root / CONFIG_NAME))
        names = names_for(ck, src_model)
        src_w = Weights(src.root, src.shards, src.tensors, _block(src_model.quantization), device)
    fails: list[CheckResult] = []
    worst = 0.0
    for i, prefix in enumerate(layers):
        if on_layer is not None:
            on_layer(i, prefix)
        qkvz_name = f"{prefix}in_proj_qkvz.weight"
        out_names = [qkvz_name, f"{prefix}in_proj_ba.weight", *(prefix + n for n in SMALL),
                     f"{prefix}out_proj.weight"]  # fmt: skip
        src_prefix = names.to_source(prefix)
        src_names = [*(f"{src_prefix}in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")),
                     *(src_prefix + n for n in SMALL), f"{src_prefix}out_proj.weight"]  # fmt: skip
        try:
            gen = torch.Generator().manual_seed(SEED)
            x = torch.randn(1, TOKENS, ck.model.hidden_size, generator=gen, dtype=torch.float64)
            x = x.to(device)
            qkvz, ba = out_w.project(x, out_names[0]), out_w.project(x, out_names[1])
            got = out_w.project(
                fused_heads(qkvz, ba, _weights(out_w, prefix, eps), dims, layout, consumer),
                out_names[-1],
            )
            if src_w is not None:
                q, z, b, a = (src_w.project(x, n) for n in src_names[:4])
                heads = split_heads(q, z, b, a, _weights(src_w, src_prefix, eps), dims)
                ref = src_w.project(heads, src_names[-1])
            else:  # the record's run table read backwards, on the projected channels
                q, z, b, a = (p.T[None] for p in resplit(qkvz[0].T, ba[0].T, dims, layout, rec_tp))
                heads = split_heads(q, z, b, a, _weights(out_w, prefix, eps), dims)
                ref = out_w.project(heads, out_names[-1])
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
            bad = out_w.first_non_finite(out_names)
            bad_src = src_w.first_non_finite(src_names) if src_w is not None and not bad else None
            where = (
                f"non-finite values in {bad}"
                if bad
                else (f"non-finite values in the source's {bad_src}" if bad_src else "an overflow")
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
