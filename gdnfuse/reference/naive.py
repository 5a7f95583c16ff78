"""Plain-PyTorch forward of one Gated DeltaNet layer, from split or from fused projections.

This is the numerical ground truth for the layouts: the split path is checked against
transformers' ``Qwen3_5GatedDeltaNet``, and the fused path slices and splits the fused weights
the way an engine's TP rank does, so a wrong layout shows up as a wrong layer output rather
than as a wrong table. Everything is a slow, readable loop on purpose (float64 on CPU in the
tests); nothing here is meant for speed.

The fused path deliberately does not use :mod:`gdnfuse.layout`'s run tables: the consumer's
split is written out independently (``fix_query_key_value_ordering`` for ``qwen3-next``, a
direct size split for ``tp-blocked``), so agreement is evidence, not a tautology.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import (
    BA,
    QKV,
    QKVZ,
    A,
    B,
    GdnDims,
    Layout,
    Z,
    check_tp,
    fused_runs,
    unfuse_runs,
)

_L2NORM_EPS = 1e-6
"""Epsilon of the q/k L2 norm, inside the square root (transformers' ``l2norm``, fla's kernels)."""


@dataclass(frozen=True)
class GdnWeights:
    """The weights of a GDN layer besides the in-projections; fusion leaves them unchanged."""

    conv1d: Tensor
    """``[2*nk*dk + nv*dv, 1, K]``, channels ``[Q; K; V]``, head-major inside each block."""
    A_log: Tensor
    """``[nv]``."""
    dt_bias: Tensor
    """``[nv]``."""
    norm: Tensor
    """``[dv]``, gated RMSNorm weight, applied as ``w`` (not ``1 + w``)."""
    out_proj: Tensor | None = None
    """``[H, nv*dv]``; None where the caller applies it itself (:func:`gdn_heads`)."""
    eps: float = 1e-6
    """Gated RMSNorm epsilon (``rms_norm_eps``)."""

    def out_proj_weight(self) -> Tensor:
        """``out_proj``, which this forward needs (the head-output functions do not)."""
        if self.out_proj is None:
            raise GdnfuseError("GdnWeights.out_proj is None: apply out_proj to gdn_heads' output")
        return self.out_proj


def shard_weights(w: GdnWeights, dims: GdnDims, tp: int, rank: int) -> GdnWeights:
    """Rank ``rank``'s own heads of the unfused weights, as an engine shards them.

    The conv channels are ``[Q; K; V]`` for all heads, so a rank takes three separate channel
    ranges (its q heads, k heads, v heads); ``out_proj`` is row-parallel, so a rank takes its
    value heads' input columns. ``norm`` acts per head and is shared.
    """
    check_tp(dims, tp)
    if not 0 <= rank < tp:
        raise GdnfuseError(f"rank {rank} is not in 0..{tp - 1}")
    nk_t, nv_t, dk, dv = dims.nk // tp, dims.nv // tp, dims.dk, dims.dv
    q0, k0, v0 = 0, dims.nk * dk, 2 * dims.nk * dk
    qs = slice(q0 + rank * nk_t * dk, q0 + (rank + 1) * nk_t * dk)
    ks = slice(k0 + rank * nk_t * dk, k0 + (rank + 1) * nk_t * dk)
    vs = slice(v0 + rank * nv_t * dv, v0 + (rank + 1) * nv_t * dv)
    heads = slice(rank * nv_t, (rank + 1) * nv_t)
    return GdnWeights(
        conv1d=torch.cat([w.conv1d[qs], w.conv1d[ks], w.conv1d[vs]]),
        A_log=w.A_log[heads],
        dt_bias=w.dt_bias[heads],
        norm=w.norm,
        out_proj=None
        if w.out_proj is None
        else w.out_proj[:, rank * nv_t * dv : (rank + 1) * nv_t * dv],
        eps=w.eps,
    )


def causal_conv_silu(mixed_qkv: Tensor, conv1d: Tensor) -> Tensor:
    """Depthwise causal conv over time, then SiLU: ``[B, T, C]`` with weight ``[C, 1, K]``.

    Written as a sum of shifted copies so that channel ``c`` only ever sees channel ``c``.
    """
    t, width = mixed_qkv.shape[1], conv1d.shape[-1]
    padded = F.pad(mixed_qkv, (0, 0, width - 1, 0))  # K-1 zero steps before t=0
    taps = conv1d[:, 0, :]  # [C, K]; tap K-1 multiplies the current step
    out = padded[:, :t, :] * taps[:, 0]
    for j in range(1, width):
        out = out + padded[:, j : j + t, :] * taps[:, j]
    return F.silu(out)


def l2norm(x: Tensor) -> Tensor:
    """Per-head L2 normalisation over the last dim, epsilon inside the root (as transformers)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + _L2NORM_EPS)


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> Tensor:
    """Recurrent gated delta rule, one time step at a time, in the inputs' dtype.

    ``q, k [B, T, nk, dk]`` (already L2-normalised and scaled), ``v [B, T, nv, dv]``,
    ``g, beta [B, T, nv]``. Value head ``j`` reads key head ``j // r`` (``repeat_interleave``).
    State ``S [B, nv, dk, dv]``: ``S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q``.
    """
    r = v.shape[2] // k.shape[2]
    q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
    bsz, t, nv, dv = v.shape
    state = v.new_zeros(bsz, nv, k.shape[-1], dv)
    out = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        k_i = k[:, i]
        predicted = torch.einsum("bhkv,bhk->bhv", state, k_i)
        delta = (v[:, i] - predicted) * beta[:, i, :, None]
        state = state + k_i[..., :, None] * delta[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, i]))
    return torch.stack(out, dim=1)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMS-normalise each value head's output, scale by ``weight``, gate by ``silu(z)``."""
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * x * F.silu(z)


