"""FP8 block-quantized checkpoints (issue 7): weights and block scales fused with one plan.

Tiny checkpoints shaped like the official Qwen3.5 FP8 releases are written here with torch:
``in_proj_qkv`` / ``in_proj_z`` (and the other big linears) are ``float8_e4m3fn`` with a
``weight_scale_inv`` of ``[ceil(rows/bn), ceil(H/bk)]`` blocks (bf16, as the official Qwen3 /
Qwen3.5 FP8 checkpoints store them; float32 is checked too), ``in_proj_b`` / ``in_proj_a``,
conv1d, A_log, dt_bias and norms stay bf16 and are listed in ``modules_to_not_convert``.

The expected fused tensors are computed here by an independent torch re-implementation of
both layouts (reshape + cat, not gdnfuse's run tables), and the fused layer is checked
numerically: dequantized (fp8 x block scale, float64) fused weights through
``fused_forward`` against the dequantized split weights through ``split_forward``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from typer.testing import CliRunner

from gdnfuse.cli import app
from gdnfuse.convert import convert
from gdnfuse.layout import GdnDims, Layout
from gdnfuse.quant import fused_module_names
from gdnfuse.record import unstamp_config
from gdnfuse.reference import GdnWeights, fused_forward, split_forward

FP8 = torch.float8_e4m3fn
EXACT = 1e-12
FAULT = 1e-3
PREFIX = "model.language_model."
RUNNER = CliRunner()


@dataclass(frozen=True)
class Fp8Case:
    dims: GdnDims
    hidden: int
    block: tuple[int, int]  # weight_block_size [rows, cols]
    scale_dtype: torch.dtype = torch.bfloat16

    def __str__(self) -> str:
        d = self.dims
        dt = str(self.scale_dtype).removeprefix("torch.")
        return f"r{d.r}-dk{d.dk}-H{self.hidden}-bn{self.block[0]}x{self.block[1]}-{dt}"


# nk = 4 so that tp in {1, 2} makes the layouts differ; H = 36 leaves a partial column block.
CASES = [
    Fp8Case(GdnDims(4, 4 * r, 16, 16), 36, block, sdt)
    for r, block, sdt in [
        (2, (8, 8), torch.bfloat16),
        (3, (8, 8), torch.bfloat16),
        (4, (8, 8), torch.float32),
        (2, (16, 16), torch.bfloat16),
        (3, (16, 12), torch.float32),
        (4, (16, 16), torch.bfloat16),
    ]
]
TPS = (1, 2, 4)
LINEAR_LAYERS = (0, 1)
FULL_LAYER = 2


def _fp8_with_scale(rows: int, cols: int, block: tuple[int, int], g: torch.Generator,
                    scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Random fp8 values and random positive block scales (so a misplaced scale shows)."""
    w = (torch.randn(rows, cols, generator=g) * 3).to(FP8)
    s = torch.rand(math.ceil(rows / block[0]), math.ceil(cols / block[1]), generator=g)
    return w, ((s + 0.5) * 0.02).to(scale_dtype)


def dequantize(w: Tensor, s: Tensor, block: tuple[int, int]) -> Tensor:
    """fp8 weight x its block scale, in float64 (``weight_scale_inv`` multiplies)."""
    rows, cols = w.shape
    full = s.double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return w.double() * full[:rows, :cols]


