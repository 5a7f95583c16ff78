"""GDN layer forward in the engines' precision (bf16) with the engines' kind of kernels.

The same layer as :mod:`gdnfuse.reference.naive`, built for CUDA: the in-projection as cuBLAS
GEMMs (4 from split weights, or 2 from fused weights followed by the one-pass un-interleave of
:mod:`gdnfuse.reference.triton_uninterleave`), then flash-linear-attention's Triton ops where they
are installed (``fla-core``: causal conv + SiLU, ``chunk_gated_delta_rule``, gated RMSNorm), and
torch-only fallbacks elsewhere (CPU, or no ``gdnfuse[gpu]`` extra). Split and fused paths always
share every op after the in-projection, so their difference measures the fusion alone
(docs/layouts.md section 8: fla's norm and transformers' differ by ~3e-2 in bf16).

:func:`gpu_verify_layer` compares fused vs split in bf16 and both vs the float64 reference.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import GdnDims, Layout, check_tp
from gdnfuse.reference import naive
from gdnfuse.reference.naive import GdnWeights, shard_weights
from gdnfuse.reference.triton_uninterleave import triton_available, uninterleave

REL_RMSE_FUSED_VS_SPLIT = 1e-2
"""Fused vs split, both bf16: only the GEMM shapes differ (cuBLAS may pick other kernels, 1-ulp
output differences, docs/layouts.md section 8), then the same ops amplify them; measured ~1e-3
or less.
A wrong layout gives errors of order 1, two orders above this bound."""
REL_RMSE_VS_FLOAT64 = 3e-2
"""Each bf16 path vs the float64 reference: bf16 operands land between 1e-3 and 1e-2 (8 mantissa
bits, rounding at every op of a ~10-op chain); 3e-2 leaves room for long sequences."""
MAX_ABS_FRACTION = 0.1
"""Max abs error bound, as a fraction of the reference's max abs value (catches a single wrong
head or token that an RMS over the whole output would dilute)."""


@dataclass(frozen=True)
class GpuOps:
    """Which implementation each stage uses (recorded with every result)."""

    uninterleave: str  # "triton" | "torch"
    conv: str  # "fla" | "torch"
    delta_rule: str  # "fla" | "torch"
    norm: str  # "fla" | "torch"


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def pick_ops(device: torch.device | str, prefer_torch: bool = False) -> GpuOps:
    """fla and Triton on CUDA when installed; torch everywhere else."""
    cuda = torch.device(device).type == "cuda" and not prefer_torch
    fla = "fla" if cuda and fla_available() else "torch"
    return GpuOps("triton" if cuda and triton_available() else "torch", fla, fla, fla)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half types (the engines' accumulation), otherwise the tensor's own."""
    return torch.promote_types(t.dtype, torch.float32)


def causal_conv_silu(mixed_qkv: Tensor, conv1d: Tensor, ops: GpuOps) -> Tensor:
    """Depthwise causal conv + SiLU over ``[B, T, C]``; weight ``[C, 1, K]``."""
    if ops.conv == "fla":
        from fla.modules.causal_conv1d import causal_conv1d

        out, _ = causal_conv1d(mixed_qkv, conv1d[:, 0, :].contiguous(), activation="silu")
        return out
    t, width = mixed_qkv.shape[1], conv1d.shape[-1]
    y = F.conv1d(mixed_qkv.transpose(1, 2), conv1d, padding=width - 1, groups=conv1d.shape[0])
    return F.silu(y[..., :t]).transpose(1, 2)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, ops: GpuOps) -> Tensor:
    """Gated delta rule on raw ``q, k [B,T,nk,dk]`` (L2-normalised here), ``v [B,T,nv,dv]``."""
    scale = q.shape[-1] ** -0.5
    if ops.delta_rule == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        out, _ = chunk_gated_delta_rule(
            q, k, v, g=g, beta=beta, scale=scale, use_qk_l2norm_in_kernel=True
        )
        return out
    ct = _compute_dtype(v)
    qn = naive.l2norm(q.to(ct)) * scale
    kn = naive.l2norm(k.to(ct))
    return naive.gated_delta_rule(qn, kn, v.to(ct), g.to(ct), beta.to(ct)).to(v.dtype)


