"""Property tests of :mod:`gdnfuse.layout`: the run tables are exact row permutations.

Rows are named ``(source, row)``. The expected order of each layout is written here a
second time, row by row from docs/layouts.md section 3 (``divmod`` on the fused row index, not
runs), so the tables are checked against an independent statement of the layout.
The checkers themselves are tested on planted faults at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import (
    BA,
    FUSED_SOURCES,
    QKVZ,
    GdnDims,
    Layout,
    RowRun,
    ba_runs,
    check_tp,
    coalesce,
    fused_runs,
    qkvz_runs,
    row_permutation,
    unfuse_runs,
    valid_tp,
)

Row = tuple[str, int]


@st.composite
def dims_and_tp(draw: st.DrawFn, max_nk: int = 8, max_d: int = 6) -> tuple[GdnDims, int]:
    nk = draw(st.integers(1, max_nk))
    r = draw(st.integers(1, 4))
    dims = GdnDims(nk, nk * r, draw(st.integers(1, max_d)), draw(st.integers(1, max_d)))
    return dims, draw(st.sampled_from(valid_tp(nk)))


layouts = st.sampled_from(list(Layout))
fused_names = st.sampled_from([QKVZ, BA])


def expand(runs: Sequence[RowRun]) -> list[Row]:
    return [(run.source, run.start + i) for run in runs for i in range(run.count)]


def source_rows(dims: GdnDims, fused: str) -> list[Row]:
    return [(s, i) for s in FUSED_SOURCES[fused] for i in range(dims.source_rows(s))]


def bijection_problems(runs: Sequence[RowRun], dims: GdnDims, fused: str) -> list[str]:
    """Why ``runs`` is not a permutation of the sources' rows (empty when it is)."""
    problems = [f"empty or negative run {run}" for run in runs if run.count <= 0]
    rows = expand(runs)
    want = source_rows(dims, fused)
    if len(rows) != len(want):
        problems.append(f"{len(rows)} rows, expected {len(want)}")
    if len(set(rows)) != len(rows):
        problems.append("a source row is used twice")
    if set(rows) != set(want):
        problems.append(f"rows outside or missing: {sorted(set(rows) ^ set(want))[:4]}")
    return problems


def expected_rows(dims: GdnDims, fused: str, layout: Layout, tp: int) -> list[Row]:
    """The fused tensor's rows, one by one, straight from docs/layouts.md section 3."""
    nk, nv, dk, dv, r = dims.nk, dims.nv, dims.dk, dims.dv, dims.r
    out: list[Row] = []
    if fused == QKVZ and layout is Layout.QWEN3_NEXT:
        group = 2 * dk + 2 * r * dv
        for i in range(nk * group):
            h, j = divmod(i, group)
            if j < dk:
                out.append(("qkv", h * dk + j))
            elif j < 2 * dk:
                out.append(("qkv", nk * dk + h * dk + j - dk))
            elif j < 2 * dk + r * dv:
                out.append(("qkv", 2 * nk * dk + h * r * dv + j - 2 * dk))
            else:
                out.append(("z", h * r * dv + j - 2 * dk - r * dv))
    elif fused == BA and layout is Layout.QWEN3_NEXT:
        for i in range(2 * nv):
            h, j = divmod(i, 2 * r)
            out.append(("b", h * r + j) if j < r else ("a", h * r + j - r))
    elif fused == QKVZ:
        nk_t, nv_t = nk // tp, nv // tp
        per_rank = 2 * nk_t * dk + 2 * nv_t * dv
        for i in range(tp * per_rank):
            t, j = divmod(i, per_rank)
            bounds = [nk_t * dk, 2 * nk_t * dk, 2 * nk_t * dk + nv_t * dv]
            if j < bounds[0]:
                out.append(("qkv", t * nk_t * dk + j))
            elif j < bounds[1]:
                out.append(("qkv", nk * dk + t * nk_t * dk + j - bounds[0]))
            elif j < bounds[2]:
                out.append(("qkv", 2 * nk * dk + t * nv_t * dv + j - bounds[1]))
            else:
                out.append(("z", t * nv_t * dv + j - bounds[2]))
    else:
        nv_t = nv // tp
        for i in range(2 * nv):
            t, j = divmod(i, 2 * nv_t)
            out.append(("b", t * nv_t + j) if j < nv_t else ("a", t * nv_t + j - nv_t))
    return out


