"""The un-interleave kernel, the GPU forward path and TP verification, against float64.

On CPU (CI) the Triton kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) at small
sizes; with CUDA the same tests also run at the released models' sizes. The GPU forward's torch
fallbacks and the multi-process TP check (gloo on CPU) need no Triton.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gdnfuse.convert import convert  # noqa: E402
from gdnfuse.errors import GdnfuseError  # noqa: E402
from gdnfuse.layout import GdnDims, Layout  # noqa: E402
from gdnfuse.reference import gpu, naive  # noqa: E402
from gdnfuse.reference.distributed import verify_gpu, verify_tp  # noqa: E402
from gdnfuse.reference.triton_uninterleave import (  # noqa: E402
    triton_available,
    uninterleave_torch,
    uninterleave_triton,
)
from gdnfuse.synthetic import write_checkpoint  # noqa: E402

FIRST_GDN = "model.language_model.layers.0.linear_attn."  # --layers 0 of the tiny preset

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")

# Local (per-rank) dims where the two layouts differ (nk > 1): r = 1, 2, 3, 4, dk != dv, and
# head dims that are not powers of two (masked lanes).
SMALL_DIMS = [
    GdnDims(2, 2, 16, 16),
    GdnDims(4, 8, 16, 8),
    GdnDims(2, 6, 24, 12),
    GdnDims(3, 12, 8, 8),
]
# Released models' per-rank dims (27B and 397B at TP 1, 27B at TP 4): GPU only.
REAL_DIMS = [GdnDims(16, 48, 128, 128), GdnDims(16, 64, 128, 128), GdnDims(4, 12, 128, 128)]
DIMS = SMALL_DIMS + (REAL_DIMS if CUDA else [])
TOKENS = [(1,), (7,), (2, 33)] + ([(4096,), (3, 1000)] if CUDA else [])
FIELDS = ("mixed_qkv", "z", "b", "a")


def _outputs(dims: GdnDims, lead: tuple[int, ...], dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    qkvz = torch.randn(*lead, dims.qkvz_rows, generator=gen, dtype=torch.float64)
    ba = torch.randn(*lead, dims.ba_rows, generator=gen, dtype=torch.float64)
    return qkvz.to(DEVICE, dtype), ba.to(DEVICE, dtype)


def _consumer(qkvz: torch.Tensor, ba: torch.Tensor, dims: GdnDims, layout: Layout):
    """naive.py's independent consumer split (fix_query_key_value_ordering / size split)."""
    lead = qkvz.shape[:-1]
    flat = (qkvz.reshape(1, -1, qkvz.shape[-1]), ba.reshape(1, -1, ba.shape[-1]))
    q, k, v, z, b, a = naive._consumer_split(*flat, dims, layout)
    mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
    return [t.reshape(*lead, -1) for t in (mixed, z.flatten(2), b, a)]


@needs_triton
@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("dims", DIMS, ids=str)
@pytest.mark.parametrize("lead", TOKENS, ids=str)
def test_kernel_matches_consumer_split(dims: GdnDims, layout: Layout, lead: tuple[int, ...]):
    qkvz, ba = _outputs(dims, lead, torch.bfloat16, seed=sum(lead) + dims.nv)
    got = uninterleave_triton(qkvz, ba, dims, layout)
    want = _consumer(qkvz, ba, dims, layout)
    for name, expected in zip(FIELDS, want, strict=True):
        actual = getattr(got, name)
        assert actual.is_contiguous()
        assert torch.equal(actual, expected), (name, dims, layout, lead)  # a copy: bit-exact
    torch_path = uninterleave_torch(qkvz, ba, dims, layout)
    for name in FIELDS:
        assert torch.equal(getattr(torch_path, name), getattr(got, name))