def ignore_list(conditional: bool = True, order: str = "ba") -> list[str]:
    """A ``modules_to_not_convert`` as released FP8 checkpoints list it: the head, the
    embeddings, every norm, the GDN layers' b/a, conv1d, A_log, dt_bias and norm, the
    attention q/k norms, the vision tower's blocks and the MTP module's fc and norms (the
    layer names of Qwen3.5/3.6-FP8 and Qwen3-Next-FP8 configs)."""
    p = PREFIX if conditional else "model."
    out = ["lm_head", f"{p}embed_tokens"]
    for i in (*LINEAR_LAYERS, FULL_LAYER):
        out.append(f"{p}layers.{i}.input_layernorm")
        if i in LINEAR_LAYERS:
            la = f"{p}layers.{i}.linear_attn."
            first, second = (
                ("in_proj_b", "in_proj_a") if order == "ba" else ("in_proj_a", "in_proj_b")
            )
            out += [la + "A_log", la + "conv1d", la + "dt_bias", la + first, la + second,
                    la + "norm"]  # fmt: skip
        else:
            out += [f"{p}layers.{i}.self_attn.q_norm", f"{p}layers.{i}.self_attn.k_norm"]
        out.append(f"{p}layers.{i}.post_attention_layernorm")
    if conditional:
        out += ["model.visual", *(f"model.visual.blocks.0.{m}" for m in
                                  ("attn.proj", "attn.qkv", "mlp.linear_fc1", "mlp.linear_fc2"))]
    out += ["mtp.fc", "mtp.norm", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden",
            "mtp.layers.0.input_layernorm", "mtp.layers.0.post_attention_layernorm",
            "mtp.layers.0.self_attn.q_norm", "mtp.layers.0.self_attn.k_norm"]  # fmt: skip
    return out


def quant_config(block: tuple[int, int], ignore: list[str]) -> dict[str, Any]:
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": list(block), "modules_to_not_convert": ignore}  # fmt: skip