def gated_norm(o: Tensor, z: Tensor, weight: Tensor, eps: float, ops: GpuOps) -> Tensor:
    """Gated RMSNorm per value head: ``weight * rmsnorm(o) * silu(z)``, ``[..., dv]``."""
    if ops.norm == "fla":
        from fla.modules.norm.fused_norm_gate import rms_norm_gated

        dv = o.shape[-1]
        out = rms_norm_gated(
            o.reshape(-1, dv), z.reshape(-1, dv), weight, None, activation="swish", eps=eps
        )
        return out.reshape(o.shape)
    ct = _compute_dtype(o)
    x = o.to(ct)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight.to(ct) * x * F.silu(z.to(ct))).to(o.dtype)


def gdn_core(
    mixed_qkv: Tensor, z: Tensor, b: Tensor, a: Tensor, w: GdnWeights, dims: GdnDims, ops: GpuOps
) -> Tensor:
    """Everything after the in-projection for the heads of ``dims`` (a rank's, or all).

    ``mixed_qkv [B,T,qkv_rows]`` in ``[Q;K;V]`` order, ``z [B,T,nv*dv]``, ``b, a [B,T,nv]``.
    Returns the (partial, for one rank) ``out_proj`` output ``[B,T,H]``.
    """
    bsz, t, _ = mixed_qkv.shape
    nk, nv, dk, dv = dims.nk, dims.nv, dims.dk, dims.dv
    mixed = causal_conv_silu(mixed_qkv, w.conv1d, ops)
    q, k, v = torch.split(mixed, [nk * dk, nk * dk, nv * dv], dim=-1)
    q = q.reshape(bsz, t, nk, dk)
    k = k.reshape(bsz, t, nk, dk)
    v = v.reshape(bsz, t, nv, dv)
    beta = torch.sigmoid(b)  # in the activations' dtype, as transformers feeds fla
    ct = _compute_dtype(a)  # float32 for bf16 (as transformers), float64 stays float64
    g = -w.A_log.to(ct).exp() * F.softplus(a.to(ct) + w.dt_bias.to(ct))
    o = delta_rule(q, k, v, g, beta, ops)
    o = gated_norm(o, z.reshape(bsz, t, nv, dv), w.norm, w.eps, ops)
    return F.linear(o.reshape(bsz, t, nv * dv).to(w.out_proj_weight().dtype), w.out_proj_weight())


