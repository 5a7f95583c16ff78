"""The reference GDN forward against transformers, and the layouts against the reference.

transformers 5.24 runs the delta rule and the gated norm in float32 even for a float64 module
(``.to(torch.float32)`` in ``torch_chunk_gated_delta_rule`` and ``Qwen3_5RMSNormGated``), and
computes ``-A_log.float().exp()``. So a float64 reference can agree with it as shipped only to
about 1e-7. For the 1e-12 comparisons the ``transformers_f64`` fixture rebinds ``torch`` in the
two modeling modules to a namespace whose ``float32`` is ``float64`` (their code is otherwise run
unchanged), and those layers use ``A_log = 0`` (``exp`` of anything else is inexact in float32)
and a dyadic ``x`` and ``in_proj_a`` (so ``a.float()`` is exact). The as-shipped comparison is
kept too, with a float32-sized tolerance and unrestricted weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from transformers import Qwen3_5TextConfig, Qwen3NextConfig
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
from transformers.models.qwen3_next import modeling_qwen3_next
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from gdnfuse.layout import (
    BA,
    QKVZ,
    GdnDims,
    Layout,
    RowRun,
    ba_runs,
    fused_runs,
    qkvz_runs,
    valid_tp,
)
from gdnfuse.reference import GdnWeights, fused_forward, resplit, split_forward

EXACT = 1e-12
"""float64 paths that compute the same math must agree to this (max abs)."""
SHIPPED_REL = 1e-5
"""transformers as shipped (float32 inside) vs the float64 reference, relative to max |out|."""
FAULT = 1e-3
"""A planted layout fault must move the output by more than this (outputs are O(1))."""
CONV_K = 4


@dataclass(frozen=True)
class Case:
    dims: GdnDims
    hidden: int
    tokens: int

    def __str__(self) -> str:
        d = self.dims
        return f"nk{d.nk}-r{d.r}-dk{d.dk}-dv{d.dv}-H{self.hidden}-T{self.tokens}"


# r in 1..4, nk in {2, 4}; dk != dv in most cases so a head-size mix-up cannot cancel.
CASES = [
    Case(GdnDims(nk, r * nk, dk, dv), hidden, tokens)
    for nk, r, dk, dv, hidden, tokens in [
        (2, 1, 8, 4, 32, 5),
        (2, 2, 4, 8, 48, 9),
        (2, 3, 8, 8, 40, 7),
        (2, 4, 16, 4, 64, 6),
        (4, 1, 4, 16, 64, 8),
        (4, 2, 8, 4, 32, 7),
        (4, 3, 4, 4, 48, 5),
        (4, 4, 8, 8, 56, 9),
    ]
]
CASE_TP = [(c, tp) for c in CASES for tp in valid_tp(c.dims.nk)]
# Shapes where the two layouts differ for this tp (nk / tp > 1).
CASE_TP_DIFFER = [(c, tp) for c, tp in CASE_TP if c.dims.nk // tp > 1]


def _ids(params: Sequence[tuple[Case, int]]) -> list[str]:
    return [f"{case}-tp{tp}" for case, tp in params]


@dataclass(frozen=True)
class Layer:
    """Inputs and split weights of one random GDN layer."""

    x: Tensor
    qkv: Tensor
    z: Tensor
    b: Tensor
    a: Tensor
    w: GdnWeights

    @property
    def sources(self) -> dict[str, Tensor]:
        return {"qkv": self.qkv, "z": self.z, "b": self.b, "a": self.a}


def make_layer(case: Case, seed: int, *, zero_a_log: bool = False) -> Layer:
    """Random weights with O(1) activations; ``x`` and ``in_proj_a`` on a dyadic grid.

    The grid makes ``x @ a_w.T`` exact in float32 too (see the module docstring).
    """
    gen = torch.Generator().manual_seed(seed)
    d, h = case.dims, case.hidden

    def normal(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    def dyadic(*shape: int, steps: int, denom: int) -> Tensor:
        ints = torch.randint(-steps, steps + 1, shape, generator=gen, dtype=torch.int64)
        return ints.to(torch.float64) / denom

    a_log = torch.zeros(d.nv, dtype=torch.float64)
    if not zero_a_log:
        a_log = torch.empty(d.nv, dtype=torch.float64).uniform_(-1.0, 1.5, generator=gen)
    return Layer(
        x=dyadic(2, case.tokens, h, steps=16, denom=16),
        qkv=normal(d.qkv_rows, h, std=h**-0.5),
        z=normal(d.z_rows, h, std=h**-0.5),
        b=normal(d.nv, h, std=h**-0.5),
        a=dyadic(d.nv, h, steps=8, denom=64),
        w=GdnWeights(
            conv1d=normal(d.qkv_rows, 1, CONV_K, std=0.5),
            A_log=a_log,
            dt_bias=normal(d.nv, std=0.5),
            norm=1.0 + normal(d.dv, std=0.2),
            out_proj=normal(h, d.nv * d.dv, std=(d.nv * d.dv) ** -0.5),
        ),
    )


def fuse(src: dict[str, Tensor], runs: Sequence[RowRun]) -> Tensor:
    return torch.cat([src[run.source][run.start : run.start + run.count] for run in runs])


def fuse_layer(layer: Layer, dims: GdnDims, layout: Layout, tp: int) -> tuple[Tensor, Tensor]:
    src = layer.sources
    return fuse(src, fused_runs(QKVZ, dims, layout, tp)), fuse(
        src, fused_runs(BA, dims, layout, tp)
    )


def run_split(layer: Layer, dims: GdnDims) -> Tensor:
    return split_forward(layer.x, layer.qkv, layer.z, layer.b, layer.a, layer.w, dims)


def _text_config_kwargs(case: Case, eps: float) -> dict[str, object]:
    d = case.dims
    return dict(
        hidden_size=case.hidden,
        linear_num_key_heads=d.nk,
        linear_num_value_heads=d.nv,
        linear_key_head_dim=d.dk,
        linear_value_head_dim=d.dv,
        linear_conv_kernel_dim=CONV_K,
        rms_norm_eps=eps,
        hidden_act="silu",
        num_hidden_layers=1,
        layer_types=["linear_attention"],
    )


def _common_state(w: GdnWeights) -> dict[str, Tensor]:
    return {
        "conv1d.weight": w.conv1d,
        "A_log": w.A_log,
        "dt_bias": w.dt_bias,
        "norm.weight": w.norm,
        "out_proj.weight": w.out_proj,
    }


def hf_qwen3_5(layer: Layer, case: Case) -> Tensor:
    """transformers' Qwen3.5 GDN layer on the split weights."""
    cfg = Qwen3_5TextConfig(**_text_config_kwargs(case, layer.w.eps))
    module = Qwen3_5GatedDeltaNet(cfg, layer_idx=0).double()
    state = _common_state(layer.w) | {
        "in_proj_qkv.weight": layer.qkv,
        "in_proj_z.weight": layer.z,
        "in_proj_b.weight": layer.b,
        "in_proj_a.weight": layer.a,
    }
    module.load_state_dict(state, strict=True)
    with torch.no_grad():
        return module(layer.x)


