"""Layout math: which source rows make up each fused GDN tensor, in order.

Pure functions on small frozen dataclasses; no I/O and no torch. A fused tensor is a
row permutation of its sources, described as a sequence of :class:`RowRun` (a run of
consecutive rows of one source tensor). The same description serves fusing (read the
runs in order), un-fusing (read it backwards) and the FP8 scale tensors (call it with
dims measured in 128-row blocks instead of rows, see :meth:`GdnDims.in_blocks`).

See docs/layouts.md section 3 for the two layouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from gdnfuse.errors import GdnfuseError, option

# The split source tensors of one GDN layer, and the two fused tensors.
QKV, Z, B, A = "qkv", "z", "b", "a"
QKVZ, BA = "qkvz", "ba"
FUSED_SOURCES: dict[str, tuple[str, ...]] = {QKVZ: (QKV, Z), BA: (B, A)}


class Layout(StrEnum):
    """Row order of the fused tensors."""

    QWEN3_NEXT = "qwen3-next"
    """Per key-head group ``[Q_h; K_h; V_group; Z_group]`` (Hugging Face Qwen3-Next)."""
    TP_BLOCKED = "tp-blocked"
    """Per TP rank ``[q_t; k_t; v_t; z_t]`` (pre-sharded loaders; T=1 is plain ``[Q;K;V;Z]``)."""


@dataclass(frozen=True)
class GdnDims:
    """Head counts and head sizes of one GDN layer (docs/layouts.md section 1)."""

    nk: int
    nv: int
    dk: int
    dv: int

    def __post_init__(self) -> None:
        for name in ("nk", "nv", "dk", "dv"):
            if getattr(self, name) <= 0:
                raise GdnfuseError(f"GDN dimension {name}={getattr(self, name)} must be positive")
        if self.nv % self.nk:
            raise GdnfuseError(
                f"linear_num_value_heads={self.nv} is not a multiple of "
                f"linear_num_key_heads={self.nk}"
            )

    @property
    def r(self) -> int:
        """Value heads per key head; value head j belongs to key head j // r."""
        return self.nv // self.nk

    @property
    def qkv_rows(self) -> int:
        return 2 * self.nk * self.dk + self.nv * self.dv

    @property
    def z_rows(self) -> int:
        return self.nv * self.dv

    @property
    def qkvz_rows(self) -> int:
        return self.qkv_rows + self.z_rows

    @property
    def ba_rows(self) -> int:
        return 2 * self.nv

    def source_rows(self, source: str) -> int:
        """Row count of a split source tensor (``qkv``, ``z``, ``b`` or ``a``)."""
        return {QKV: self.qkv_rows, Z: self.z_rows, B: self.nv, A: self.nv}[source]

    def in_blocks(self, block: int) -> GdnDims:
        """The same layer measured in blocks of ``block`` rows (FP8 ``weight_scale_inv`` rows).

        Only expressible when every head covers whole blocks; otherwise a scale row would
        straddle two heads that the fusion moves apart.
        """
        if self.dk % block or self.dv % block:
            raise GdnfuseError(
                f"head dims dk={self.dk}, dv={self.dv} do not cover whole {block}-row quantization "
                "blocks, so the block scales cannot be permuted with the rows"
            )
        return GdnDims(self.nk, self.nv, self.dk // block, self.dv // block)


@dataclass(frozen=True)
class RowRun:
    """``count`` consecutive rows of split source ``source`` starting at row ``start``."""

    source: str
    start: int
    count: int


def valid_tp(nk: int) -> list[int]:
    """TP sizes a fused layout can serve: the divisors of the key-head count."""
    return [t for t in range(1, nk + 1) if nk % t == 0]


def check_tp(dims: GdnDims, tp: int) -> None:
    if tp < 1 or dims.nk % tp:
        raise GdnfuseError(
            f"{option('tp', tp)} does not divide linear_num_key_heads={dims.nk}; "
            f"valid values: {', '.join(map(str, valid_tp(dims.nk)))}"
        )


def qkvz_runs(dims: GdnDims, layout: Layout, tp: int = 1) -> tuple[RowRun, ...]:
    """Source rows of ``in_proj_qkvz`` in output order."""
    check_tp(dims, tp)
    nk, dk, dv, r = dims.nk, dims.dk, dims.dv, dims.r
    q0, k0, v0 = 0, nk * dk, 2 * nk * dk
    if layout is Layout.QWEN3_NEXT:
        runs = []
        for h in range(nk):
            runs += [
                RowRun(QKV, q0 + h * dk, dk),
                RowRun(QKV, k0 + h * dk, dk),
                RowRun(QKV, v0 + h * r * dv, r * dv),
                RowRun(Z, h * r * dv, r * dv),
            ]
        return tuple(runs)
    nk_t, nv_t = nk // tp, dims.nv // tp
    runs = []
    for t in range(tp):
        runs += [
            RowRun(QKV, q0 + t * nk_t * dk, nk_t * dk),
            RowRun(QKV, k0 + t * nk_t * dk, nk_t * dk),
            RowRun(QKV, v0 + t * nv_t * dv, nv_t * dv),
            RowRun(Z, t * nv_t * dv, nv_t * dv),
        ]
    return tuple(runs)


def ba_runs(dims: GdnDims, layout: Layout, tp: int = 1) -> tuple[RowRun, ...]:
    """Source rows of ``in_proj_ba`` in output order."""
    check_tp(dims, tp)
    r = dims.r
    if layout is Layout.QWEN3_NEXT:
        return tuple(
            run for h in range(dims.nk) for run in (RowRun(B, h * r, r), RowRun(A, h * r, r))
        )
    nv_t = dims.nv // tp
    return tuple(
        run for t in range(tp) for run in (RowRun(B, t * nv_t, nv_t), RowRun(A, t * nv_t, nv_t))
    )


def fused_runs(fused: str, dims: GdnDims, layout: Layout, tp: int = 1) -> tuple[RowRun, ...]:
    """Runs of ``qkvz`` or ``ba``."""
    return qkvz_runs(dims, layout, tp) if fused == QKVZ else ba_runs(dims, layout, tp)


def coalesce(runs: Iterable[RowRun]) -> tuple[RowRun, ...]:
    """Merge runs that continue each other in the same source (fewer, larger copies)."""
    out: list[RowRun] = []
    for run in runs:
        if out and out[-1].source == run.source and out[-1].start + out[-1].count == run.start:
            out[-1] = RowRun(run.source, out[-1].start, out[-1].count + run.count)
        else:
            out.append(run)
    return tuple(out)


def row_permutation(runs: Sequence[RowRun], sources: Sequence[str]) -> list[int]:
    """Fused row i comes from row ``perm[i]`` of the sources stacked in ``sources`` order.

    A plain index list, for tests and for torch/numpy users who want ``stacked[perm]``.
    """
    base, offset = {}, 0
    for name in sources:
        base[name] = offset
        offset += max((r.start + r.count for r in runs if r.source == name), default=0)
    return [base[r.source] + r.start + i for r in runs for i in range(r.count)]


def unfuse_runs(runs: Sequence[RowRun]) -> dict[str, list[tuple[int, RowRun]]]:
    """For each source, where its rows sit in the fused tensor: ``[(fused_row, run), ...]``.

    Reading the fused tensor at ``fused_row .. fused_row + run.count`` gives source rows
    ``run.start .. run.start + run.count``: the inverse table that ``verify`` uses.
    """
    where: dict[str, list[tuple[int, RowRun]]] = {}
    row = 0
    for run in runs:
        where.setdefault(run.source, []).append((row, run))
        row += run.count
    return where