def split_in_proj(
    x: Tensor, qkv_w: Tensor, z_w: Tensor, b_w: Tensor, a_w: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Qwen3.5's in-projection: four GEMMs, outputs already in the conv's order."""
    return F.linear(x, qkv_w), F.linear(x, z_w), F.linear(x, b_w), F.linear(x, a_w)


def fused_in_proj(
    x: Tensor, qkvz_w: Tensor, ba_w: Tensor, dims: GdnDims, layout: Layout, ops: GpuOps
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One rank's fused in-projection: two GEMMs, then the un-interleave (``dims`` local)."""
    u = uninterleave(F.linear(x, qkvz_w), F.linear(x, ba_w), dims, layout, backend=ops.uninterleave)
    return u.mixed_qkv, u.z, u.b, u.a


def split_forward(
    x: Tensor, qkv_w: Tensor, z_w: Tensor, b_w: Tensor, a_w: Tensor, w: GdnWeights,
    dims: GdnDims, ops: GpuOps,
) -> Tensor:  # fmt: skip
    """The layer from split weights (all heads, one device). ``x [B,T,H]`` -> ``[B,T,H]``."""
    return gdn_core(*split_in_proj(x, qkv_w, z_w, b_w, a_w), w, dims, ops)


def rank_forward(
    x: Tensor, qkvz_rank: Tensor, ba_rank: Tensor, w_rank: GdnWeights, local: GdnDims,
    layout: Layout, ops: GpuOps,
) -> Tensor:  # fmt: skip
    """One TP rank: its contiguous slice of the fused weights -> its partial layer output."""
    return gdn_core(*fused_in_proj(x, qkvz_rank, ba_rank, local, layout, ops), w_rank, local, ops)


def fused_forward(
    x: Tensor, qkvz_w: Tensor, ba_w: Tensor, w: GdnWeights, dims: GdnDims, layout: Layout,
    tp: int, ops: GpuOps,
) -> Tensor:  # fmt: skip
    """All ``tp`` ranks in turn on one device, partials summed (what the all-reduce does)."""
    check_tp(dims, tp)
    local = GdnDims(dims.nk // tp, dims.nv // tp, dims.dk, dims.dv)
    rq, rb = dims.qkvz_rows // tp, dims.ba_rows // tp
    out = None
    for rank in range(tp):
        part = rank_forward(
            x, qkvz_w[rank * rq : (rank + 1) * rq], ba_w[rank * rb : (rank + 1) * rb],
            shard_weights(w, dims, tp, rank), local, layout, ops,
        )  # fmt: skip
        out = part if out is None else out + part
    assert out is not None
    return out


# --- comparison ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """``actual`` vs ``expected`` over a whole layer output."""

    name: str
    rel_rmse: float
    max_abs: float
    rel_rmse_limit: float
    max_abs_limit: float

    @property
    def passed(self) -> bool:
        # written so that NaN fails
        return self.rel_rmse <= self.rel_rmse_limit and self.max_abs <= self.max_abs_limit

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.name}: rel RMSE {self.rel_rmse:.3e} (limit {self.rel_rmse_limit:.0e}), "
            f"max abs {self.max_abs:.3e} (limit {self.max_abs_limit:.3e}) {verdict}"
        )


def compare(
    name: str, actual: Tensor, expected: Tensor, rel_limit: float, scale: float
) -> Comparison:
    """Relative RMSE and max abs error, in float64 on the CPU."""
    act = actual.detach().to("cpu", torch.float64)
    exp = expected.detach().to("cpu", torch.float64)
    if act.shape != exp.shape:
        raise GdnfuseError(f"{name}: shapes differ, {tuple(act.shape)} vs {tuple(exp.shape)}")
    diff = act - exp
    denom = exp.pow(2).mean().sqrt().item()
    rel = diff.pow(2).mean().sqrt().item() / denom if denom > 0 else float("inf")
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    if not torch.isfinite(act).all():
        rel = max_abs = float("nan")
    return Comparison(name, rel, max_abs, rel_limit, MAX_ABS_FRACTION * scale)


@dataclass(frozen=True)
class GpuVerifyResult:
    """One layer's GPU check: fused (rank-split) vs split in bf16, both vs float64."""

    layer: str
    device: str
    dtype: str
    layout: str
    tp: int
    tokens: int
    ops: GpuOps
    comparisons: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def lines(self) -> list[str]:
        head = (
            f"{self.layer} [{self.device}, {self.dtype}, layout {self.layout}, tp {self.tp}, "
            f"{self.tokens} tokens, ops {self.ops}]"
        )
        return [head, *("  " + c.line() for c in self.comparisons)]


def verify_outputs(
    fused: Tensor, split: Tensor | None, reference: Tensor
) -> tuple[Comparison, ...]:
    """The standard comparisons, with the module's thresholds (README: why these)."""
    scale = reference.detach().abs().max().item()
    out = [compare("fused vs float64", fused, reference, REL_RMSE_VS_FLOAT64, scale)]
    if split is not None:
        out.append(compare("split vs float64", split, reference, REL_RMSE_VS_FLOAT64, scale))
        out.append(compare("fused vs split", fused, split, REL_RMSE_FUSED_VS_SPLIT, scale))
    return tuple(out)


