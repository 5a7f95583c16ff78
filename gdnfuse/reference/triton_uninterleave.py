"""One-pass un-interleave of a rank's fused GDN projection output (Triton, with a torch fallback).

A fused in-projection ``x @ in_proj_qkvz.T`` gives one rank's ``[N, 2*nk*dk + 2*nv*dv]`` in the
checkpoint's recorded layout (docs/layouts.md section 3): per key-head group
``[q_h, k_h, v_group, z_group]`` for ``qwen3-next``, ``[q | k | v | z]`` for ``tp-blocked``. The
conv wants its channels as ``[Q; K; V]`` and the norm wants ``z`` on its own, so a consumer must
reorder columns. Qwen3-Next does it with ``view/split/cat`` (several passes and launches, more
than the fusion saves, docs/layouts.md section 10); this kernel reads each element once and
writes it once, for ``ba`` as well, in a single launch.

Work split: program ``(t, h, s)`` copies one ``[BLOCK_T, head_dim]`` tile, segment ``s`` of key-head
group ``h`` (``q_h``, ``k_h``, then the group's ``r`` value heads of ``v`` and of ``z``); segment 0
also copies the group's ``r`` columns of ``b`` and of ``a``. Every tile row is a contiguous run of
``head_dim`` elements in source and destination, so loads and stores are wide and coalesced.

``dims`` are always the *local* (per-rank) dims: ``GdnDims(nk // tp, nv // tp, dk, dv)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import GdnDims, Layout

try:  # optional: the gpu extra; without it only the torch path exists
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


@dataclass(frozen=True)
class Uninterleaved:
    """One rank's projection output, split as the conv, the gates and the norm consume it."""

    mixed_qkv: Tensor
    """``[..., 2*nk*dk + nv*dv]``, channels ``[Q; K; V]`` (the conv's order)."""
    z: Tensor
    """``[..., nv*dv]``, value-head-major."""
    b: Tensor
    """``[..., nv]``."""
    a: Tensor
    """``[..., nv]``."""


def triton_available() -> bool:
    return triton is not None


def _check(qkvz: Tensor, ba: Tensor, dims: GdnDims) -> None:
    if qkvz.shape[-1] != dims.qkvz_rows or ba.shape[-1] != dims.ba_rows:
        raise GdnfuseError(
            f"projection outputs have {qkvz.shape[-1]} and {ba.shape[-1]} columns, expected "
            f"{dims.qkvz_rows} (qkvz) and {dims.ba_rows} (ba) for local dims {dims}"
        )
    if qkvz.shape[:-1] != ba.shape[:-1]:
        raise GdnfuseError(f"qkvz {tuple(qkvz.shape)} and ba {tuple(ba.shape)} differ in tokens")


def uninterleave_torch(qkvz: Tensor, ba: Tensor, dims: GdnDims, layout: Layout) -> Uninterleaved:
    """The reorder as the consumers write it in PyTorch (``view/split/cat``); the fallback path.

    ``qwen3-next`` is Qwen3-Next's ``fix_query_key_value_ordering`` plus the ``cat`` that feeds
    the conv; ``tp-blocked`` is a plain split and returns views (no copy).
    """
    _check(qkvz, ba, dims)
    lead = qkvz.shape[:-1]
    nk, nv, dk, dv, r = dims.nk, dims.nv, dims.dk, dims.dv, dims.r
    if Layout(layout) is Layout.QWEN3_NEXT:
        q, k, v, z = torch.split(
            qkvz.reshape(*lead, nk, 2 * dk + 2 * r * dv), [dk, dk, r * dv, r * dv], dim=-1
        )
        b, a = torch.split(ba.reshape(*lead, nk, 2 * r), [r, r], dim=-1)
        mixed = torch.cat([q.reshape(*lead, -1), k.reshape(*lead, -1), v.reshape(*lead, -1)], -1)
        return Uninterleaved(
            mixed, z.reshape(*lead, nv * dv), b.reshape(*lead, nv), a.reshape(*lead, nv)
        )
    mixed, z = torch.split(qkvz, [dims.qkv_rows, dims.z_rows], dim=-1)
    b, a = torch.split(ba, [nv, nv], dim=-1)
    return Uninterleaved(mixed, z, b, a)