def write_fp8_checkpoint(root: Path, case: Fp8Case, *, conditional: bool = True,
                         quant: Mapping[str, Any] | None = None, seed: int = 0,
                         in_text_config: bool = False) -> Path:  # fmt: skip
    """A Qwen3.5 FP8 checkpoint in two shards (layers interleaved, so fusions cross shards)."""
    d, h, block = case.dims, case.hidden, case.block
    g = torch.Generator().manual_seed(seed)
    p = PREFIX if conditional else "model."
    tensors: dict[str, Tensor] = {}

    def bf16(name: str, *shape: int, positive: bool = False) -> None:
        t = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        tensors[name] = (t * (1 if positive else 0.1)).to(torch.bfloat16)

    def fp8(name: str, rows: int, cols: int) -> None:
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = _fp8_with_scale(
            rows, cols, block, g, case.scale_dtype
        )

    bf16(f"{p}embed_tokens.weight", 64, h)
    for i in (*LINEAR_LAYERS, FULL_LAYER):
        lp = f"{p}layers.{i}."
        bf16(lp + "input_layernorm.weight", h, positive=True)
        if i in LINEAR_LAYERS:
            la = lp + "linear_attn."
            fp8(la + "in_proj_qkv", d.qkv_rows, h)
            fp8(la + "in_proj_z", d.z_rows, h)
            bf16(la + "in_proj_b.weight", d.nv, h)
            bf16(la + "in_proj_a.weight", d.nv, h)
            bf16(la + "conv1d.weight", d.qkv_rows, 1, 4)
            bf16(la + "A_log", d.nv, positive=True)
            bf16(la + "dt_bias", d.nv, positive=True)
            bf16(la + "norm.weight", d.dv, positive=True)
            fp8(la + "out_proj", h, d.nv * d.dv)
        else:
            sa = lp + "self_attn."
            fp8(sa + "q_proj", 2 * 2 * 16, h)
            fp8(sa + "k_proj", 16, h)
            fp8(sa + "v_proj", 16, h)
            fp8(sa + "o_proj", h, 2 * 16)
        bf16(lp + "post_attention_layernorm.weight", h, positive=True)
        fp8(lp + "mlp.gate_proj", 48, h)
        fp8(lp + "mlp.up_proj", 48, h)
        fp8(lp + "mlp.down_proj", h, 48)
    bf16(f"{p}norm.weight", h, positive=True)
    bf16("lm_head.weight", 64, h)
    if conditional:
        bf16("model.visual.patch_embed.proj.weight", 8, 12)

    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    shards = {f"model-0000{k + 1}-of-00002.safetensors": names[k::2] for k in range(2)}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(root / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    text = {
        "model_type": "qwen3_5_text", "hidden_size": h, "num_hidden_layers": 3,
        "layer_types": ["linear_attention", "linear_attention", "full_attention"],
        "linear_num_key_heads": d.nk, "linear_num_value_heads": d.nv,
        "linear_key_head_dim": d.dk, "linear_value_head_dim": d.dv,
        "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6, "vocab_size": 64,
    }  # fmt: skip
    q = dict(quant) if quant is not None else quant_config(block, ignore_list(conditional))
    if conditional:
        config: dict[str, Any] = {"architectures": ["Qwen3_5ForConditionalGeneration"],
                                  "model_type": "qwen3_5", "text_config": text}  # fmt: skip
    else:
        config = {"architectures": ["Qwen3_5ForCausalLM"], **text}
    holder = config["text_config"] if in_text_config else config
    holder["quantization_config"] = q
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer_config.json").write_text("{}\n")
    return root


def load_dir(root: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expected_fused(first: Tensor, second: Tensor, kind: str, dims: GdnDims, layout: Layout,
                   tp: int) -> Tensor:  # fmt: skip
    """The fused tensor by reshape + cat, written from docs/layouts.md section 3 (not layout.py).

    ``dims`` are in rows of these tensors (blocks for scales). Works on raw bytes (uint8)
    so fp8 and bf16 are permuted alike.
    """
    nk, dk = dims.nk, dims.dk
    a, b = first.view(torch.uint8), second.view(torch.uint8)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    c = a.shape[1]
    groups = nk if layout == Layout.QWEN3_NEXT else tp
    if kind == "qkvz":
        q, k, v = a[: nk * dk], a[nk * dk : 2 * nk * dk], a[2 * nk * dk :]
        parts = [q, k, v, b]
    else:
        parts = [a, b]
    return torch.cat([t.reshape(groups, -1, c) for t in parts], dim=1).reshape(-1, c)


def run_convert(src: Path, out: Path, layout: Layout, tp: int) -> None:
    convert(src, out, layout=layout, tp=tp, workers=1, overwrite=True)


@pytest.fixture(scope="module", params=CASES, ids=str)
def fp8_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    case: Fp8Case = request.param
    src = write_fp8_checkpoint(tmp_path_factory.mktemp("fp8src"), case)
    return case, src, load_dir(src)


def _layer_weights(t: Mapping[str, Tensor], la: str, case: Fp8Case) -> GdnWeights:
    return GdnWeights(
        conv1d=t[la + "conv1d.weight"].double(),
        A_log=t[la + "A_log"].double(),
        dt_bias=t[la + "dt_bias"].double(),
        norm=t[la + "norm.weight"].double(),
        out_proj=dequantize(
            t[la + "out_proj.weight"], t[la + "out_proj.weight_scale_inv"], case.block
        ),  # fmt: skip
    )


def _split_out(t: Mapping[str, Tensor], la: str, case: Fp8Case, x: Tensor) -> Tensor:
    return split_forward(
        x,
        dequantize(t[la + "in_proj_qkv.weight"], t[la + "in_proj_qkv.weight_scale_inv"],
                   case.block),
        dequantize(t[la + "in_proj_z.weight"], t[la + "in_proj_z.weight_scale_inv"], case.block),
        t[la + "in_proj_b.weight"].double(),
        t[la + "in_proj_a.weight"].double(),
        _layer_weights(t, la, case),
        case.dims,
    )  # fmt: skip


@pytest.mark.parametrize("layout", list(Layout), ids=str)
def test_fp8_fused_bytes_and_dequantized_layer(fp8_ckpt, layout: Layout, tmp_path: Path) -> None:
    case, src, split = fp8_ckpt
    dims = case.dims
    blocks = dims.in_blocks(case.block[0])
    x = torch.randn(1, 5, case.hidden, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)  # fmt: skip
    for tp in TPS:
        out = tmp_path / f"tp{tp}"
        run_convert(src, out, layout, tp)
        fused = load_dir(out)
        # Only the four split GDN projections (x 2 leaves for qkv/z) went away.
        gone = set(split) - set(fused)
        assert gone == {f"{PREFIX}layers.{i}.linear_attn.in_proj_{p}.{leaf}"
                        for i in LINEAR_LAYERS for p, leaf in
                        [("qkv", "weight"), ("qkv", "weight_scale_inv"), ("z", "weight"),
                         ("z", "weight_scale_inv"), ("b", "weight"), ("a", "weight")]}  # fmt: skip
        for name in set(split) & set(fused):
            assert torch.equal(split[name].view(torch.uint8), fused[name].view(torch.uint8)), name
        for i in LINEAR_LAYERS:
            la = f"{PREFIX}layers.{i}.linear_attn."
            qkvz, qkvz_s = (
                fused[la + "in_proj_qkvz.weight"],
                fused[la + "in_proj_qkvz.weight_scale_inv"],
            )
            ba = fused[la + "in_proj_ba.weight"]
            assert set(fused) >= {la + "in_proj_qkvz.weight", la + "in_proj_ba.weight"}
            assert la + "in_proj_ba.weight_scale_inv" not in fused
            # One dtype per tensor: fp8 rows with fp8 rows, bf16 b/a stays bf16.
            assert qkvz.dtype == FP8 and qkvz_s.dtype == case.scale_dtype
            assert ba.dtype == torch.bfloat16
            want_w = expected_fused(
                split[la + "in_proj_qkv.weight"],
                split[la + "in_proj_z.weight"],
                "qkvz",
                dims,
                layout,
                tp,
            )
            want_s = expected_fused(
                split[la + "in_proj_qkv.weight_scale_inv"],
                split[la + "in_proj_z.weight_scale_inv"],
                "qkvz",
                blocks,
                layout,
                tp,
            )
            want_ba = expected_fused(
                split[la + "in_proj_b.weight"],
                split[la + "in_proj_a.weight"],
                "ba",
                dims,
                layout,
                tp,
            )
            assert torch.equal(qkvz.view(torch.uint8), want_w)
            assert torch.equal(qkvz_s.view(torch.uint8).reshape(qkvz_s.shape[0], -1), want_s)
            assert torch.equal(ba.view(torch.uint8).reshape(ba.shape[0], -1), want_ba)
            assert qkvz_s.shape == (blocks.qkvz_rows, math.ceil(case.hidden / case.block[1]))
            # The dequantized fused layer, run as tp ranks of that layout's consumer.
            got = fused_forward(x, dequantize(qkvz, qkvz_s, case.block), ba.double(),
                                _layer_weights(fused, la, case), dims, layout, tp)  # fmt: skip
            want = _split_out(split, la, case, x)
            assert want.abs().max() > 0.1
            assert (got - want).abs().max() < EXACT
        meta = json.loads((out / "config.json").read_text())
        assert meta["gdnfuse"]["layout"] == str(layout) and meta["gdnfuse"]["tp"] == tp


def test_expected_permutation_tells_layouts_apart() -> None:
    """The torch re-implementation is not layout-blind: with nk/tp > 1 the layouts differ."""
    dims = GdnDims(4, 8, 2, 3)
    qkv = torch.arange(dims.qkv_rows * 2, dtype=torch.int16).reshape(dims.qkv_rows, 2)
    z = -torch.arange(dims.z_rows * 2, dtype=torch.int16).reshape(dims.z_rows, 2)
    for tp in (1, 2):
        a = expected_fused(qkv, z, "qkvz", dims, Layout.QWEN3_NEXT, tp)
        b = expected_fused(qkv, z, "qkvz", dims, Layout.TP_BLOCKED, tp)
        assert not torch.equal(a, b)
    same = [expected_fused(qkv, z, "qkvz", dims, lay, 4) for lay in Layout]
    assert torch.equal(*same)


def test_misplaced_scales_are_caught(fp8_ckpt) -> None:
    """Planted fault: fused fp8 rows with scales not permuted (or permuted in row units)."""
    case, _, split = fp8_ckpt
    dims, layout = case.dims, Layout.QWEN3_NEXT
    la = f"{PREFIX}layers.0.linear_attn."
    x = torch.randn(1, 4, case.hidden, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)  # fmt: skip
    want = _split_out(split, la, case, x)
    w = expected_fused(split[la + "in_proj_qkv.weight"], split[la + "in_proj_z.weight"], "qkvz",
                       dims, layout, 1).view(FP8)  # fmt: skip
    s_qkv, s_z = (
        split[la + "in_proj_qkv.weight_scale_inv"],
        split[la + "in_proj_z.weight_scale_inv"],
    )
    ba = torch.cat(
        [
            split[la + "in_proj_b.weight"].reshape(dims.nk, dims.r, -1),
            split[la + "in_proj_a.weight"].reshape(dims.nk, dims.r, -1),
        ],
        1,
    )
    ba = ba.reshape(dims.ba_rows, -1).double()  # fmt: skip
    unpermuted = torch.cat([s_qkv, s_z])
    good = expected_fused(s_qkv, s_z, "qkvz", dims.in_blocks(case.block[0]), layout, 1)
    good = good.view(s_qkv.dtype).reshape(unpermuted.shape)
    weights = _layer_weights(split, la, case)
    ok = fused_forward(x, dequantize(w, good, case.block), ba, weights, dims, layout, 1)
    assert (ok - want).abs().max() < EXACT
    bad = fused_forward(x, dequantize(w, unpermuted, case.block), ba, weights, dims, layout, 1)
    assert (bad - want).abs().max() > FAULT


def test_ignore_list_rewrite(tmp_path: Path) -> None:
    """Every listed in_proj_b + in_proj_a pair becomes one in_proj_ba; nothing else changes."""
    case = CASES[0]
    for order in ("ba", "ab"):
        ignore = ignore_list(order=order)
        q = quant_config(case.block, ignore)
        q["ignored_layers"] = list(ignore)
        q["ignore"] = ["lm_head", *ignore[-8:], "lm_head"]  # a duplicate entry stays
        for in_text in (False, True):
            src = write_fp8_checkpoint(tmp_path / f"src-{order}-{in_text}", case, quant=q,
                                       in_text_config=in_text)  # fmt: skip
            out = tmp_path / f"out-{order}-{in_text}"
            run_convert(src, out, Layout.QWEN3_NEXT, 2)
            before = json.loads((src / "config.json").read_text())
            after = unstamp_config(json.loads((out / "config.json").read_text()))
            assert after.pop("gdnfuse")["layout"] == "qwen3-next"
            holder_a = after["text_config"] if in_text else after
            holder_b = before["text_config"] if in_text else before
            qa, qb = holder_a.pop("quantization_config"), holder_b.pop("quantization_config")
            assert after == before  # nothing outside quantization_config changed
            for key in ("modules_to_not_convert", "ignored_layers", "ignore"):
                assert qa.pop(key) == _expected_rewrite(qb.pop(key)), key
            assert qa == qb  # no other field of quantization_config changed
            listed = _expected_rewrite(ignore)
            for i in LINEAR_LAYERS:
                la = f"{PREFIX}layers.{i}.linear_attn."
                assert listed.count(la + "in_proj_ba") == 1
                assert la + "in_proj_b" in listed and la + "in_proj_a" in listed


def _expected_rewrite(names: list[Any]) -> list[Any]:
    """Independent expectation: keep every name; after each layer's first of b/a add its ba
    (sglang matches the split names of a packed module, vLLM the fused one)."""
    out, seen_layers = [], set()
    for n in names:
        out.append(n)
        for split in (".in_proj_b", ".in_proj_a"):
            if isinstance(n, str) and n.endswith(split):
                layer = n[: -len(split)]
                if layer not in seen_layers:
                    seen_layers.add(layer)
                    out.append(layer + ".in_proj_ba")
                break
    return out


def test_fused_module_names_edge_cases() -> None:
    names = ["a.linear_attn.in_proj_a", "x", "a.linear_attn.in_proj_b", "x",
             "a.linear_attn.in_proj_qkvz", "a.linear_attn.in_proj_a_extra",
             "a.linear_attn.in_proj_qkv.weight", 7, "b.linear_attn.in_proj_b"]  # fmt: skip
    assert fused_module_names(names) == [
        "a.linear_attn.in_proj_a", "a.linear_attn.in_proj_ba", "x", "a.linear_attn.in_proj_b",
        "x", "a.linear_attn.in_proj_qkvz", "a.linear_attn.in_proj_a_extra",
        "a.linear_attn.in_proj_qkv.weight", "a.linear_attn.in_proj_qkvz.weight", 7,
        "b.linear_attn.in_proj_b", "b.linear_attn.in_proj_ba",
    ]  # fmt: skip


def _cli_convert(src: Path, out: Path, *extra: str) -> tuple[int, str]:
    res = RUNNER.invoke(app, ["convert", str(src), "--out", str(out), "--quiet", *extra])
    return res.exit_code, " ".join((res.stderr or "").split())


@pytest.mark.parametrize("bn", [12, 32])
def test_refuses_block_not_dividing_head_dim(tmp_path: Path, bn: int) -> None:
    case = Fp8Case(GdnDims(4, 8, 16, 16), 36, (bn, bn))
    src = write_fp8_checkpoint(tmp_path / "src", case)
    code, msg = _cli_convert(src, tmp_path / "out")
    assert code == 2, msg
    rows = math.ceil(case.dims.qkv_rows / bn)
    for part in (
        "dk=16",
        "dv=16",
        f"weight_block_size {bn}",
        f"scale shape [{rows}, {math.ceil(36 / bn)}]",
        "in_proj_qkv.weight_scale_inv",
    ):
        assert part in msg, (part, msg)  # fmt: skip
    assert not (tmp_path / "out" / "config.json").exists()


UNSUPPORTED = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "gptq"),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}, "awq"),
    "compressed-tensors": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                            "config_groups": {}}, "compressed-tensors"),
    "fp8-per-tensor": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static"},
                       "per-tensor"),
    "nvfp4-modelopt": ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "NVFP4"),
    "nvfp4-ct": ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"},
                 "nvfp4-pack-quantized"),
    "fp8-bad-block": ({"quant_method": "fp8", "weight_block_size": [128]}, "fp8"),
}  # fmt: skip