# 1. Each table is a bijection onto the source rows, in the documented order.


@settings(max_examples=150, deadline=None)
@given(case=dims_and_tp(), layout=layouts, fused=fused_names)
def test_runs_are_a_bijection_onto_source_rows(
    case: tuple[GdnDims, int], layout: Layout, fused: str
) -> None:
    dims, tp = case
    runs = fused_runs(fused, dims, layout, tp)
    assert bijection_problems(runs, dims, fused) == []
    assert len(expand(runs)) == (dims.qkvz_rows if fused == QKVZ else dims.ba_rows)
    assert all(run.start + run.count <= dims.source_rows(run.source) for run in runs)


@settings(max_examples=150, deadline=None)
@given(case=dims_and_tp(), layout=layouts, fused=fused_names)
def test_runs_follow_the_documented_order(
    case: tuple[GdnDims, int], layout: Layout, fused: str
) -> None:
    dims, tp = case
    assert expand(fused_runs(fused, dims, layout, tp)) == expected_rows(dims, fused, layout, tp)


def test_fused_runs_dispatches_by_name() -> None:
    dims = GdnDims(4, 8, 3, 2)
    for layout in Layout:
        assert fused_runs(QKVZ, dims, layout, 2) == qkvz_runs(dims, layout, 2)
        assert fused_runs(BA, dims, layout, 2) == ba_runs(dims, layout, 2)


@settings(max_examples=100, deadline=None)
@given(case=dims_and_tp(), layout=layouts, fused=fused_names)
def test_row_permutation_indexes_the_stacked_sources(
    case: tuple[GdnDims, int], layout: Layout, fused: str
) -> None:
    dims, tp = case
    runs = fused_runs(fused, dims, layout, tp)
    stacked = source_rows(dims, fused)
    perm = row_permutation(runs, FUSED_SOURCES[fused])
    assert sorted(perm) == list(range(len(stacked)))
    assert [stacked[i] for i in perm] == expand(runs)


# 2. unfuse_runs is the inverse table.


@settings(max_examples=150, deadline=None)
@given(case=dims_and_tp(), layout=layouts, fused=fused_names)
def test_unfuse_runs_inverts_the_table(
    case: tuple[GdnDims, int], layout: Layout, fused: str
) -> None:
    dims, tp = case
    runs = fused_runs(fused, dims, layout, tp)
    fused_rows = expand(runs)
    where = unfuse_runs(runs)
    assert set(where) == set(FUSED_SOURCES[fused])
    for source, placed in where.items():
        rebuilt: dict[int, Row] = {}
        for row, run in placed:
            assert run.source == source
            for i in range(run.count):
                assert run.start + i not in rebuilt, "source row placed twice"
                rebuilt[run.start + i] = fused_rows[row + i]
        # Reading the fused rows back gives every source row at its own index.
        assert rebuilt == {i: (source, i) for i in range(dims.source_rows(source))}


# 3. coalesce merges runs without changing the permutation.


@settings(max_examples=150, deadline=None)
@given(case=dims_and_tp(), layout=layouts, fused=fused_names)
def test_coalesce_preserves_the_permutation(
    case: tuple[GdnDims, int], layout: Layout, fused: str
) -> None:
    dims, tp = case
    runs = fused_runs(fused, dims, layout, tp)
    merged = coalesce(runs)
    assert expand(merged) == expand(runs)
    assert len(merged) <= len(runs)
    for prev, nxt in zip(merged, merged[1:], strict=False):
        assert not (prev.source == nxt.source and prev.start + prev.count == nxt.start)
    assert coalesce(merged) == merged