def gdn_heads(
    mixed_qkv: Tensor, z: Tensor, b: Tensor, a: Tensor, w: GdnWeights, dims: GdnDims
) -> Tensor:
    """Everything after the in-projections and before ``out_proj``, for the heads that
    ``dims`` and ``w`` describe (``w.out_proj`` is not used).

    ``mixed_qkv [B, T, 2*nk*dk + nv*dv]`` must already be in conv channel order ``[Q; K; V]``
    (the conv mixes time, so it acts on projected channels, not on heads); ``z [B, T, nv, dv]``,
    ``b, a [B, T, nv]``. For one TP rank pass that rank's dims and :func:`shard_weights`.
    Returns the gated, normalised head outputs ``[B, T, nv*dv]``.
    """
    bsz, t, _ = mixed_qkv.shape
    nk, nv, dk, dv = dims.nk, dims.nv, dims.dk, dims.dv
    if mixed_qkv.shape[-1] != dims.qkv_rows or w.conv1d.shape[0] != dims.qkv_rows:
        raise GdnfuseError(
            f"conv input has {mixed_qkv.shape[-1]} channels and conv1d {w.conv1d.shape[0]}, "
            f"expected 2*nk*dk + nv*dv = {dims.qkv_rows}"
        )
    mixed = causal_conv_silu(mixed_qkv, w.conv1d)
    q, k, v = torch.split(mixed, [nk * dk, nk * dk, nv * dv], dim=-1)
    q = l2norm(q.reshape(bsz, t, nk, dk)) * dk**-0.5
    k = l2norm(k.reshape(bsz, t, nk, dk))
    v = v.reshape(bsz, t, nv, dv)
    beta = torch.sigmoid(b)
    g = -w.A_log.exp() * F.softplus(a + w.dt_bias)
    o = gated_delta_rule(q, k, v, g, beta)
    return gated_rms_norm(o, z, w.norm, w.eps).reshape(bsz, t, nv * dv)


def split_heads(
    qkv: Tensor, z: Tensor, b: Tensor, a: Tensor, w: GdnWeights, dims: GdnDims
) -> Tensor:
    """:func:`gdn_heads` from the split projections' outputs ``x @ W.T`` (``qkv [B, T,
    2*nk*dk + nv*dv]``, ``z [B, T, nv*dv]``, ``b, a [B, T, nv]``), as ``Qwen3_5GatedDeltaNet``.

    Taking projected outputs rather than weights lets a caller project in row chunks, so a
    layer is never held whole (``verify`` at 27B shapes)."""
    bsz, t, _ = qkv.shape
    return gdn_heads(qkv, z.reshape(bsz, t, dims.nv, dims.dv), b, a, w, dims)


def split_forward(
    x: Tensor,
    qkv_w: Tensor,
    z_w: Tensor,
    b_w: Tensor,
    a_w: Tensor,
    w: GdnWeights,
    dims: GdnDims,
) -> Tensor:
    """The layer from Qwen3.5's split projections, as ``Qwen3_5GatedDeltaNet`` (no cache/mask).

    ``x [B, T, H]`` -> ``[B, T, H]``.
    """
    heads = split_heads(x @ qkv_w.T, x @ z_w.T, x @ b_w.T, x @ a_w.T, w, dims)
    return heads @ w.out_proj_weight().T


def _check_fused_rows(qkvz_rows: int, ba_rows: int, dims: GdnDims) -> None:
    if qkvz_rows != dims.qkvz_rows or ba_rows != dims.ba_rows:
        raise GdnfuseError(
            f"fused weights have {qkvz_rows} and {ba_rows} rows, expected "
            f"{dims.qkvz_rows} (in_proj_qkvz) and {dims.ba_rows} (in_proj_ba)"
        )


