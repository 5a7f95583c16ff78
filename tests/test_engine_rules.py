"""The engine rules (gdnfuse.engines), checked as data: what --engine writes, what the
verdicts say, the stamp, and the README table. The real engines judge the same outputs in
test_engine_*.py."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from tiny_models import build_checkpoint

from gdnfuse import engines, loaders
from gdnfuse.arch import Arch
from gdnfuse.convert import convert
from gdnfuse.engines import ENGINES, GROUPED, PLAIN, Facts, Outcome, Rows, same_rows
from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import GdnDims, Layout

README = Path(__file__).resolve().parent.parent / "README.md"
OPTS: dict[str, Any] = {"workers": 1}


@pytest.mark.parametrize(("nk", "r"), list(itertools.product([1, 2, 4], [1, 2, 3, 4])))
def test_same_rows_only_where_layouts_coincide(nk: int, r: int) -> None:
    dims = GdnDims(nk, nk * r, 8, 4)
    assert same_rows(dims, GROUPED, Rows(Layout.TP_BLOCKED, nk))  # nk / T == 1
    assert same_rows(dims, GROUPED, PLAIN) == (nk == 1)
    if nk > 1:
        assert not same_rows(dims, PLAIN, Rows(Layout.TP_BLOCKED, 2))


@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("r", [1, 2, 3, 4])
@pytest.mark.parametrize("nk", [1, 2, 4])
def test_engine_outputs_load_in_their_engine_and_no_engine_misreads_them(
    moe: bool, r: int, nk: int
) -> None:
    """What --engine E writes, E loads and no engine misreads; a refusal says what to do
    instead; stamped outputs are refused by every engine."""
    src = Facts("qwen3_5", False, None, moe, GdnDims(nk, nk * r, 8, 8))
    for spec in ENGINES:
        try:
            target = engines.choose(spec, src)
        except GdnfuseError as e:
            assert not moe and spec.refuse_hint in str(e), (spec.name, e)
            continue
        out = engines.target_facts(target, src)
        assert spec.judge(out).outcome is Outcome.LOADS, spec.name
        assert engines.misreaders(out) == [], (spec.name, target)
    stamped = Facts(engines.STAMP_MODEL_TYPE, True, GROUPED, moe, src.dims)
    assert {v.outcome for v in engines.judge_all(stamped).values()} == {Outcome.REFUSES}


def test_sglang_gets_qwen3_next_names_and_dense_is_refused() -> None:
    """sglang's qwen3_5.py reads plain [Q;K;V;Z] rows, but transformers and TensorRT-LLM
    would load that output misread; its qwen3_next.py reads grouped rows, which nobody
    misreads, and builds MoE models only."""
    dims = GdnDims(4, 8, 8, 8)
    spec = engines.engine("sglang")
    moe = engines.choose(spec, Facts("qwen3_5", False, None, True, dims))
    assert (moe.arch, moe.rows) == (Arch.QWEN3_NEXT, GROUPED)
    with pytest.raises(GdnfuseError) as e:
        engines.choose(spec, Facts("qwen3_5", False, None, False, dims))
    msg = str(e.value)
    assert "TensorRT-LLM, transformers would load it misread" in msg and "\n" not in msg
    assert "fuses the split projections at load" in msg


def test_an_output_some_engine_misreads_is_refused() -> None:
    """choose checks every engine, not only the one asked for: a spec listing an output
    that sglang and transformers misread (Qwen3.5 names, grouped rows) is refused."""
    dims = GdnDims(4, 8, 8, 8)
    trt = engines.engine("trtllm")
    planted = replace(trt, outputs=(engines.Target(Arch.QWEN3_5, GROUPED),))
    src = Facts("qwen3_5", False, None, True, dims)
    assert trt.judge(engines.target_facts(planted.outputs[0], src)).outcome is Outcome.LOADS
    with pytest.raises(GdnfuseError, match="sglang, transformers would load it misread"):
        engines.choose(planted, src)


def test_known_misreads_are_what_the_issue_measured() -> None:
    """The silent failures the engines were seen to make (issue 12's table)."""
    dims = GdnDims(4, 8, 8, 8)
    grouped = engines.judge_all(Facts("qwen3_5", True, GROUPED, True, dims))
    plain = engines.judge_all(Facts("qwen3_5", True, PLAIN, True, dims))
    assert grouped["sglang"].outcome is Outcome.MISREADS
    assert grouped["vllm"].outcome is Outcome.REFUSES and grouped["trtllm"].outcome is Outcome.LOADS
    assert plain["trtllm"].outcome is Outcome.MISREADS and plain["sglang"].outcome is Outcome.LOADS
    unrecorded = engines.judge_all(Facts("qwen3_5", True, None, True, dims))
    assert unrecorded["sglang"].outcome is Outcome.UNKNOWN


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next"])
def test_planted_rule_fault_is_caught(family: str) -> None:
    """A spec that expected the other rows would misread: judge must say so, not 'loads'."""
    spec = engines.engine("sglang")
    dims = GdnDims(4, 8, 8, 8)
    for rows in (GROUPED, PLAIN):
        out = Facts(family, True, rows, True, dims)
        right = spec.judge(out).outcome is Outcome.LOADS
        other = PLAIN if spec.families[family].fused_rows == GROUPED else GROUPED
        rule = replace(spec.families[family], fused_rows=other)
        wrong = replace(spec, families={**spec.families, family: rule})
        assert wrong.judge(out).outcome is (Outcome.MISREADS if right else Outcome.LOADS)


def test_fp8_ignore_names_match_every_engine() -> None:
    dims = GdnDims(4, 8, 128, 128)
    fused_only = Facts("qwen3_5", True, PLAIN, True, dims, frozenset({"fused"}))
    assert engines.engine("sglang").judge(fused_only).outcome is Outcome.REFUSES
    both = replace(fused_only, fp8_ignore=frozenset({"split", "fused"}))
    assert engines.engine("sglang").judge(both).outcome is Outcome.LOADS


def test_readme_table_is_generated_from_the_rules() -> None:
    table = engines.markdown_table(engines.readme_rows(GdnDims(4, 8, 64, 64)))
    assert table in README.read_text(), "README engine table is stale; regenerate it:\n" + table


def test_unknown_engine_and_contradicting_options(tmp_path: Path) -> None:
    src = build_checkpoint(tmp_path / "src", r=2, moe=True)
    with pytest.raises(GdnfuseError, match="unknown engine 'vlm'; choose one of vllm"):
        convert(src, tmp_path / "a", engine="vlm", **OPTS)
    with pytest.raises(GdnfuseError, match="contradicts"):
        convert(src, tmp_path / "b", engine="vllm", layout="tp-blocked", **OPTS)
    with pytest.raises(GdnfuseError, match="contradicts"):
        convert(src, tmp_path / "c", engine="vllm", arch=Arch.QWEN3_5, **OPTS)
    # Qwen3.5 names with grouped rows: TensorRT-LLM reads them right, sglang would not.
    with pytest.raises(GdnfuseError, match="sglang, transformers would load it misread"):
        convert(src, tmp_path / "d", engine="trtllm", arch="qwen3.5", tp=2, **OPTS)
    assert not any((tmp_path / d).exists() for d in "abcd")
    out = convert(src, tmp_path / "t", engine="sglang", tp=2, **OPTS).out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_next" and config["gdnfuse"]["layout"] == "qwen3-next"
    assert config["gdnfuse"]["engine"]["name"] == "sglang"
    verdicts = loaders.verdicts(out)
    assert verdicts["sglang"].outcome is Outcome.LOADS
    assert Outcome.MISREADS not in {v.outcome for v in verdicts.values()}


@pytest.mark.parametrize(("kw", "stamped"), [
    ({}, True), ({"layout": "tp-blocked", "tp": 2}, True), ({"layout": "tp-blocked"}, True),
    ({"arch": "qwen3-next"}, False), ({"arch": "qwen3-next", "tp": 2}, False),
])  # fmt: skip
def test_without_engine_stamped_exactly_when_some_engine_would_misread(
    tmp_path: Path, kw: dict, stamped: bool
) -> None:
    src = build_checkpoint(tmp_path / "src", r=2, moe=True)
    out = convert(src, tmp_path / "out", **OPTS, **kw).out
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"] == engines.STAMP_MODEL_TYPE) is stamped
    verdicts = loaders.verdicts(out).values()
    assert Outcome.MISREADS not in {v.outcome for v in verdicts}


def test_every_shard_says_format_pt(tmp_path: Path) -> None:
    """A source shard without __metadata__ (or without format) gets format: pt too, even
    when it holds no GDN tensor (its header is rewritten, its data copied whole)."""
    from safetensors.torch import load_file, save_file

    src = build_checkpoint(tmp_path / "src", r=2, moe=True, shard_size="20KB")
    for shard in sorted(src.glob("*.safetensors")):
        save_file(load_file(shard), shard)  # no metadata at all
    for kw in ({}, {"engine": "sglang"}, {"engine": "vllm"}):
        out = convert(src, tmp_path / f"out-{len(kw)}-{kw.get('engine')}", **OPTS, **kw).out
        shards = sorted(out.glob("*.safetensors"))
        assert len(shards) > 2
        for shard in shards:
            with safe_open(shard, "pt") as f:
                assert (f.metadata() or {}).get("format") == "pt", shard.name


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next"])
@pytest.mark.parametrize("forms", [{"split"}, {"fused"}, {"split", "fused"}])
def test_fp8_ignore_lists_are_matched_per_family(family: str, forms: set[str]) -> None:
    """vLLM and sglang map in_proj_ba to its split shards in their Qwen3.5 classes only; their
    Qwen3-Next classes match the fused name (packed_modules_mapping; sglang's real loader runs
    these cases in test_engine_sglang_fp8.py). So an FP8 Qwen3-Next checkpoint that
    lists only in_proj_b/in_proj_a is refused (block-size error) and one listing in_proj_ba
    loads; the reverse for Qwen3.5 names; gdnfuse writes both forms."""
    from gdnfuse.engines import GROUPED, PLAIN, Facts, judge_all

    rows = GROUPED if family == "qwen3_next" else PLAIN
    verdicts = judge_all(Facts(family, True, rows, True, GdnDims(4, 8, 8, 8), frozenset(forms)))
    wanted = "fused" if family == "qwen3_next" else "split"
    for engine in ("vllm", "sglang"):
        if engine == "vllm" and family == "qwen3_5":
            continue  # vLLM refuses fused Qwen3.5 names whatever the list says
        outcome = verdicts[engine].outcome
        assert (outcome is Outcome.LOADS) == (wanted in forms), (engine, outcome, verdicts[engine])