def test_coalesce_merges_tp1_tp_blocked_into_whole_tensors() -> None:
    """[Q;K;V;Z] at T=1 is two copies: all of qkv, then all of z."""
    dims = GdnDims(4, 12, 8, 4)
    assert coalesce(qkvz_runs(dims, Layout.TP_BLOCKED, 1)) == (
        RowRun("qkv", 0, dims.qkv_rows),
        RowRun("z", 0, dims.z_rows),
    )
    assert coalesce(ba_runs(dims, Layout.TP_BLOCKED, 1)) == (RowRun("b", 0, 12), RowRun("a", 0, 12))


@given(
    runs=st.lists(
        st.builds(RowRun, st.sampled_from(["qkv", "z"]), st.integers(0, 20), st.integers(1, 5)),
        max_size=12,
    )
)
def test_coalesce_on_arbitrary_runs(runs: list[RowRun]) -> None:
    assert expand(coalesce(runs)) == expand(runs)


# 4. in_blocks: the FP8 block-scale table is the row table at block granularity.


@settings(max_examples=100, deadline=None)
@given(
    nk=st.integers(1, 4),
    r=st.integers(1, 4),
    dk_blocks=st.integers(1, 3),
    dv_blocks=st.integers(1, 3),
    block=st.sampled_from([1, 2, 4, 128]),
    layout=layouts,
    data=st.data(),
)
def test_in_blocks_matches_rows_grouped_by_block(
    nk: int, r: int, dk_blocks: int, dv_blocks: int, block: int, layout: Layout, data: st.DataObject
) -> None:
    dims = GdnDims(nk, nk * r, dk_blocks * block, dv_blocks * block)
    tp = data.draw(st.sampled_from(valid_tp(nk)))
    blocks = dims.in_blocks(block)
    assert blocks == GdnDims(nk, nk * r, dk_blocks, dv_blocks)
    block_rows = expand(qkvz_runs(blocks, layout, tp))
    rows = expand(qkvz_runs(dims, layout, tp))
    # Block b of the scale tensor covers rows b*block .. b*block+block-1, in the same order.
    assert rows == [(s, b * block + i) for s, b in block_rows for i in range(block)]
    assert [(s, i // block) for s, i in rows[::block]] == block_rows


@pytest.mark.parametrize(("dk", "dv"), [(64, 128), (128, 64), (192, 128), (128, 100)])
def test_in_blocks_refuses_heads_that_straddle_blocks(dk: int, dv: int) -> None:
    with pytest.raises(GdnfuseError, match="quantization"):
        GdnDims(16, 32, dk, dv).in_blocks(128)


# 5. The two layouts: equal exactly when each rank holds one key-head group.


@settings(max_examples=150, deadline=None)
@given(case=dims_and_tp(), fused=fused_names)
def test_layouts_coincide_iff_one_key_head_per_rank(case: tuple[GdnDims, int], fused: str) -> None:
    dims, tp = case
    next_rows = expand(fused_runs(fused, dims, Layout.QWEN3_NEXT, tp))
    blocked_rows = expand(fused_runs(fused, dims, Layout.TP_BLOCKED, tp))
    if dims.nk // tp == 1:
        assert next_rows == blocked_rows
    else:
        assert next_rows != blocked_rows
        # Each rank's slice still holds the same rows, only in another order.
        per_rank = len(next_rows) // tp
        for t in range(tp):
            chunk = slice(t * per_rank, (t + 1) * per_rank)
            assert sorted(next_rows[chunk]) == sorted(blocked_rows[chunk])


@settings(max_examples=60, deadline=None)
@given(case=dims_and_tp())
def test_qwen3_next_is_tp_invariant(case: tuple[GdnDims, int]) -> None:
    dims, tp = case
    for fused in (QKVZ, BA):
        assert fused_runs(fused, dims, Layout.QWEN3_NEXT, tp) == fused_runs(
            fused, dims, Layout.QWEN3_NEXT, 1
        )


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_layouts_differ_on_realistic_shapes(r: int) -> None:
    """Qwen3.5 shapes (nk=16, dk=dv=128) at tp 1..8: the layouts are never interchangeable."""
    dims = GdnDims(16, 16 * r, 128, 128)
    for tp in (1, 2, 4, 8):
        assert expand(qkvz_runs(dims, Layout.QWEN3_NEXT, tp)) != expand(
            qkvz_runs(dims, Layout.TP_BLOCKED, tp)
        )
    assert expand(qkvz_runs(dims, Layout.QWEN3_NEXT, 16)) == expand(
        qkvz_runs(dims, Layout.TP_BLOCKED, 16)
    )


# 6. tp validation.


@given(nk=st.integers(1, 64))
def test_valid_tp_are_the_divisors(nk: int) -> None:
    assert valid_tp(nk) == [t for t in range(1, nk + 1) if nk % t == 0]
    for t in valid_tp(nk):
        check_tp(GdnDims(nk, nk, 1, 1), t)


@given(nk=st.integers(1, 48), tp=st.integers(-3, 100))
def test_check_tp_error_lists_valid_values(nk: int, tp: int) -> None:
    assume(tp < 1 or nk % tp)
    dims = GdnDims(nk, 2 * nk, 4, 4)
    expected = ", ".join(map(str, valid_tp(nk)))
    for call in (lambda: check_tp(dims, tp), lambda: qkvz_runs(dims, Layout.TP_BLOCKED, tp),
                 lambda: ba_runs(dims, Layout.QWEN3_NEXT, tp)):  # fmt: skip
        with pytest.raises(GdnfuseError) as err:
            call()
        message = str(err.value)
        assert f"tp={tp} " in message and f"linear_num_key_heads={nk}" in message
        assert message.endswith(f"valid values: {expected}")
        assert err.value.for_cli().startswith(f"--tp {tp} ")


def test_dims_validation() -> None:
    with pytest.raises(GdnfuseError, match="not a multiple"):
        GdnDims(4, 6, 8, 8)
    for bad in ((0, 4, 8, 8), (4, 4, 0, 8), (4, 4, 8, -1)):
        with pytest.raises(GdnfuseError, match="must be positive"):
            GdnDims(*bad)
    assert GdnDims(4, 12, 8, 4).r == 3


# 7. The checkers above catch planted faults.


def test_bijection_checker_catches_planted_faults() -> None:
    dims = GdnDims(4, 8, 3, 2)
    runs = list(qkvz_runs(dims, Layout.QWEN3_NEXT))
    assert bijection_problems(runs, dims, QKVZ) == []
    dropped = runs[:-1]
    doubled = [*runs[:-1], runs[0]]
    shifted = [replace(runs[0], start=runs[0].start + 1), *runs[1:]]
    out_of_range = [*runs[:-1], replace(runs[-1], start=runs[-1].start + 1)]
    for bad in (dropped, doubled, shifted, out_of_range):
        assert bijection_problems(bad, dims, QKVZ), bad[:2]


def test_order_oracle_catches_swapped_groups_and_swapped_b_a() -> None:
    dims = GdnDims(4, 8, 3, 2)
    runs = list(qkvz_runs(dims, Layout.QWEN3_NEXT))
    swapped = runs[4:8] + runs[:4] + runs[8:]
    assert bijection_problems(swapped, dims, QKVZ) == []  # still a permutation ...
    assert expand(swapped) != expected_rows(dims, QKVZ, Layout.QWEN3_NEXT, 1)  # ... but wrong
    ba = [
        replace(run, source={"b": "a", "a": "b"}[run.source])
        for run in ba_runs(dims, Layout.TP_BLOCKED, 2)
    ]
    assert expand(ba) != expected_rows(dims, BA, Layout.TP_BLOCKED, 2)