def _consumer_split(
    qkvz: Tensor, ba: Tensor, local: GdnDims, layout: Layout
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Split one rank's projected ``[B, T, rows]`` the way that layout's consumer does.

    Returns ``q, k [B, T, nk_t, dk]``, ``v, z [B, T, nv_t, dv]``, ``b, a [B, T, nv_t]``.
    """
    bsz, t, _ = qkvz.shape
    nk, nv, dk, dv, r = local.nk, local.nv, local.dk, local.dv, local.r
    if layout == Layout.QWEN3_NEXT:
        # Qwen3NextGatedDeltaNet.fix_query_key_value_ordering, applied to the local shard.
        q, k, v, z = torch.split(
            qkvz.reshape(bsz, t, nk, 2 * dk + 2 * r * dv),
            [dk, dk, r * dv, r * dv],
            dim=3,
        )
        b, a = torch.split(ba.reshape(bsz, t, nk, 2 * r), [r, r], dim=3)
    elif layout == Layout.TP_BLOCKED:
        # MergedColumnParallelLinear's local output: [q_t | k_t | v_t | z_t], [b_t | a_t].
        q, k, v, z = torch.split(qkvz, [nk * dk, nk * dk, nv * dv, nv * dv], dim=-1)
        b, a = torch.split(ba, [nv, nv], dim=-1)
    else:
        raise GdnfuseError(f"unknown layout {layout!r}")
    return (
        q.reshape(bsz, t, nk, dk),
        k.reshape(bsz, t, nk, dk),
        v.reshape(bsz, t, nv, dv),
        z.reshape(bsz, t, nv, dv),
        b.reshape(bsz, t, nv),
        a.reshape(bsz, t, nv),
    )


def fused_heads(
    qkvz: Tensor, ba: Tensor, w: GdnWeights, dims: GdnDims, layout: Layout, tp: int
) -> Tensor:
    """:func:`gdn_heads` from the fused projections' outputs (``qkvz = x @ in_proj_qkvz.T``,
    ``ba = x @ in_proj_ba.T``), as ``tp`` ranks of an engine expecting ``layout`` run them.

    Each rank takes a contiguous ``1/tp`` of the fused output channels (column-parallel
    in-projection: the same as taking ``1/tp`` of the fused rows), splits it per the layout's
    consumer and runs its own heads. The ranks' head outputs are concatenated in rank order,
    which is the value-head order ``out_proj``'s columns follow: applying ``out_proj`` to the
    result is the row-parallel sum of the ranks' partial outputs.
    """
    check_tp(dims, tp)
    _check_fused_rows(qkvz.shape[-1], ba.shape[-1], dims)
    local = GdnDims(dims.nk // tp, dims.nv // tp, dims.dk, dims.dv)
    qkvz_t, ba_t = dims.qkvz_rows // tp, dims.ba_rows // tp
    parts = []
    for rank in range(tp):
        q, k, v, z, b, a = _consumer_split(
            qkvz[..., rank * qkvz_t : (rank + 1) * qkvz_t],
            ba[..., rank * ba_t : (rank + 1) * ba_t],
            local,
            layout,
        )
        mixed_qkv = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
        parts.append(gdn_heads(mixed_qkv, z, b, a, shard_weights(w, dims, tp, rank), local))
    return torch.cat(parts, dim=-1)


def fused_forward(
    x: Tensor,
    qkvz_w: Tensor,
    ba_w: Tensor,
    w: GdnWeights,
    dims: GdnDims,
    layout: Layout,
    tp: int,
) -> Tensor:
    """The layer from fused projections, as ``tp`` ranks of an engine expecting ``layout`` run it
    (:func:`fused_heads`, then ``out_proj``). ``x [B, T, H]`` -> ``[B, T, H]``."""
    return fused_heads(x @ qkvz_w.T, x @ ba_w.T, w, dims, layout, tp) @ w.out_proj_weight().T


def resplit(
    qkvz_w: Tensor, ba_w: Tensor, dims: GdnDims, layout: Layout, tp: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recover ``(in_proj_qkv, in_proj_z, in_proj_b, in_proj_a)`` from fused weights, exactly.

    Pure row copies (any dtype), driven by the layout's run table read backwards.
    """
    _check_fused_rows(qkvz_w.shape[0], ba_w.shape[0], dims)
    out: dict[str, Tensor] = {}
    for name, tensor in ((QKVZ, qkvz_w), (BA, ba_w)):
        for source, placed in unfuse_runs(fused_runs(name, dims, layout, tp)).items():
            dst = tensor.new_empty((dims.source_rows(source), *tensor.shape[1:]))
            for row, run in placed:
                dst[run.start : run.start + run.count] = tensor[row : row + run.count]
            out[source] = dst
    return out[QKV], out[Z], out[B], out[A]