@dataclass(frozen=True)
class LayerTensors:
    """One GDN layer's weights as loaded from disk (CPU tensors, checkpoint dtype)."""

    qkv: Tensor
    z: Tensor
    b: Tensor
    a: Tensor
    qkvz: Tensor
    ba: Tensor
    weights: GdnWeights


def _to(w: GdnWeights, device: torch.device, dtype: torch.dtype) -> GdnWeights:
    """Weights on ``device`` in ``dtype``; the gate parameters stay at least float32."""
    gate = torch.promote_types(dtype, torch.float32)
    return GdnWeights(
        conv1d=w.conv1d.to(device, dtype), A_log=w.A_log.to(device, gate),
        dt_bias=w.dt_bias.to(device, gate), norm=w.norm.to(device, dtype),
        out_proj=w.out_proj_weight().to(device, dtype), eps=w.eps,
    )  # fmt: skip


def make_input(hidden: int, tokens: int, seed: int, batch: int = 1) -> Tensor:
    """A float64 CPU input: unit-RMS normal hidden states, like a normed residual stream."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, hidden, generator=gen, dtype=torch.float64)


def reference_forward(x64: Tensor, t: LayerTensors, dims: GdnDims) -> Tensor:
    """The float64 CPU reference of the split layer (naive.py), ``[B,T,H]``."""
    w = t.weights
    w64 = GdnWeights(w.conv1d.double(), w.A_log.double(), w.dt_bias.double(), w.norm.double(),
                     w.out_proj_weight().double(), eps=w.eps)  # fmt: skip
    return naive.split_forward(
        x64, t.qkv.double(), t.z.double(), t.b.double(), t.a.double(), w64, dims
    )


def gpu_verify_layer(
    layer: str,
    tensors: LayerTensors,
    dims: GdnDims,
    layout: Layout | str,
    *,
    tp: int = 1,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    tokens: int = 64,
    seed: int = 0,
    ops: GpuOps | None = None,
    reference: Tensor | None = None,
) -> GpuVerifyResult:
    """Check one layer on ``device``: fused (``tp`` ranks in turn, partials summed) vs split.

    Both run in ``dtype`` with the same ops after the in-projection; both are compared with the
    float64 reference forward of the split weights (computed here unless ``reference`` is given).
    """
    dev = torch.device(device)
    layout = Layout(layout)
    ops = ops or pick_ops(dev)
    x64 = make_input(tensors.qkv.shape[1], tokens, seed)
    ref = reference if reference is not None else reference_forward(x64, tensors, dims)
    x = x64.to(dev, dtype)
    w = _to(tensors.weights, dev, dtype)
    with torch.no_grad():
        qkv, z, b, a = (p.to(dev, dtype) for p in (tensors.qkv, tensors.z, tensors.b, tensors.a))
        split = split_forward(x, qkv, z, b, a, w, dims, ops)
        fused = fused_forward(
            x, tensors.qkvz.to(dev, dtype), tensors.ba.to(dev, dtype), w, dims, layout, tp, ops
        )
    return GpuVerifyResult(
        layer, str(dev), str(dtype).removeprefix("torch."), str(layout), tp, tokens, ops,
        verify_outputs(fused, split, ref),
    )  # fmt: skip


def summarize(results: Sequence[GpuVerifyResult]) -> dict:
    """Plain data for JSON reports."""
    return {
        "passed": all(r.passed for r in results),
        "layers": [
            {
                "layer": r.layer, "device": r.device, "dtype": r.dtype, "layout": r.layout,
                "tp": r.tp, "tokens": r.tokens, "ops": vars(r.ops), "passed": r.passed,
                "comparisons": [
                    {"name": c.name, "rel_rmse": c.rel_rmse, "max_abs": c.max_abs,
                     "rel_rmse_limit": c.rel_rmse_limit, "max_abs_limit": c.max_abs_limit,
                     "passed": c.passed}
                    for c in r.comparisons
                ],
            }
            for r in results
        ],
    }  # fmt: skip
