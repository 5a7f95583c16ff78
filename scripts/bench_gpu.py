#!/usr/bin/env python3
"""GPU benchmark and GPU/TP checks for issue 4 (a script, not a timed test).

    python scripts/bench_gpu.py bench  --out DIR   # in-projection, un-interleave, layer; one GPU
    python scripts/bench_gpu.py verify --out DIR [--tp N]   # synthetic checkpoint, fused vs split

``bench`` first measures the two ceilings on the card (device-to-device copy bandwidth counting
bytes read + written, bf16 GEMM rate on 8192^3), then for the Qwen3.5-27B and -397B-A17B GDN
shapes and 1..16384 tokens times (medians of ``triton.testing.do_bench``; CUDA-graph replays for
the in-projection too): the split in-projection (4 GEMMs, as Qwen3.5's forward), the fused one
(2 GEMMs + the Triton un-interleave; + a PyTorch view/split/cat un-interleave; tp-blocked's
zero-copy split), the kernel alone as a fraction of copy bandwidth, and the whole GDN layer
(fla ops) split vs fused. Each figure gets its two floors: bytes / bandwidth, FLOPs / rate.
Results go to DIR/bench.json and a markdown table to DIR/bench.md (and stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdnfuse.layout import BA, QKVZ, GdnDims, Layout, fused_runs, row_permutation  # noqa: E402
from gdnfuse.reference import gpu  # noqa: E402
from gdnfuse.reference.naive import GdnWeights  # noqa: E402
from gdnfuse.reference.triton_uninterleave import (  # noqa: E402
    moved_bytes,
    uninterleave_torch,
    uninterleave_triton,
)

SHAPES = {"qwen3.5-27b": (5120, 16, 48), "qwen3.5-397b-a17b": (4096, 16, 64)}  # H, nk, nv
TOKENS = (1, 8, 64, 512, 4096, 16384)


def _bench(fn, graph: bool = False) -> float:
    import triton.testing as tt

    if graph:
        return tt.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return tt.do_bench(fn, warmup=25, rep=100, return_mode="median")


def ceilings() -> dict:
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = _bench(lambda: dst.copy_(src))
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = _bench(lambda: a @ b)
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "sms": props.multi_processor_count,
        "copy_bytes_per_s": 2 * n * 2 / (copy_ms * 1e-3),
        "bf16_flops_per_s": 2 * m**3 / (mm_ms * 1e-3),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "fla": _fla_version(),
        "python": platform.python_version(),
    }


def _fla_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:
        return None


def _weights(dims: GdnDims, hidden: int, gen: torch.Generator) -> dict:
    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * std
        return t.to(torch.bfloat16)

    w = {
        "qkv": rnd(dims.qkv_rows, hidden),
        "z": rnd(dims.z_rows, hidden),
        "b": rnd(dims.nv, hidden),
        "a": rnd(dims.nv, hidden),
    }
    for layout in Layout:
        perm = row_permutation(fused_runs(QKVZ, dims, layout), ["qkv", "z"])
        w[f"qkvz-{layout}"] = torch.cat([w["qkv"], w["z"]])[perm].contiguous()
        perm = row_permutation(fused_runs(BA, dims, layout), ["b", "a"])
        w[f"ba-{layout}"] = torch.cat([w["b"], w["a"]])[perm].contiguous()
    w["layer"] = GdnWeights(
        conv1d=rnd(dims.qkv_rows, 1, 4, std=0.3),
        A_log=torch.rand(dims.nv, generator=gen, device="cuda") * 2 - 1,
        dt_bias=torch.rand(dims.nv, generator=gen, device="cuda"),
        norm=1 + rnd(dims.dv),
        out_proj=rnd(hidden, dims.z_rows),
    )
    return w


def _floors(nbytes: float, flops: float, c: dict) -> dict:
    return {
        "bytes": nbytes,
        "flops": flops,
        "bw_floor_ms": nbytes / c["copy_bytes_per_s"] * 1e3,
        "flop_floor_ms": flops / c["bf16_flops_per_s"] * 1e3,
    }


def bench_shape(name: str, hidden: int, nk: int, nv: int, c: dict, layer: bool) -> list[dict]:
    dims = GdnDims(nk, nv, 128, 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = _weights(dims, hidden, gen)
    ops = gpu.pick_ops("cuda")
    out = []
    for t in TOKENS:
        x = torch.randn(1, t, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
        r = _bench_tokens(name, x, w, dims, ops, c, layer)
        out.append(r)
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}), flush=True)
    return out


def _bench_tokens(
    name: str, x: torch.Tensor, w: dict, dims: GdnDims, ops: gpu.GpuOps, c: dict, layer: bool
) -> dict:
    t, hidden, nv = x.shape[1], x.shape[2], dims.nv
    qn, tb = Layout.QWEN3_NEXT, Layout.TP_BLOCKED
    rows = dims.qkvz_rows + dims.ba_rows
    split = lambda: gpu.split_in_proj(x, w["qkv"], w["z"], w["b"], w["a"])  # noqa: E731
    gemm2 = lambda: (F.linear(x, w[f"qkvz-{qn}"]), F.linear(x, w[f"ba-{qn}"]))  # noqa: E731
    fused_tr = lambda: gpu.fused_in_proj(  # noqa: E731
        x, w[f"qkvz-{qn}"], w[f"ba-{qn}"], dims, qn, ops
    )
    fused_pt = lambda: uninterleave_torch(*gemm2(), dims, qn)  # noqa: E731
    fused_tb = lambda: uninterleave_torch(  # noqa: E731
        F.linear(x, w[f"qkvz-{tb}"]), F.linear(x, w[f"ba-{tb}"]), dims, tb
    )
    # correct at every size before timing: fused + kernel gives split's outputs (up to the
    # GEMM shapes' rounding, docs/layouts.md section 8)
    for g, want in zip(fused_tr(), split(), strict=True):
        err = (g.float() - want.float()).norm() / want.float().norm()
        assert g.shape == want.shape and err < 1e-2, (name, t, err.item())
    r = {"shape": name, "tokens": t}
    for key, fn in (("split_4gemm", split), ("fused_2gemm", gemm2),
                    ("fused_2gemm_triton", fused_tr), ("fused_2gemm_torch", fused_pt),
                    ("tp_blocked_2gemm_views", fused_tb)):  # fmt: skip
        r[key] = _bench(fn)
        r[key + "_graph"] = _bench(fn, graph=True)
    wbytes = rows * hidden * 2
    r["inproj_floor"] = _floors(
        wbytes + 2 * t * (hidden + rows), 2 * t * hidden * rows, c
    )  # weights + x + outputs
    qkvz_out, ba_out = gemm2()
    kb = moved_bytes(t, dims, 2)
    r["kernel"] = _bench(lambda: uninterleave_triton(qkvz_out, ba_out, dims, qn))
    r["kernel_graph"] = _bench(
        lambda: uninterleave_triton(qkvz_out, ba_out, dims, qn),
        graph=True,
    )
    flat = torch.cat([qkvz_out.flatten(), ba_out.flatten()])
    dst = torch.empty_like(flat)
    r["same_bytes_copy"] = _bench(lambda: dst.copy_(flat))
    r["kernel_bytes"] = kb
    r["kernel_bytes_per_s"] = kb / (r["kernel"] * 1e-3)
    r["kernel_frac_of_copy_bw"] = r["kernel_bytes_per_s"] / c["copy_bytes_per_s"]
    r["kernel_floor"] = _floors(kb, 0, c)
    if layer:
        lw = w["layer"]
        with torch.no_grad():
            sf = lambda: gpu.split_forward(  # noqa: E731
                x,
                w["qkv"],
                w["z"],
                w["b"],
                w["a"],
                lw,
                dims,
                ops,
            )
            ff = lambda: gpu.fused_forward(  # noqa: E731
                x,
                w[f"qkvz-{qn}"],
                w[f"ba-{qn}"],
                lw,
                dims,
                qn,
                1,
                ops,
            )
            cmp = gpu.compare("layer", ff(), sf(), 1e-2, sf().abs().max().item())
            r["layer_fused_vs_split_rel_rmse"] = cmp.rel_rmse
            r["layer_split"] = _bench(sf)
            r["layer_fused"] = _bench(ff)
            try:  # launch gaps dominate small token counts in eager mode
                r["layer_split_graph"] = _bench(sf, graph=True)
                r["layer_fused_graph"] = _bench(ff, graph=True)
            except Exception as e:  # report, keep the eager figures
                print(f"layer graph capture failed: {e!r}", flush=True)
                r["layer_split_graph"] = r["layer_fused_graph"] = float("nan")
        lbytes = (rows + hidden) * hidden * 2 + dims.qkv_rows * 4 * 2 + 2 * t * hidden * 2
        # GEMMs + chunked delta rule (~6 dk*dv FLOPs per token and value head)
        lflops = 2 * t * hidden * (rows + dims.z_rows) + 6 * t * nv * 128 * 128
        r["layer_floor"] = _floors(lbytes, lflops, c)
    return r


def sweep(c: dict) -> list[dict]:
    """Tile/warp choices for the kernel at the largest size (27B, 16384 tokens)."""
    dims = GdnDims(16, 48, 128, 128)
    t = 16384
    qkvz = torch.randn(t, dims.qkvz_rows, device="cuda", dtype=torch.bfloat16)
    ba = torch.randn(t, dims.ba_rows, device="cuda", dtype=torch.bfloat16)
    res = []
    for bt in (4, 8, 16, 32, 64):
        for nw in (2, 4, 8):
            ms = _bench(
                lambda bt=bt, nw=nw: uninterleave_triton(
                    qkvz, ba, dims, Layout.QWEN3_NEXT, block_t=bt, num_warps=nw
                )
            )
            frac = moved_bytes(t, dims, 2) / (ms * 1e-3) / c["copy_bytes_per_s"]
            res.append({"block_t": bt, "num_warps": nw, "ms": ms, "frac_of_copy_bw": frac})
            print(json.dumps(res[-1]), flush=True)
    return res


def _f(ms: float) -> str:
    return f"{ms:.3f}"


def markdown(c: dict, rows: list[dict], sw: list[dict]) -> str:
    nan = float("nan")
    bw, fl = c["copy_bytes_per_s"] / 1e12, c["bf16_flops_per_s"] / 1e12
    lines = [
        f"Card: {c['device']} ({c['sms']} SMs); torch {c['torch']}, triton {c['triton']}, "
        f"fla-core {c['fla']}.",
        f"Measured ceilings: device-to-device copy {bw:.2f} TB/s (read + write), "
        f"bf16 GEMM {fl:.0f} TFLOP/s (8192^3).",
        "",
        "### In-projection (ms, medians; eager events / CUDA-graph replay)",
        "",
        "| shape | tokens | split: 4 GEMMs | fused: 2 GEMMs | fused + Triton un-interleave "
        "| fused + PyTorch un-interleave | tp-blocked: 2 GEMMs + views | fused+Triton / split "
        "| floor: bytes/bw | floor: FLOPs/rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = r["inproj_floor"]
        cells = [
            f"{_f(r[k])} / {_f(r[k + '_graph'])}"
            for k in (
                "split_4gemm",
                "fused_2gemm",
                "fused_2gemm_triton",
                "fused_2gemm_torch",
                "tp_blocked_2gemm_views",
            )
        ]
        ratio = f"{r['fused_2gemm_triton'] / r['split_4gemm']:.2f} / "
        ratio += f"{r['fused_2gemm_triton_graph'] / r['split_4gemm_graph']:.2f}"
        lines.append(
            f"| {r['shape']} | {r['tokens']} | " + " | ".join(cells) + f" | {ratio} | "
            f"{_f(f['bw_floor_ms'])} | {_f(f['flop_floor_ms'])} |"
        )
    lines += [
        "",
        "### Un-interleave kernel alone (qwen3-next layout, bf16)",
        "",
        "| shape | tokens | bytes moved (read + write) | kernel ms (events / graph) "
        "| achieved TB/s (events) | fraction of copy bw (events / graph) "
        "| same-bytes copy_ ms | floor: bytes/bw ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['kernel_bytes'] / 1e6:.3f} MB | "
            f"{_f(r['kernel'])} / {_f(r['kernel_graph'])} | {r['kernel_bytes_per_s'] / 1e12:.2f} | "
            f"{r['kernel_frac_of_copy_bw']:.0%} / "
            f"{r['kernel_bytes'] / (r['kernel_graph'] * 1e-3) / c['copy_bytes_per_s']:.0%} | "
            f"{_f(r['same_bytes_copy'])} | "
            f"{_f(r['kernel_floor']['bw_floor_ms'])} |"
        )
    if any("layer_split" in r for r in rows):
        lines += [
            "",
            "### Whole GDN layer forward (fla ops; ms, medians; eager events / CUDA-graph replay)",
            "",
            "| shape | tokens | split | fused (2 GEMMs + Triton) | fused / split "
            "| fused vs split rel RMSE | floor: bytes/bw | floor: FLOPs/rate |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            f = r["layer_floor"]
            lines.append(
                f"| {r['shape']} | {r['tokens']} | "
                f"{_f(r['layer_split'])} / {_f(r.get('layer_split_graph', nan))} | "
                f"{_f(r['layer_fused'])} / {_f(r.get('layer_fused_graph', nan))} | "
                f"{r['layer_fused'] / r['layer_split']:.2f} / "
                f"{r.get('layer_fused_graph', nan) / r.get('layer_split_graph', nan):.2f} | "
                f"{r['layer_fused_vs_split_rel_rmse']:.1e} | {_f(f['bw_floor_ms'])} | "
                f"{_f(f['flop_floor_ms'])} |"
            )
    if sw:
        lines += ["", "### Kernel tile sweep (27B, 16384 tokens)", ""]
        lines += ["| BLOCK_T | num_warps | ms | fraction of copy bw |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {s['block_t']} | {s['num_warps']} | {_f(s['ms'])} | {s['frac_of_copy_bw']:.0%} |"
            for s in sw
        ]
    return "\n".join(lines) + "\n"


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = ceilings()
    print(json.dumps(c), flush=True)
    sw = sweep(c) if args.sweep else []
    rows = []
    for name, (hidden, nk, nv) in SHAPES.items():
        rows += bench_shape(name, hidden, nk, nv, c, layer=not args.no_layer)
        (out / "bench.json").write_text(json.dumps({"ceilings": c, "rows": rows, "sweep": sw}))
    md = markdown(c, rows, sw)
    (out / "bench.md").write_text(md)
    print(md)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Synthetic checkpoint with real GDN head dims (small H, few layers), converted both ways,
    checked fused vs split; with --tp N > 1 across N processes; plus a planted wrong record."""
    from gdnfuse.convert import convert
    from gdnfuse.reference.distributed import format_report, verify_gpu, verify_tp
    from gdnfuse.synthetic import ModelShape, write_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    shape = ModelShape(hidden=args.hidden, layers=args.layers, nk=16, nv=48, intermediate=64,
                       heads=2, kv_heads=1, head_dim=64, vocab=256)  # fmt: skip
    t0 = time.time()
    src = write_checkpoint(work / "src", shape)
    print(f"synthetic checkpoint {shape} in {time.time() - t0:.1f}s", flush=True)
    report: dict = {"tp": args.tp, "shape": vars(shape), "tokens": args.tokens, "runs": []}
    ok = True
    for layout, rec_tp in ((Layout.QWEN3_NEXT, 1), (Layout.TP_BLOCKED, args.tp)):
        fused = work / f"fused-{layout}"
        convert(src, fused, layout=layout, tp=rec_tp)
        t0 = time.time()
        if args.tp == 1:
            for sim_tp in sorted({1, 4}):
                if layout is Layout.TP_BLOCKED and sim_tp != rec_tp:
                    continue
                res = verify_gpu(fused, src, device=args.device, tp=sim_tp, tokens=args.tokens)
                rep = gpu.summarize(res)
                lines = [ln for r in res for ln in r.lines()]
                report["runs"].append({"layout": str(layout), "sim_tp": sim_tp, **rep})
                ok &= rep["passed"]
                print("\n".join(lines), flush=True)
        else:
            rep = verify_tp(fused, src, args.tp, args.device, tokens=args.tokens)
            report["runs"].append({"layout": str(layout), **rep})
            ok &= rep["passed"]
            print("\n".join(format_report(rep)), flush=True)
        print(f"{layout}: {time.time() - t0:.1f}s", flush=True)
    # planted fault: a qwen3-next checkpoint whose record claims tp-blocked for these ranks
    lied = work / "lied"
    lied.mkdir(exist_ok=True)
    good = work / f"fused-{Layout.QWEN3_NEXT}"
    for f in good.iterdir():
        if f.name != "config.json" and not (lied / f.name).exists():
            (lied / f.name).symlink_to(f)
    cfg = json.loads((good / "config.json").read_text())
    cfg["gdnfuse"] = {**cfg["gdnfuse"], "layout": "tp-blocked", "tp": args.tp}
    (lied / "config.json").write_text(json.dumps(cfg))
    if args.tp == 1:
        bad = gpu.summarize(verify_gpu(lied, src, device=args.device, tp=1, tokens=args.tokens))
    else:
        bad = verify_tp(lied, src, args.tp, args.device, tokens=args.tokens,
                        layers=["model.language_model.layers.0.linear_attn."])
    report["planted_wrong_record"] = bad
    print(f"planted wrong layout record caught: {not bad['passed']}", flush=True)
    ok &= not bad["passed"]
    report["passed"] = ok
    (out / f"verify-tp{args.tp}.json").write_text(json.dumps(report, indent=1))
    print("VERIFY", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--out", default=os.environ.get("OUT", "bench-work"))
    b.add_argument("--no-layer", action="store_true")
    b.add_argument("--sweep", action="store_true")
    v = sub.add_parser("verify")
    v.add_argument("--out", default=os.environ.get("OUT", "bench-work"))
    v.add_argument("--work", default="/tmp/gdnfuse-verify")
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--tokens", type=int, default=256)
    v.add_argument("--hidden", type=int, default=256)
    v.add_argument("--layers", type=int, default=2)
    v.add_argument("--device", default="cuda", help="cpu: a dry run with gloo and torch ops")
    args = p.parse_args()
    return cmd_bench(args) if args.cmd == "bench" else cmd_verify(args)


if __name__ == "__main__":
    sys.exit(main())