@pytest.mark.parametrize("scheme", list(UNSUPPORTED))
def test_refuses_unsupported_scheme(tmp_path: Path, scheme: str) -> None:
    quant, word = UNSUPPORTED[scheme]
    case = CASES[0]
    src = write_fp8_checkpoint(tmp_path / "src", case, quant=quant)
    if scheme == "gptq":  # packed int4 tensors in place of the GDN weights, as GPTQ stores them
        _to_gptq(src, case)
    code, msg = _cli_convert(src, tmp_path / "out")
    assert code == 2, msg
    assert "not supported" in msg and word in msg, msg


def _to_gptq(root: Path, case: Fp8Case) -> None:
    for f in root.glob("*.safetensors"):
        t = load_file(str(f))
        new: dict[str, Tensor] = {}
        for name, v in t.items():
            if ".linear_attn.in_proj_" in name and name.endswith(".weight_scale_inv"):
                continue
            if ".linear_attn.in_proj_" in name and name.endswith(".weight"):
                base = name.removesuffix(".weight")
                rows = v.shape[0]
                new[base + ".qweight"] = torch.zeros(case.hidden // 4, rows, dtype=torch.int32)
                new[base + ".scales"] = torch.ones(1, rows, dtype=torch.float16)
            else:
                new[name] = v
        save_file(new, str(f), metadata={"format": "pt"})
    index = {
        "weight_map": {n: f.name for f in root.glob("*.safetensors") for n in load_file(str(f))}
    }
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def _rewrite_tensor(root: Path, name: str, fn) -> None:
    for f in root.glob("*.safetensors"):
        t = load_file(str(f))
        if name in t:
            t[name] = fn(t[name])
            save_file(t, str(f), metadata={"format": "pt"})
            return
    raise KeyError(name)


def test_refuses_mixed_dtypes_and_lone_scales(tmp_path: Path) -> None:
    """Planted faults: fp8 qkv with bf16 z; a z scale missing; a scale on a bf16 weight."""
    case = CASES[0]
    la = f"{PREFIX}layers.1.linear_attn."

    src = write_fp8_checkpoint(tmp_path / "mixed", case)
    _rewrite_tensor(src, la + "in_proj_z.weight", lambda t: t.to(torch.bfloat16))
    code, msg = _cli_convert(src, tmp_path / "o1")
    assert code == 2 and "different dtype" in msg and "F8_E4M3" in msg and "BF16" in msg, msg

    src = write_fp8_checkpoint(tmp_path / "lone", case)
    for f in src.glob("*.safetensors"):
        t = load_file(str(f))
        if t.pop(la + "in_proj_z.weight_scale_inv", None) is not None:
            save_file(t, str(f), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"][la + "in_proj_z.weight_scale_inv"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    code, msg = _cli_convert(src, tmp_path / "o2")
    assert code == 2 and "in_proj_z.weight_scale_inv" in msg, msg

    src = write_fp8_checkpoint(tmp_path / "bf16w", case)
    for part in ("qkv", "z"):
        _rewrite_tensor(src, la + f"in_proj_{part}.weight", lambda t: t.to(torch.bfloat16))
    code, msg = _cli_convert(src, tmp_path / "o3")
    assert code == 2 and "block scale without an fp8 weight" in msg, msg

    src = write_fp8_checkpoint(tmp_path / "cols", case)
    _rewrite_tensor(src, la + "in_proj_z.weight_scale_inv", lambda t: t[:, :-1].contiguous())
    _rewrite_tensor(src, la + "in_proj_qkv.weight_scale_inv", lambda t: t[:, :-1].contiguous())
    code, msg = _cli_convert(src, tmp_path / "o4")
    assert code == 2 and re.search(r"scale shape \[\d+, 4\] is not \[\d+, 5\]", msg), msg


def test_text_only_fp8_checkpoint(tmp_path: Path) -> None:
    """A Qwen3_5ForCausalLM-style FP8 save (keys under ``model.``) converts the same way."""
    case = CASES[1]
    src = write_fp8_checkpoint(tmp_path / "src", case, conditional=False)
    out = tmp_path / "out"
    run_convert(src, out, Layout.TP_BLOCKED, 2)
    fused, split = load_dir(out), load_dir(src)
    la = "model.layers.0.linear_attn."
    want = expected_fused(split[la + "in_proj_qkv.weight_scale_inv"],
                          split[la + "in_proj_z.weight_scale_inv"], "qkvz",
                          case.dims.in_blocks(case.block[0]), Layout.TP_BLOCKED, 2)  # fmt: skip
    got = fused[la + "in_proj_qkvz.weight_scale_inv"]
    assert torch.equal(got.view(torch.uint8).reshape(got.shape[0], -1), want)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["modules_to_not_convert"] == _expected_rewrite(ignore_list(conditional=False))
    assert "model.layers.0.linear_attn.in_proj_ba" in q["modules_to_not_convert"]
