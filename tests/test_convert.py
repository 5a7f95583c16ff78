"""End to end: checkpoints saved by transformers, converted, then read back independently.

Everything is read with the official ``safetensors`` reader (never gdnfuse's own header
code), the expected fused tensors are assembled here from the source tensors by head
arithmetic, and the converted layers are run through transformers' ``Qwen3NextGatedDeltaNet``
and the float64 reference. Each checker below is also run on outputs with a planted fault
(``test_checker_catches_planted_fault``), so none of them can pass vacuously.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import (
    SIDE_FILES,
    TinySpec,
    build_checkpoint,
    gdn_prefixes,
    load_spec,
    torch_threads,
)
from torch import Tensor
from transformers import Qwen3_5TextConfig, Qwen3NextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet
from typer.testing import CliRunner

from gdnfuse.cli import app
from gdnfuse.convert import MANIFEST_NAME, convert
from gdnfuse.layout import GdnDims, Layout, valid_tp
from gdnfuse.record import STAMP_MODEL_TYPE, unstamp_config
from gdnfuse.reference import GdnWeights, fused_forward, split_forward

EXACT = 1e-12
"""float64 reference, fused vs split: the same arithmetic on the same rows."""
SHIPPED_REL = 1e-5
"""transformers computes the delta rule in float32 even for float64 modules."""
INDEX = "model.safetensors.index.json"
SPLIT_KEY = re.compile(r"\.linear_attn\.in_proj_(qkv|z|b|a)\.")
FUSED = ("in_proj_qkvz.weight", "in_proj_ba.weight")
SPLIT_LEAVES = ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight")
GDN_COMMON = ("conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@dataclass(frozen=True)
class Source:
    """One tiny checkpoint: r = 1..4, nk in {2, 4}, both families, dk != dv mostly."""

    name: str
    r: int
    nk: int
    dk: int
    dv: int
    moe: bool
    conditional: bool
    dtype: torch.dtype = torch.float32
    mtp: bool = False


SOURCES = [
    Source("r1-nk2-dense-text", 1, 2, 8, 4, moe=False, conditional=False),
    Source("r2-nk4-moe-vl-mtp", 2, 4, 4, 8, moe=True, conditional=True, mtp=True),
    Source("r3-nk4-dense-vl-f64", 3, 4, 8, 4, moe=False, conditional=True, dtype=torch.float64),
    Source("r4-nk2-moe-text", 4, 2, 4, 4, moe=True, conditional=False),
    Source("r2-nk4-dense-text", 2, 4, 4, 8, moe=False, conditional=False),
]
CONVERSIONS = [(s.name, layout, tp) for s in SOURCES for layout in Layout for tp in valid_tp(s.nk)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        s.name: build_checkpoint(
            root / s.name,
            r=s.r,
            nk=s.nk,
            dk=s.dk,
            dv=s.dv,
            moe=s.moe,
            conditional=s.conditional,
            dtype=s.dtype,
            seed=i,
            mtp=s.mtp,
        )
        for i, s in enumerate(SOURCES)
    }


# Reading checkpoints with the official reader.


def shard_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.safetensors"))


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a directory and the shard holding each (safe_open, then load_file)."""
    tensors: dict[str, Tensor] = {}
    where: dict[str, str] = {}
    for shard in shard_names(path):
        with safe_open(path / shard, framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                assert key not in tensors, f"{key} is in two shards"
                tensors[key], where[key] = f.get_tensor(key), shard
        loaded = load_file(path / shard)
        assert sorted(loaded) == sorted(keys)
        assert all(
            torch.equal(loaded[k].view(torch.uint8), tensors[k].view(torch.uint8)) for k in keys
        )
    return tensors, where


def shard_metadata(path: Path) -> dict[str, dict[str, str]]:
    out = {}
    for shard in shard_names(path):
        with safe_open(path / shard, framework="pt") as f:
            out[shard] = dict(f.metadata() or {})
    return out


def same_bits(a: Tensor, b: Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


# The checkers: each raises AssertionError naming what is wrong.


def check_keys_and_untouched(src: Path, out: Path, spec: TinySpec) -> None:
    """No split key remains, both fused keys per GDN layer, everything else bit-identical."""
    s, _ = read_tensors(src)
    o, _ = read_tensors(out)
    leftover = [k for k in o if SPLIT_KEY.search(k)]
    assert not leftover, f"split keys remain: {leftover}"
    fused = {p + leaf for p in gdn_prefixes(spec) for leaf in FUSED}
    assert set(o) == {k for k in s if not SPLIT_KEY.search(k)} | fused
    dims = spec.dims
    for p in gdn_prefixes(spec):
        assert tuple(o[p + FUSED[0]].shape) == (dims.qkvz_rows, spec.hidden)
        assert tuple(o[p + FUSED[1]].shape) == (dims.ba_rows, spec.hidden)
    for key in set(o) - fused:
        assert same_bits(o[key], s[key]), f"{key} differs from the source"


def check_index(out: Path) -> None:
    """weight_map lists every tensor once, with its shard; total_size is the tensor bytes."""
    index = json.loads((out / INDEX).read_text())
    tensors, where = read_tensors(out)
    assert index["weight_map"] == where, "weight_map does not match the shards"
    assert set(index["weight_map"].values()) == set(shard_names(out)), "weight_map files"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total, "total_size"


def check_record(src: Path, out: Path, layout: Layout, tp: int) -> None:
    """config.json and each rewritten shard say which layout they hold; the rest is kept."""
    src_cfg = json.loads((src / "config.json").read_text())
    stamped = json.loads((out / "config.json").read_text())
    # No engine reads the record: the default output is stamped so that every engine refuses it.
    assert stamped["model_type"] == STAMP_MODEL_TYPE, "default output is not stamped"
    assert stamped["architectures"] == ["GdnfuseFused" + a for a in src_cfg["architectures"]]
    out_cfg = unstamp_config(stamped)
    record = out_cfg.pop("gdnfuse", None)
    assert record is not None, "config.json has no gdnfuse record"
    assert record["stamp"] == {k: src_cfg[k] for k in ("model_type", "architectures")}
    assert out_cfg == src_cfg
    assert (record["layout"], record["tp"]) == (str(layout), tp)
    assert record["source"]["name"] == src.resolve().name  # no absolute path is published
    assert str(src.parent.resolve()) not in json.dumps(record)
    src_tensors = _keys_by_shard(src)
    src_meta, out_meta = shard_metadata(src), shard_metadata(out)
    assert set(out_meta) == set(src_meta)
    for shard, meta in out_meta.items():
        kept = {k: v for k, v in meta.items() if not k.startswith("gdnfuse.")}
        assert kept == src_meta[shard], f"{shard}: source __metadata__ not kept"
        if any(SPLIT_KEY.search(k) for k in src_tensors[shard]):
            assert meta.get("gdnfuse.layout") == str(layout), f"{shard}: gdnfuse.layout"
            assert meta.get("gdnfuse.tp") == str(tp), shard
            assert json.loads(meta["gdnfuse.source"]) == record["source"], shard
        else:
            assert meta == src_meta[shard], f"{shard} is untouched but its metadata changed"
            assert (out / shard).read_bytes() == (src / shard).read_bytes(), shard


def _keys_by_shard(path: Path) -> dict[str, list[str]]:
    out = {}
    for shard in shard_names(path):
        with safe_open(path / shard, framework="pt") as f:
            out[shard] = list(f.keys())
    return out


def check_side_files(src: Path, out: Path) -> None:
    """Every non-weight file except config/index is copied byte for byte."""
    names = {p.name for p in src.iterdir()} - set(shard_names(src)) - {"config.json", INDEX}
    assert {"generation_config.json", *SIDE_FILES} <= names
    for name in sorted(names):
        assert (out / name).is_file(), f"side file {name} not copied"
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def expected_fused(
    s: dict[str, Tensor], prefix: str, dims: GdnDims, layout: Layout, tp: int
) -> tuple[list[Tensor], list[Tensor]]:
    """The fused tensors in contiguous pieces, built from head arithmetic alone.

    ``qwen3-next``: one ``[Q_h; K_h; V_group; Z_group]`` piece per key head (``[B; A]`` of
    the group for ba). ``tp-blocked``: one ``[q_t; k_t; v_t; z_t]`` piece per rank.
    """
    qkv, z = s[prefix + "in_proj_qkv.weight"], s[prefix + "in_proj_z.weight"]
    b, a = s[prefix + "in_proj_b.weight"], s[prefix + "in_proj_a.weight"]
    nk, nv, dk, dv = dims.nk, dims.nv, dims.dk, dims.dv
    q_all, k_all, v_all = torch.split(qkv, [nk * dk, nk * dk, nv * dv])
    per_q = q_all.reshape(nk, dk, -1)
    per_k = k_all.reshape(nk, dk, -1)
    per_v = v_all.reshape(nv, dv, -1)
    per_z = z.reshape(nv, dv, -1)
    if layout is Layout.QWEN3_NEXT:
        groups, heads, vals = range(nk), 1, dims.r
    else:
        groups, heads, vals = range(tp), nk // tp, nv // tp
    qkvz, ba = [], []
    for g in groups:
        ks, vs = slice(g * heads, (g + 1) * heads), slice(g * vals, (g + 1) * vals)
        qkvz.append(
            torch.cat(
                [
                    per_q[ks].flatten(0, 1),
                    per_k[ks].flatten(0, 1),
                    per_v[vs].flatten(0, 1),
                    per_z[vs].flatten(0, 1),
                ]
            )
        )
        ba.append(torch.cat([b[vs], a[vs]]))
    return qkvz, ba


def check_fused_bytes(src: Path, out: Path, spec: TinySpec, layout: Layout, tp: int) -> None:
    """Each contiguous piece (key-head group or TP rank) holds exactly the expected rows."""
    s, _ = read_tensors(src)
    o, _ = read_tensors(out)
    for prefix in gdn_prefixes(spec):
        pieces = expected_fused(s, prefix, spec.dims, layout, tp)
        for leaf, want in zip(FUSED, pieces, strict=True):
            got = o[prefix + leaf]
            assert sum(p.shape[0] for p in want) == got.shape[0]
            row = 0
            for i, piece in enumerate(want):
                assert same_bits(got[row : row + piece.shape[0]], piece), f"{leaf} piece {i}"
                row += piece.shape[0]


def _weights(t: dict[str, Tensor], prefix: str) -> GdnWeights:
    return GdnWeights(
        conv1d=t[prefix + "conv1d.weight"].double(),
        A_log=t[prefix + "A_log"].double(),
        dt_bias=t[prefix + "dt_bias"].double(),
        norm=t[prefix + "norm.weight"].double(),
        out_proj=t[prefix + "out_proj.weight"].double(),
        eps=1e-6,
    )


def _layer_config(cls: type, spec: TinySpec) -> object:
    return cls(
        hidden_size=spec.hidden,
        linear_num_key_heads=spec.nk,
        linear_num_value_heads=spec.dims.nv,
        linear_key_head_dim=spec.dk,
        linear_value_head_dim=spec.dv,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        num_hidden_layers=1,
        layer_types=["linear_attention"],
    )


def _run_layer(module: torch.nn.Module, state: dict[str, Tensor], x: Tensor) -> Tensor:
    module = module.double()
    module.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return module(x)


def check_numerics(src: Path, out: Path, spec: TinySpec, layout: Layout, tp: int) -> None:
    """The converted layers compute what the source layers compute (float64).

    Reference: fused_forward on the converted tensors (as ``tp`` ranks of a consumer of
    ``layout``; a qwen3-next tensor at every valid tp) vs split_forward on the source, to
    1e-12. transformers: Qwen3NextGatedDeltaNet with the fused weights vs
    Qwen3_5GatedDeltaNet with the split ones (qwen3-next only; float32 inside).
    """
    s, _ = read_tensors(src)
    o, _ = read_tensors(out)
    dims = spec.dims
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, spec.hidden, generator=gen, dtype=torch.float64)
    for prefix in gdn_prefixes(spec):
        w = _weights(s, prefix)
        split = [s[prefix + leaf].double() for leaf in SPLIT_LEAVES]
        want = split_forward(x, *split, w, dims)
        assert want.abs().max() > 0.05, "degenerate layer output"
        qkvz, ba = o[prefix + FUSED[0]].double(), o[prefix + FUSED[1]].double()
        for t in valid_tp(dims.nk) if layout is Layout.QWEN3_NEXT else [tp]:
            got = fused_forward(x, qkvz, ba, w, dims, layout, t)
            diff = (got - want).abs().max().item()
            assert diff <= EXACT, f"{prefix} reference tp={t}: {diff:.3g}"
        if layout is not Layout.QWEN3_NEXT:
            continue
        common = {k: s[prefix + k] for k in GDN_COMMON}
        split_state = common | dict(zip(SPLIT_LEAVES, split, strict=True))
        hf_split = _run_layer(
            Qwen3_5GatedDeltaNet(_layer_config(Qwen3_5TextConfig, spec), 0), split_state, x
        )
        hf_fused = _run_layer(
            Qwen3NextGatedDeltaNet(_layer_config(Qwen3NextConfig, spec), 0),
            common | {"in_proj_qkvz.weight": qkvz, "in_proj_ba.weight": ba},
            x,
        )
        scale = hf_split.abs().max().item()
        diff = (hf_fused - hf_split).abs().max().item()
        assert diff <= SHIPPED_REL * scale, f"{prefix} transformers: {diff:.3g} (scale {scale:.3g})"
        diff_ref = (hf_split - want).abs().max().item()
        assert diff_ref <= SHIPPED_REL * scale, f"{prefix} transformers vs reference: {diff_ref}"


def check_conversion(src: Path, out: Path, layout: Layout, tp: int) -> None:
    spec = load_spec(src)
    check_keys_and_untouched(src, out, spec)
    check_index(out)
    check_record(src, out, layout, tp)
    check_side_files(src, out)
    check_fused_bytes(src, out, spec, layout, tp)
    check_numerics(src, out, spec, layout, tp)


# 1. The Python API, every source x layout x valid tp.


@pytest.mark.parametrize(
    ("source", "layout", "tp"), CONVERSIONS, ids=[f"{s}-{lay}-tp{t}" for s, lay, t in CONVERSIONS]
)
def test_convert(
    sources: dict[str, Path], tmp_path: Path, source: str, layout: Layout, tp: int
) -> None:
    src = sources[source]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert len(shard_names(src)) >= 3
    result = convert(src, tmp_path / "out", layout=layout, tp=tp)
    out = tmp_path / "out"
    check_conversion(src, out, layout, tp)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before, "source modified"
    n_layers = len(gdn_prefixes(load_spec(src)))
    assert result.plan.layers == n_layers and len(result.plan.groups) == 2 * n_layers
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["record"] == json.loads((out / "config.json").read_text())["gdnfuse"]
    assert {n: f["size"] for n, f in manifest["files"].items()} == {
        n: (out / n).stat().st_size for n in manifest["files"]
    }
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporaries left"


def test_layouts_differ_where_expected(sources: dict[str, Path], tmp_path: Path) -> None:
    """nk/tp > 1: different bytes; nk/tp == 1: identical fused tensors."""
    src = sources["r3-nk4-dense-vl-f64"]
    outs = {}
    for layout in Layout:
        for tp in (2, 4):
            outs[layout, tp] = read_tensors(
                convert(src, tmp_path / f"{layout}{tp}", layout=layout, tp=tp).out
            )[0]
    key = gdn_prefixes(load_spec(src))[0] + FUSED[0]
    assert not same_bits(outs[Layout.QWEN3_NEXT, 2][key], outs[Layout.TP_BLOCKED, 2][key])
    assert same_bits(outs[Layout.QWEN3_NEXT, 4][key], outs[Layout.TP_BLOCKED, 4][key])


# 2. Planted faults: every checker catches its fault.


def _rewrite_tensor(out: Path, key: str, fn: Callable[[Tensor], Tensor]) -> None:
    """Replace one tensor in its shard by ``fn(tensor)``, keeping the shard metadata."""
    index = json.loads((out / INDEX).read_text())
    shard = index["weight_map"][key]
    tensors = load_file(out / shard)
    with safe_open(out / shard, framework="pt") as f:
        meta = f.metadata()
    tensors[key] = fn(tensors[key]).contiguous()
    save_file(tensors, out / shard, metadata=meta)


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _swap_first_rows(t: Tensor) -> Tensor:
    t = t.clone()
    t[[0, 1]] = t[[1, 0]]
    return t


def _flip_one_bit(t: Tensor) -> Tensor:
    raw = t.clone().contiguous().view(torch.uint8).flatten()
    raw[0] ^= 1
    return raw.view(t.dtype).reshape(t.shape)


FAULTS: dict[str, tuple[Callable[[Path, str], None], Callable[..., None], str]] = {
    # name: (plant(out, prefix), checker, expected message)
    "fused-rows-swapped": (
        lambda out, p: _rewrite_tensor(out, p + FUSED[0], _swap_first_rows),
        check_fused_bytes,
        "piece 0",
    ),
    "fused-rows-swapped-numerics": (
        lambda out, p: _rewrite_tensor(out, p + FUSED[1], _swap_first_rows),
        check_numerics,
        "reference",
    ),
    "untouched-bit-flip": (
        lambda out, p: _rewrite_tensor(out, p + "conv1d.weight", _flip_one_bit),
        check_keys_and_untouched,
        "differs from the source",
    ),
    "split-key-left": (
        lambda out, p: _add_tensor(out, p + "in_proj_b.weight"),
        check_keys_and_untouched,
        "split keys remain",
    ),
    "index-missing-entry": (
        lambda out, p: _edit_json(out / INDEX, lambda d: d["weight_map"].pop(p + FUSED[0])),
        check_index,
        "weight_map does not match",
    ),
    "index-wrong-total": (
        lambda out, p: _edit_json(out / INDEX, lambda d: d["metadata"].update(total_size=1)),
        check_index,
        "total_size",
    ),
    "config-record-missing": (
        lambda out, p: _edit_json(out / "config.json", lambda d: d.pop("gdnfuse")),
        check_record,
        "no gdnfuse record",
    ),
    "shard-record-missing": (
        lambda out, p: _strip_shard_record(out, p + FUSED[0]),
        check_record,
        "gdnfuse.layout",
    ),
    "side-file-missing": (
        lambda out, p: (out / "chat_template.jinja").unlink(),
        check_side_files,
        "chat_template.jinja",
    ),
}


def _add_tensor(out: Path, key: str) -> None:
    """Put a stray tensor named ``key`` into the first shard (and the index)."""
    shard = shard_names(out)[0]
    tensors = load_file(out / shard)
    with safe_open(out / shard, framework="pt") as f:
        meta = f.metadata()
    tensors[key] = torch.zeros(2, 2)
    save_file(tensors, out / shard, metadata=meta)
    _edit_json(out / INDEX, lambda d: d["weight_map"].update({key: shard}))


def _strip_shard_record(out: Path, key: str) -> None:
    shard = json.loads((out / INDEX).read_text())["weight_map"][key]
    tensors = load_file(out / shard)
    with safe_open(out / shard, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if not k.startswith("gdnfuse.")}
    save_file(tensors, out / shard, metadata=meta)


@pytest.fixture(scope="module")
def clean_output(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    convert(sources["r2-nk4-moe-vl-mtp"], out, layout=Layout.QWEN3_NEXT, tp=2)
    return out


@pytest.mark.parametrize("layer", [1, -1], ids=["decoder", "mtp"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_checker_catches_planted_fault(
    sources: dict[str, Path], clean_output: Path, tmp_path: Path, fault: str, layer: int
) -> None:
    src = sources["r2-nk4-moe-vl-mtp"]
    spec = load_spec(src)
    plant, checker, message = FAULTS[fault]
    out = tmp_path / "out"
    shutil.copytree(clean_output, out)
    args = {
        check_fused_bytes: (src, out, spec, Layout.QWEN3_NEXT, 2),
        check_numerics: (src, out, spec, Layout.QWEN3_NEXT, 2),
        check_keys_and_untouched: (src, out, spec),
        check_index: (out,),
        check_record: (src, out, Layout.QWEN3_NEXT, 2),
        check_side_files: (src, out),
    }[checker]
    checker(*args)  # the clean copy passes ...
    plant(out, gdn_prefixes(spec)[layer])
    with pytest.raises(AssertionError, match=re.escape(message)):
        checker(*args)  # ... and the planted fault is caught


def test_numerics_catch_the_other_layout(sources: dict[str, Path], tmp_path: Path) -> None:
    """tp-blocked bytes checked as qwen3-next (and vice versa) fail both checkers."""
    src = sources["r2-nk4-dense-text"]
    spec = load_spec(src)
    for made, claimed in (
        (Layout.TP_BLOCKED, Layout.QWEN3_NEXT),
        (Layout.QWEN3_NEXT, Layout.TP_BLOCKED),
    ):
        out = convert(src, tmp_path / str(made), layout=made, tp=2).out
        with pytest.raises(AssertionError, match="piece"):
            check_fused_bytes(src, out, spec, claimed, 2)
        with pytest.raises(AssertionError, match="reference|transformers"):
            check_numerics(src, out, spec, claimed, 2)


# 3. The command line.

runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("layout", list(Layout))
def test_cli_convert(sources: dict[str, Path], tmp_path: Path, layout: Layout) -> None:
    src, out = sources["r3-nk4-dense-vl-f64"], tmp_path / "out"
    code, stdout, stderr = cli(
        "convert", src, "--out", out, "--tp", "2", "--layout", layout, "--json"
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["layout"], summary["tp"], summary["gdn_layers"]) == (str(layout), 2, 2)
    check_conversion(src, out, layout, 2)


def test_cli_dry_run_writes_nothing(sources: dict[str, Path], tmp_path: Path) -> None:
    src, out = sources["r1-nk2-dense-text"], tmp_path / "out"
    code, stdout, stderr = cli("convert", src, "--out", out, "--dry-run", "--json")
    assert code == 0, stderr
    assert not out.exists()
    plan = json.loads(stdout)
    planned = {f["name"]: f["size"] for f in plan["files"]}
    expected = {p.name for p in src.iterdir()}  # same shard names, side files, config, index
    assert set(planned) == expected
    assert plan["record"]["layout"] == "qwen3-next"
    # The plan is what a real run writes, byte counts included.
    convert(src, out)
    assert planned == {n: (out / n).stat().st_size for n in planned}
    code, stdout, _ = cli("convert", src, "--out", tmp_path / "o2", "--dry-run")
    assert code == 0 and not (tmp_path / "o2").exists() and "model.safetensors.index.json" in stdout


def test_cli_inspect(sources: dict[str, Path]) -> None:
    code, stdout, stderr = cli("inspect", sources["r2-nk4-moe-vl-mtp"], "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["valid_tp"] == [1, 2, 4]
    assert summary["gdn_layers"] == 3 and summary["model_type"] == "qwen3_5_moe"  # with mtp
    assert summary["dims"] == {"nk": 4, "nv": 8, "dk": 4, "dv": 8, "r": 2, "hidden_size": 32}
    code, stdout, _ = cli("inspect", sources["r4-nk2-moe-text"], "--json")
    assert code == 0 and json.loads(stdout)["valid_tp"] == [1, 2]


def _untouched_shards(src: Path) -> list[str]:
    return [s for s, keys in _keys_by_shard(src).items() if not any(map(SPLIT_KEY.search, keys))]


def test_cli_link_and_copy(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["r2-nk4-moe-vl-mtp"]
    untouched = _untouched_shards(src)
    rewritten = sorted(set(shard_names(src)) - set(untouched))
    assert untouched and rewritten
    for flag, shared in (("--link", True), ("--copy", False)):
        out = tmp_path / flag
        code, _, stderr = cli("convert", src, "--out", out, flag, "--quiet")
        assert code == 0, stderr
        for shard in untouched:
            same = os.stat(src / shard).st_ino == os.stat(out / shard).st_ino
            assert same is shared, (flag, shard)
            assert (out / shard).read_bytes() == (src / shard).read_bytes()
        for shard in rewritten:
            assert os.stat(src / shard).st_ino != os.stat(out / shard).st_ino
        check_conversion(src, out, Layout.QWEN3_NEXT, 1)


def test_cli_refuses_non_empty_out(sources: dict[str, Path], tmp_path: Path) -> None:
    src, out = sources["r1-nk2-dense-text"], tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, stderr = cli("convert", src, "--out", out)
    assert code == 2 and "not empty" in stderr and "--overwrite" in stderr
    code, _, stderr = cli("convert", src, "--out", out, "--resume")
    assert code == 2 and "nothing to resume" in stderr
    code, _, stderr = cli("convert", src, "--out", out, "--overwrite", "--resume")
    assert code == 2 and "exclude" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"], "a refused run wrote files"
    code, _, stderr = cli(
        "convert",
        src,
        "--out",
        out,
        "--overwrite",
        "--layout",
        "tp-blocked",
        "--tp",
        "2",
        "--quiet",
    )
    assert code == 0, stderr
    check_conversion(src, out, Layout.TP_BLOCKED, 2)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_clean_bytes(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    src = sources["r2-nk4-dense-text"]
    clean = convert(src, tmp_path / "clean", layout=Layout.TP_BLOCKED, tp=2).out
    out = tmp_path / "out"
    calls = []

    def stop_midway(n: int) -> None:
        calls.append(n)
        if len(calls) == 6:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        convert(src, out, layout=Layout.TP_BLOCKED, tp=2, workers=1, progress=stop_midway)
    assert not (out / "config.json").exists() and not (out / INDEX).exists()
    code, _, stderr = cli("convert", src, "--out", out, "--layout", "tp-blocked", "--tp", "4")
    assert code == 2 and "not empty" in stderr
    code, _, stderr = cli(
        "convert", src, "--out", out, "--layout", "tp-blocked", "--tp", "4", "--resume"
    )
    assert code == 2 and "--tp 4 but the interrupted run used --tp 2" in stderr
    code, _, stderr = cli(
        "convert", src, "--out", out, "--layout", "tp-blocked", "--tp", "2", "--resume", "--quiet"
    )
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for p in clean.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_cli_bad_tp_lists_valid_values(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["r2-nk4-moe-vl-mtp"]
    for args in (("convert", src, "--out", tmp_path / "out"), ("inspect", src)):
        code, _, stderr = cli(*args, "--tp", "3")
        assert code == 2
        assert "valid values: 1, 2, 4" in stderr
    assert not (tmp_path / "out").exists()
    code, _, stderr = cli("convert", src, "--out", tmp_path / "out", "--tp", "0")
    assert code == 2


def test_cli_refuses_already_fused(
    sources: dict[str, Path], clean_output: Path, tmp_path: Path
) -> None:
    code, _, stderr = cli("convert", clean_output, "--out", tmp_path / "again")
    assert code == 2 and "already fused" in stderr and "verify" in stderr
    assert "in_proj_qkvz" in stderr or "in_proj_ba" in stderr
    assert not (tmp_path / "again").exists()


NO_TORCH = """
import sys
from gdnfuse.cli import main
from gdnfuse.convert import convert
convert(sys.argv[1], sys.argv[2] + "/api", layout="tp-blocked", tp=2)
sys.argv = ["gdnfuse", "convert", sys.argv[1], "--out", sys.argv[2] + "/cli", "--quiet"]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, f"torch imported: {loaded[:3]}"
print("ok")
"""


PLANTED_TORCH = "import sys, types; sys.modules['torch'] = types.ModuleType('torch')"
"""A stand-in for an accidental ``import torch`` (cheaper than importing the real one)."""


@pytest.mark.parametrize("prelude", ["", PLANTED_TORCH], ids=["convert", "planted-torch"])
def test_convert_never_imports_torch(
    sources: dict[str, Path], tmp_path: Path, prelude: str
) -> None:
    code = prelude + "\n" + NO_TORCH
    proc = subprocess.run(
        [sys.executable, "-c", code, str(sources["r1-nk2-dense-text"]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if prelude:
        assert proc.returncode != 0 and "torch imported" in proc.stderr
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
        assert (tmp_path / "api" / INDEX).is_file() and (tmp_path / "cli" / INDEX).is_file()
