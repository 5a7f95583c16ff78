"""FP8 ignore lists against sglang 0.5.23's real loader, per model family (issue 20).

gdnfuse's rule (gdnfuse/engines/sglang.py): sglang's Qwen3.5 class matches FP8 ignore lists
by the split names in_proj_b/in_proj_a (its packed_modules_mapping maps in_proj_ba to them),
its Qwen3-Next class by the fused name in_proj_ba only. A checkpoint whose list lacks the
form its class matches gets the bf16 in_proj_ba quantized, and the block size check raises
at model construction. Here every (family, form) runs through sglang's own model
construction, ignore-list matching and weight loading at TP 2, FP8 weights and scales are
compared per rank with the split source's, and sglang's outcome must be gdnfuse's verdict.

sglang's CPU FP8 path asserts AMX support (absent here) only after loading, when it repacks
the weights for its AMX kernels: the harness's ``fp8_loader_only`` skips exactly that step
(harness/sglang_params.py says why the rule under test runs before it).

The source is released-shaped (``Qwen3_5MoeForConditionalGeneration``: vision tower, MTP,
RoPE base 1e7 with an M-RoPE section, per-expert FP8 experts as the FP8 release stores them).
Engine-sized, FP8-able at TP 2 with 128 x 128 blocks: ``dk = dv = 128`` (each key head's q
and k rows are whole blocks, so the grouped fused rows are a block permutation), ``nk = 4``,
``r = 2``; every quantized weight has a multiple of 128 rows and columns per rank; in_proj_b/a
(8 rows), the routers, norms, conv1d, embeddings and the head stay bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_models import build_vl, engine_python, fp8_copy, plant_rows, unstamped
from safetensors.torch import load_file, save_file

from gdnfuse import loaders
from gdnfuse.convert import convert
from gdnfuse.engines import Outcome, run
from gdnfuse.layout import Layout

NK, R, DK, DV, BLOCK = 4, 2, 128, 128, 128
FORMS = {"split": ("in_proj_b", "in_proj_a"), "fused": ("in_proj_ba",),
         "both": ("in_proj_b", "in_proj_a", "in_proj_ba")}  # fmt: skip
OPTS: dict = {"workers": 1}


def _bf16_source(path: Path) -> Path:
    """A released-style Qwen3.5 MoE VL source (vision tower, MTP, RoPE base 1e7, M-RoPE; per
    expert experts, as the FP8 release stores them) whose linears are FP8-able at TP 2."""
    return build_vl(path, moe=True, r=R, head_dim=DK, dk=DK, moe_intermediate=256,
                    stacked_experts=False)  # fmt: skip


def _ignore(layers: int, linear: list[int], form: str) -> list[str]:
    """A released-style modules_to_not_convert: per-layer names, in_proj_b/a in ``form``."""
    out = ["lm_head", "model.language_model.embed_tokens", "model.language_model.norm",
           "model.visual", "mtp.fc", "mtp.norm", "mtp.pre_fc_norm_embedding",
           "mtp.pre_fc_norm_hidden"]  # fmt: skip
    for i in range(layers):
        p = f"model.language_model.layers.{i}."
        out += [p + "input_layernorm", p + "post_attention_layernorm", p + "mlp.gate",
                p + "mlp.shared_expert_gate"]  # fmt: skip
        if i in linear:
            la = p + "linear_attn."
            out += [la + m for m in ("A_log", "conv1d", "dt_bias", "norm", *FORMS[form])]
        else:
            out += [p + "self_attn.q_norm", p + "self_attn.k_norm"]
    return out


def quantize(src: Path, dst: Path) -> Path:
    """FP8 copy of ``src`` (:func:`engine_models.fp8_copy`, 128 x 128 blocks) with a
    released-style per-layer ignore list in the split form, as Qwen3.5-FP8 lists it."""

    def ignore(config: dict) -> list[str]:
        text = config["text_config"]
        linear = [i for i, k in enumerate(text["layer_types"]) if k == "linear_attention"]
        return _ignore(text["num_hidden_layers"], linear, "split")

    return fp8_copy(src, dst, BLOCK, ignore)


def with_form(src: Path, dst: Path, form: str) -> Path:
    """A copy of ``src`` whose ignore lists name in_proj_b/a only in ``form``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    q = config["quantization_config"]
    kept = [n for n in q["modules_to_not_convert"]
            if not n.rsplit(".", 1)[-1].startswith("in_proj_")]  # fmt: skip
    layers = sorted({n.split(".linear_attn.")[0] for n in q["modules_to_not_convert"]
                     if ".linear_attn." in n})  # fmt: skip
    q["modules_to_not_convert"] = kept + [f"{p}.linear_attn.{m}" for p in layers
                                          for m in FORMS[form]]  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def swap_scale_blocks(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with layer 0's first two in_proj_qkvz scale blocks swapped (head 0's
    q and k blocks; on rank 0 at TP 2), weights untouched: a fault only the scales show."""
    shutil.copytree(src, dst)
    name = "model.layers.0.linear_attn.in_proj_qkvz.weight_scale_inv"
    shard = dst / json.loads((dst / "model.safetensors.index.json").read_text())[
        "weight_map"][name]  # fmt: skip
    tensors = load_file(shard)
    s = tensors[name].clone()
    assert not torch.equal(s[0], s[1])
    s[[0, 1]] = s[[1, 0]]
    tensors[name] = s
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


FAMILIES = ("qwen3_5 split", "qwen3_5 fused", "qwen3_next")
"""The split FP8 source (Qwen3.5 names); its Qwen3.5-named fused output with plain rows
(what sglang's Qwen3.5 class reads; gdnfuse writes it only stamped, here unstamped); its
``--engine sglang`` output (Qwen3-Next names, grouped rows)."""
FAMILY_OF = {"qwen3_5 split": "qwen3_5", "qwen3_5 fused": "qwen3_5", "qwen3_next": "qwen3_next"}
TP = 2


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every (family, form) and the controls, loaded by sglang at TP 2 in one harness run."""
    root = tmp_path_factory.mktemp("sglang-fp8")
    src = quantize(_bf16_source(root / "bf16"), root / "src")
    nxt = convert(src, root / "next", engine="sglang", text_only=True, **OPTS).out
    plain = convert(src, root / "plain", layout=Layout.TP_BLOCKED, tp=1, **OPTS).out
    bases = {"qwen3_5 split": src, "qwen3_5 fused": unstamped(plain, root / "q35-fused"),
             "qwen3_next": nxt}  # fmt: skip
    paths = {(fam, form): with_form(bases[fam], root / f"{fam.replace(' ', '-')}-{form}", form)
             for fam in FAMILIES for form in FORMS}  # fmt: skip
    # plant_rows swaps every ".in_proj_" tensor: FP8 weights and their scales alike
    controls = {"planted_rows": plant_rows(nxt, plain, root / "planted-rows"),
                "swapped_scales": swap_scale_blocks(nxt, root / "swapped-scales")}  # fmt: skip
    every = [*paths.values(), *controls.values()]
    ranks = run.sglang_compare_many(src, every, tp=TP, python=engine_python(),
                                    fp8_loader_only=True)  # fmt: skip
    return {"src": src, "next": nxt, "paths": paths, "controls": controls,
            "ranks": {p: ranks[str(p.resolve())] for p in every}}  # fmt: skip


def test_gdnfuse_output_lists_both_forms(loaded: dict) -> None:
    config = json.loads((loaded["next"] / "config.json").read_text())
    names = config["quantization_config"]["modules_to_not_convert"]
    for i in range(3):
        la = f"model.layers.{i}.linear_attn."
        assert {la + "in_proj_b", la + "in_proj_a", la + "in_proj_ba"} <= set(names), names
    assert config["model_type"] == "qwen3_next"


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("family", FAMILIES)
def test_sglang_outcome_is_gdnfuse_verdict(loaded: dict, family: str, form: str) -> None:
    """sglang loads exactly the source's parameters (raw FP8 weights, per-row block scales
    in forward-read order, bf16 in_proj_ba, every buffer) on every rank, or raises at model
    construction; gdnfuse's verdict says which."""
    path = loaded["paths"][family, form]
    verdict = loaders.verdicts(path)["sglang"]
    ranks = loaded["ranks"][path]
    assert len(ranks) == TP, ranks
    refused = [r.get("refused") for r in ranks]
    if all(refused):
        got = Outcome.REFUSES
        for why in refused:  # sglang quantized the bf16 in_proj_ba: [nv, nv] / TP = 4 rows
            assert "output_partition_size = 4 is not divisible" in why, why
    else:
        got = Outcome.LOADS
        for r in ranks:
            assert "error" not in r and "refused" not in r and "a_refused" not in r, r
            assert r["fp8_bypassed"] > 0, r  # FP8 methods were built and loaded
            assert r["params"] > 0 and not r["only_a"] and not r["only_b"], r
            assert r["different"] == {}, r["different"]
    assert got is verdict.outcome, (family, form, ranks, verdict)
    wanted = "fused" if FAMILY_OF[family] == "qwen3_next" else "split"
    assert (got is Outcome.LOADS) == (form in (wanted, "both")), (family, form, got)


def test_controls_load_different_fp8_parameters(loaded: dict) -> None:
    """The comparison sees FP8 faults: plain rows under Qwen3-Next names differ in weights
    and scales on every rank; two swapped scale blocks (rank 0's rows) differ there only."""
    for r in loaded["ranks"][loaded["controls"]["planted_rows"]]:
        assert "refused" not in r, r
        assert any(n.endswith("in_proj_qkvz.weight") for n in r["different"]), r
        assert any(n.endswith("in_proj_qkvz.weight_scale_inv") for n in r["different"]), r
    rank0, rank1 = loaded["ranks"][loaded["controls"]["swapped_scales"]]
    assert list(rank0["different"]) == [
        "model.layers.0.linear_attn.in_proj_qkvz.weight_scale_inv"], rank0  # fmt: skip
    assert rank1["different"] == {}, rank1