def hf_qwen3_next(layer: Layer, case: Case, qkvz: Tensor, ba: Tensor) -> Tensor:
    """transformers' Qwen3-Next GDN layer on fused weights (everything else copied)."""
    cfg = Qwen3NextConfig(**_text_config_kwargs(case, layer.w.eps))
    module = Qwen3NextGatedDeltaNet(cfg, layer_idx=0).double()
    state = _common_state(layer.w) | {"in_proj_qkvz.weight": qkvz, "in_proj_ba.weight": ba}
    module.load_state_dict(state, strict=True)
    with torch.no_grad():
        return module(layer.x)


class _Float64Torch:
    """``torch``, except that ``torch.float32`` names float64 (see the module docstring)."""

    float32 = torch.float64

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)


@pytest.fixture
def transformers_f64(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for module in (modeling_qwen3_5, modeling_qwen3_next):
        monkeypatch.setattr(module, "torch", _Float64Torch())
    yield


def max_diff(x: Tensor, y: Tensor) -> float:
    return (x - y).abs().max().item()


# 1. The split reference is transformers' Qwen3.5 layer.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_split_forward_matches_qwen3_5_exactly(case: Case, transformers_f64: None) -> None:
    layer = make_layer(case, seed=1, zero_a_log=True)
    want = hf_qwen3_5(layer, case)
    assert want.abs().max() > 0.1
    assert max_diff(run_split(layer, case.dims), want) <= EXACT


@pytest.mark.parametrize("case", CASES, ids=str)
def test_split_forward_matches_qwen3_5_as_shipped(case: Case) -> None:
    """Unrestricted weights (random A_log), transformers' own float32 internals."""
    layer = make_layer(case, seed=2)
    want = hf_qwen3_5(layer, case)
    assert max_diff(run_split(layer, case.dims), want) <= SHIPPED_REL * want.abs().max().item()


# 2. qwen3-next: transformers' Qwen3-Next layer and the TP consumers agree with Qwen3.5.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_qwen3_next_layout_in_transformers(case: Case, transformers_f64: None) -> None:
    layer = make_layer(case, seed=3, zero_a_log=True)
    want = hf_qwen3_5(layer, case)
    qkvz, ba = fuse_layer(layer, case.dims, Layout.QWEN3_NEXT, tp=1)
    assert max_diff(hf_qwen3_next(layer, case, qkvz, ba), want) <= EXACT
    for tp in valid_tp(case.dims.nk):
        got = fused_forward(layer.x, qkvz, ba, layer.w, case.dims, Layout.QWEN3_NEXT, tp)
        assert max_diff(got, want) <= EXACT, f"tp={tp}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_qwen3_next_layout_in_transformers_as_shipped(case: Case) -> None:
    """Both transformers classes round the same way, so they agree far below float32 noise."""
    layer = make_layer(case, seed=4)
    qkvz, ba = fuse_layer(layer, case.dims, Layout.QWEN3_NEXT, tp=1)
    assert max_diff(hf_qwen3_next(layer, case, qkvz, ba), hf_qwen3_5(layer, case)) <= EXACT


@pytest.mark.parametrize(("case", "tp"), CASE_TP, ids=_ids(CASE_TP))
def test_qwen3_next_layout_any_tp(case: Case, tp: int) -> None:
    """The qwen3-next tensor is TP-invariant: fused once, served at every tp dividing nk."""
    layer = make_layer(case, seed=5)
    qkvz, ba = fuse_layer(layer, case.dims, Layout.QWEN3_NEXT, tp=1)
    got = fused_forward(layer.x, qkvz, ba, layer.w, case.dims, Layout.QWEN3_NEXT, tp)
    assert max_diff(got, run_split(layer, case.dims)) <= EXACT


# 3. tp-blocked, served at the tp it was fused for.


@pytest.mark.parametrize(("case", "tp"), CASE_TP, ids=_ids(CASE_TP))
def test_tp_blocked_layout(case: Case, tp: int) -> None:
    layer = make_layer(case, seed=6)
    qkvz, ba = fuse_layer(layer, case.dims, Layout.TP_BLOCKED, tp)
    got = fused_forward(layer.x, qkvz, ba, layer.w, case.dims, Layout.TP_BLOCKED, tp)
    assert max_diff(got, run_split(layer, case.dims)) <= EXACT


# 4. Planted faults: the comparisons above can fail.


@pytest.mark.parametrize(("case", "tp"), CASE_TP_DIFFER, ids=_ids(CASE_TP_DIFFER))
def test_fault_qwen3_next_weights_read_as_tp_blocked(case: Case, tp: int) -> None:
    layer = make_layer(case, seed=7)
    qkvz, ba = fuse_layer(layer, case.dims, Layout.QWEN3_NEXT, tp=1)
    got = fused_forward(layer.x, qkvz, ba, layer.w, case.dims, Layout.TP_BLOCKED, tp)
    assert max_diff(got, run_split(layer, case.dims)) > FAULT


@pytest.mark.parametrize(("case", "tp"), CASE_TP_DIFFER, ids=_ids(CASE_TP_DIFFER))
def test_fault_tp_blocked_weights_read_as_qwen3_next(case: Case, tp: int) -> None:
    layer = make_layer(case, seed=8)
    qkvz, ba = fuse_layer(layer, case.dims, Layout.TP_BLOCKED, tp)
    got = fused_forward(layer.x, qkvz, ba, layer.w, case.dims, Layout.QWEN3_NEXT, tp)
    assert max_diff(got, run_split(layer, case.dims)) > FAULT


def _swap_groups(runs: Sequence[RowRun], group_len: int, i: int, j: int) -> list[RowRun]:
    """Swap key-head groups ``i`` and ``j`` of a per-group (qwen3-next) run table."""
    groups = [list(runs[g : g + group_len]) for g in range(0, len(runs), group_len)]
    groups[i], groups[j] = groups[j], groups[i]
    return [run for group in groups for run in group]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fault_swapped_key_head_groups(case: Case) -> None:
    layer = make_layer(case, seed=9)
    src = layer.sources
    qkvz = fuse(src, _swap_groups(qkvz_runs(case.dims, Layout.QWEN3_NEXT), 4, 0, 1))
    ba = fuse(src, _swap_groups(ba_runs(case.dims, Layout.QWEN3_NEXT), 2, 0, 1))
    want = run_split(layer, case.dims)
    for tp in valid_tp(case.dims.nk):
        got = fused_forward(layer.x, qkvz, ba, layer.w, case.dims, Layout.QWEN3_NEXT, tp)
        assert max_diff(got, want) > FAULT, f"tp={tp}"


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fault_swapped_b_and_a(case: Case, layout: Layout) -> None:
    layer = make_layer(case, seed=10)
    swapped = {"b": "a", "a": "b"}
    runs = [replace(r, source=swapped[r.source]) for r in ba_runs(case.dims, layout)]
    qkvz = fuse(layer.sources, qkvz_runs(case.dims, layout))
    got = fused_forward(layer.x, qkvz, fuse(layer.sources, runs), layer.w, case.dims, layout, 1)
    assert max_diff(got, run_split(layer, case.dims)) > FAULT


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fault_plain_concat_fed_to_qwen3_next(case: Case) -> None:
    layer = make_layer(case, seed=11)
    want = hf_qwen3_5(layer, case)
    qkvz, ba = torch.cat([layer.qkv, layer.z]), torch.cat([layer.b, layer.a])
    assert max_diff(hf_qwen3_next(layer, case, qkvz, ba), want) > FAULT
    got = fused_forward(layer.x, qkvz, ba, layer.w, case.dims, Layout.QWEN3_NEXT, 1)
    assert max_diff(got, want) > FAULT


# 5. resplit inverts fusing, bit for bit.


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize(("case", "tp"), CASE_TP, ids=_ids(CASE_TP))
def test_resplit_round_trip(case: Case, tp: int, layout: Layout) -> None:
    layer = make_layer(case, seed=12)
    for dtype in (torch.float64, torch.bfloat16):
        src = {name: t.to(dtype) for name, t in layer.sources.items()}
        qkvz = fuse(src, fused_runs(QKVZ, case.dims, layout, tp))
        ba = fuse(src, fused_runs(BA, case.dims, layout, tp))
        back = resplit(qkvz, ba, case.dims, layout, tp)
        for name, got in zip(("qkv", "z", "b", "a"), back, strict=True):
            assert got.dtype == dtype and torch.equal(got, src[name]), name


@settings(max_examples=60, deadline=None)
@given(
    nk=st.integers(1, 6),
    r=st.integers(1, 4),
    dk=st.integers(1, 5),
    dv=st.integers(1, 5),
    layout=st.sampled_from(list(Layout)),
    data=st.data(),
)
def test_resplit_round_trip_any_shape(
    nk: int, r: int, dk: int, dv: int, layout: Layout, data: st.DataObject
) -> None:
    """Row ids as values: every source row lands back at its own index."""
    dims = GdnDims(nk, nk * r, dk, dv)
    tp = data.draw(st.sampled_from(valid_tp(nk)))
    src = {
        name: torch.arange(dims.source_rows(name) * 2).reshape(-1, 2) + 1000 * i
        for i, name in enumerate(("qkv", "z", "b", "a"))
    }
    qkvz = fuse(src, fused_runs(QKVZ, dims, layout, tp))
    ba = fuse(src, fused_runs(BA, dims, layout, tp))
    back = resplit(qkvz, ba, dims, layout, tp)
    for name, got in zip(("qkv", "z", "b", "a"), back, strict=True):
        assert torch.equal(got, src[name]), name