if triton is not None:

    @triton.jit
    def _uninterleave_kernel(
        qkvz, ba, mixed, z, b, a, n_tokens,
        s_qkvz, s_ba, s_mixed, s_z, s_b, s_a,
        NK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, R: tl.constexpr,
        GROUPED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        # One body, no helper functions: Triton's interpreter (CPU tests) cannot call a nested
        # @triton.jit function unless TRITON_INTERPRET was set before this module was imported.
        # Each branch loads and stores itself, so the compiler keeps the offsets' alignment
        # (pointers merged out of branches lose it, and with it the 16-byte accesses).
        h = tl.program_id(1)
        s = tl.program_id(2)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows[:, None] < n_tokens
        cols = tl.arange(0, BLOCK_D)
        src_rows = qkvz + rows[:, None] * s_qkvz
        if GROUPED:  # qwen3-next: group h = [q_h, k_h, v_{hr..hr+r-1}, z_{same}]
            src_q = h * (2 * DK + 2 * R * DV)
            src_k = src_q + DK
            src_v = src_q + 2 * DK
            src_z = src_v + R * DV
        else:  # tp-blocked: [Q | K | V | Z]
            src_q = h * DK
            src_k = NK * DK + h * DK
            src_v = 2 * NK * DK + h * R * DV
            src_z = 2 * NK * DK + NK * R * DV + h * R * DV
        if s < 2:  # q_h or k_h -> [Q; K] part of the conv input
            src = src_rows + (src_q + s * (src_k - src_q) + cols)[None, :]
            dst = mixed + rows[:, None] * s_mixed + (s * NK * DK + h * DK + cols)[None, :]
            mask = row_ok & (cols < DK)[None, :]
            tl.store(dst, tl.load(src, mask=mask), mask=mask)
        elif s < 2 + R:  # value head h*r + j -> V part of the conv input
            j = s - 2
            src = src_rows + (src_v + j * DV + cols)[None, :]
            dst = mixed + rows[:, None] * s_mixed + (2 * NK * DK + (h * R + j) * DV + cols)[None, :]
            mask = row_ok & (cols < DV)[None, :]
            tl.store(dst, tl.load(src, mask=mask), mask=mask)
        else:  # gate head h*r + j -> z
            j = s - 2 - R
            src = src_rows + (src_z + j * DV + cols)[None, :]
            dst = z + rows[:, None] * s_z + ((h * R + j) * DV + cols)[None, :]
            mask = row_ok & (cols < DV)[None, :]
            tl.store(dst, tl.load(src, mask=mask), mask=mask)
        if s == 0:  # the group's r columns of b and of a
            if GROUPED:
                src_b = h * 2 * R
                src_a = src_b + R
            else:
                src_b = h * R
                src_a = NK * R + h * R
            rc = tl.arange(0, BLOCK_R)
            rmask = row_ok & (rc < R)[None, :]
            ba_rows = ba + rows[:, None] * s_ba
            vb = tl.load(ba_rows + (src_b + rc)[None, :], mask=rmask)
            va = tl.load(ba_rows + (src_a + rc)[None, :], mask=rmask)
            tl.store(b + rows[:, None] * s_b + (h * R + rc)[None, :], vb, mask=rmask)
            tl.store(a + rows[:, None] * s_a + (h * R + rc)[None, :], va, mask=rmask)


def _pow2(n: int) -> int:
    return max(2, 1 << max(0, (n - 1).bit_length()))  # >= 2: no 1-wide Triton tensors


def default_block_t(n_tokens: int) -> int:
    """Tokens per tile: small for decode (more programs than tokens is waste), 32 otherwise."""
    return min(32, _pow2(n_tokens))


def uninterleave_triton(
    qkvz: Tensor,
    ba: Tensor,
    dims: GdnDims,
    layout: Layout,
    *,
    block_t: int | None = None,
    num_warps: int = 4,
) -> Uninterleaved:
    """The reorder in one Triton launch. CPU tensors run in Triton's interpreter (tests)."""
    if triton is None:
        raise GdnfuseError("triton is not installed (pip install 'gdnfuse[gpu]')")
    _check(qkvz, ba, dims)
    lead = qkvz.shape[:-1]
    src = qkvz.reshape(-1, dims.qkvz_rows)
    src_ba = ba.reshape(-1, dims.ba_rows)
    if src.stride(-1) != 1:
        src = src.contiguous()
    if src_ba.stride(-1) != 1:
        src_ba = src_ba.contiguous()
    n = src.shape[0]
    mixed = src.new_empty((n, dims.qkv_rows))
    z = src.new_empty((n, dims.z_rows))
    b = src_ba.new_empty((n, dims.nv))
    a = src_ba.new_empty((n, dims.nv))
    if n:
        bt = block_t or default_block_t(n)
        kernel = _uninterleave_kernel
        if src.device.type == "cpu":  # no CPU backend: run the same kernel in the interpreter
            from triton.runtime.interpreter import InterpretedFunction

            kernel = InterpretedFunction(_uninterleave_kernel.fn)
        grid = (triton.cdiv(n, bt), dims.nk, 2 + 2 * dims.r)
        kernel[grid](
            src, src_ba, mixed, z, b, a, n,
            src.stride(0), src_ba.stride(0), mixed.stride(0), z.stride(0), b.stride(0),
            a.stride(0),
            NK=dims.nk, DK=dims.dk, DV=dims.dv, R=dims.r,
            GROUPED=Layout(layout) is Layout.QWEN3_NEXT, BLOCK_T=bt,
            BLOCK_D=_pow2(max(dims.dk, dims.dv)), BLOCK_R=_pow2(dims.r),
            num_warps=num_warps,
        )  # fmt: skip
    return Uninterleaved(
        mixed.reshape(*lead, dims.qkv_rows),
        z.reshape(*lead, dims.z_rows),
        b.reshape(*lead, dims.nv),
        a.reshape(*lead, dims.nv),
    )


def uninterleave(
    qkvz: Tensor, ba: Tensor, dims: GdnDims, layout: Layout, *, backend: str = "auto"
) -> Uninterleaved:
    """Split a rank's fused projection output; ``backend`` is ``auto``, ``triton`` or ``torch``.

    ``auto`` takes Triton for CUDA tensors when it is installed, torch otherwise (on CPU the
    interpreter is for tests, far too slow for a real forward).
    """
    if backend == "auto":
        backend = "triton" if triton is not None and qkvz.is_cuda else "torch"
    if backend == "triton":
        return uninterleave_triton(qkvz, ba, dims, layout)
    if backend == "torch":
        return uninterleave_torch(qkvz, ba, dims, layout)
    raise GdnfuseError(f"unknown un-interleave backend {backend!r} (auto, triton, torch)")


def moved_bytes(n_tokens: int, dims: GdnDims, itemsize: int) -> int:
    """Bytes the un-interleave must move at least: every element read once and written once."""
    return 2 * n_tokens * (dims.qkvz_rows + dims.ba_rows) * itemsize