@needs_triton
def test_kernel_reads_strided_rows_and_other_dtypes():
    dims = GdnDims(2, 4, 16, 8)
    for dtype in (torch.float32, torch.float16, torch.float64):
        big, ba = _outputs(dims, (5,), dtype, seed=3)
        padded = torch.cat([big, big[:, :7]], dim=-1)[:, : dims.qkvz_rows]  # row stride != width
        assert padded.stride(0) != dims.qkvz_rows
        got = uninterleave_triton(padded, ba, dims, Layout.QWEN3_NEXT)
        want = _consumer(big, ba, dims, Layout.QWEN3_NEXT)
        assert all(torch.equal(getattr(got, f), w) for f, w in zip(FIELDS, want, strict=True))


@needs_triton
def test_kernel_layout_matters_and_bad_shapes_refused():
    """The planted fault: reading qwen3-next output as tp-blocked scrambles the heads."""
    dims = GdnDims(4, 8, 16, 16)
    qkvz, ba = _outputs(dims, (3,), torch.bfloat16, seed=5)
    right = uninterleave_triton(qkvz, ba, dims, Layout.QWEN3_NEXT)
    wrong = uninterleave_triton(qkvz, ba, dims, Layout.TP_BLOCKED)
    assert not torch.equal(right.mixed_qkv, wrong.mixed_qkv)
    assert not torch.equal(right.b, wrong.b)
    with pytest.raises(GdnfuseError, match="columns"):
        uninterleave_triton(qkvz[..., :-1], ba, dims, Layout.QWEN3_NEXT)
    with pytest.raises(GdnfuseError, match="tokens"):
        uninterleave_triton(qkvz, ba[:2], dims, Layout.QWEN3_NEXT)


def _layer(dims: GdnDims, hidden: int, layout: Layout, tp: int, seed: int) -> gpu.LayerTensors:
    """Random split weights, their fused form (via resplit's inverse: the layout tables)."""
    from gdnfuse.layout import QKVZ, fused_runs, row_permutation

    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    qkv, z = rnd(dims.qkv_rows, hidden), rnd(dims.z_rows, hidden)
    b, a = rnd(dims.nv, hidden), rnd(dims.nv, hidden)
    qkvz = torch.cat([qkv, z])[row_permutation(fused_runs(QKVZ, dims, layout, tp), ["qkv", "z"])]
    ba = torch.cat([b, a])[row_permutation(fused_runs("ba", dims, layout, tp), ["b", "a"])]
    w = naive.GdnWeights(
        conv1d=rnd(dims.qkv_rows, 1, 4, std=0.3), A_log=rnd(dims.nv, std=0.5),
        dt_bias=rnd(dims.nv, std=0.5), norm=1 + rnd(dims.dv), out_proj=rnd(hidden, dims.z_rows),
    )  # fmt: skip
    return gpu.LayerTensors(qkv, z, b, a, qkvz, ba, w)


@pytest.mark.parametrize(("layout", "tp"), [(Layout.QWEN3_NEXT, 1), (Layout.QWEN3_NEXT, 2),
                                            (Layout.TP_BLOCKED, 2)])  # fmt: skip
def test_float64_pipeline_with_kernel_equals_reference(layout: Layout, tp: int):
    """gpu.py's path (kernel in the interpreter on CPU, torch ops) in float64 == naive.py."""
    dims, hidden = GdnDims(4, 8, 16, 8), 32
    t = _layer(dims, hidden, layout, tp, seed=tp)
    x = gpu.make_input(hidden, 9, seed=1).to(DEVICE)
    ops = gpu.GpuOps("triton" if triton_available() else "torch", "torch", "torch", "torch")
    dev = torch.device(DEVICE)
    fused = gpu.fused_forward(
        x, t.qkvz.to(dev), t.ba.to(dev), gpu._to(t.weights, dev, torch.float64), dims, layout,
        tp, ops,
    )  # fmt: skip
    ref = gpu.reference_forward(x.cpu(), t, dims)
    naive_fused = naive.fused_forward(x.cpu(), t.qkvz, t.ba, t.weights, dims, layout, tp)
    assert torch.allclose(fused.cpu(), ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(naive_fused, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("layout", "tp"), [(Layout.QWEN3_NEXT, 1), (Layout.TP_BLOCKED, 2)])
def test_gpu_verify_layer_passes_and_catches_wrong_layout(layout: Layout, tp: int):
    dims, hidden = (GdnDims(16, 48, 128, 128), 1024) if CUDA else (GdnDims(4, 8, 16, 8), 64)
    t = _layer(dims, hidden, layout, tp, seed=7)
    ok = gpu.gpu_verify_layer("layer", t, dims, layout, tp=tp, device=DEVICE, tokens=24)
    assert ok.passed, ok.lines()
    by = {c.name: c for c in ok.comparisons}
    assert by["fused vs split"].rel_rmse < 1e-2
    assert 1e-5 < by["split vs float64"].rel_rmse < 3e-2  # bf16 really was used
    wrong = Layout.TP_BLOCKED if layout is Layout.QWEN3_NEXT else Layout.QWEN3_NEXT
    bad = gpu.gpu_verify_layer("layer", t, dims, wrong, tp=tp, device=DEVICE, tokens=24)
    assert not bad.passed
    assert {c.name: c for c in bad.comparisons}["fused vs split"].rel_rmse > 0.1


def test_compare_fails_nan_and_refuses_shape_mismatch():
    ref = torch.ones(2, 3)
    assert gpu.compare("x", ref, ref, 1e-3, 1.0).passed
    assert not gpu.compare("x", torch.full((2, 3), float("nan")), ref, 1e-3, 1.0).passed
    assert not gpu.compare("x", ref * 1.01, ref, 1e-3, 1.0).passed
    with pytest.raises(GdnfuseError, match="shapes"):
        gpu.compare("x", ref, torch.ones(3, 2), 1e-3, 1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    src = write_checkpoint(root / "src", "tiny", layers=2)  # two GDN layers
    outs = {}
    for layout, tp in ((Layout.QWEN3_NEXT, 1), (Layout.TP_BLOCKED, 2)):
        outs[layout] = root / f"fused-{layout}"
        convert(src, outs[layout], layout=layout, tp=tp)
    return src, outs


def test_verify_gpu_on_converted_checkpoint(tiny):
    src, outs = tiny
    for layout, tp in ((Layout.QWEN3_NEXT, 2), (Layout.TP_BLOCKED, 2)):
        results = verify_gpu(outs[layout], src, device=DEVICE, tp=tp, tokens=8)
        assert len(results) == 2 and all(r.passed for r in results), [r.lines() for r in results]
    with pytest.raises(GdnfuseError, match="tp-blocked for 2 ranks"):
        verify_gpu(outs[Layout.TP_BLOCKED], src, device=DEVICE, tp=4)
    with pytest.raises(GdnfuseError, match="layout record"):
        verify_gpu(src, src, device=DEVICE)


def test_verify_tp_two_processes(tiny, tmp_path):
    """Two ranks (gloo on CPU, NCCL with 2 GPUs), partial reads, all-reduce; then a planted
    fault: the record claims the other layout, so each rank splits its slice wrongly."""
    src, outs = tiny
    device = "cuda" if CUDA and torch.cuda.device_count() >= 2 else "cpu"
    report = verify_tp(outs[Layout.QWEN3_NEXT], src, 2, device, tokens=8, layers=[FIRST_GDN])
    assert report["passed"], report
    (reads,) = report["reads"]
    assert len(reads["rank_bytes"]) == 2
    assert all(0 < r < 0.6 * reads["layer_bytes"] for r in reads["rank_bytes"])

    lied = tmp_path / "lied"
    lied.mkdir()
    for f in outs[Layout.QWEN3_NEXT].iterdir():
        (lied / f.name).symlink_to(f)
    config = json.loads((outs[Layout.QWEN3_NEXT] / "config.json").read_text())
    config["gdnfuse"] = {**config["gdnfuse"], "layout": "tp-blocked", "tp": 2}
    (lied / "config.json").unlink()
    (lied / "config.json").write_text(json.dumps(config))
    bad = verify_tp(lied, src, 2, device, tokens=8, layers=[FIRST_GDN])
    assert not bad["passed"]
