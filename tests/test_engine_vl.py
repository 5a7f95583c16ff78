"""Released-style Qwen3.5 vision-language sources in every engine gdnfuse runs (issue 19).

Released Qwen3.5 checkpoints are ``Qwen3_5(Moe)ForConditionalGeneration``: a vision tower,
the language model under ``model.language_model.``, MTP weights, RoPE base 1e7 with
interleaved MRoPE (:func:`engine_models.build_vl` makes tiny ones with transformers' own
classes). gdnfuse's ``--engine`` outputs are text-only ``Qwen3NextForCausalLM``. Here each
engine loads such sources (vLLM at TP 1 and 2, served text only; sglang's loader at TP 1
and 2; transformers 5.x and 4.x; mlx-lm) and the engine checks compare what the engine
computes from the output with what it computes from the source, so that an output whose
config alone is wrong (RoPE base 10,000: :func:`engine_models.plant_rope_base`) FAILS every
engine check, and a right one passes.

Engine starts are slow (vLLM 15-40 s per model on 2 cores), so each engine runs once per TP
size on every model of the module (module-scoped results); the verdicts of
:func:`gdnfuse.verify.engine.check_engine` are then taken on those results, and each check
also runs end to end at least once.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from engine_models import (
    build,
    build_vl,
    engine_python,
    fp8_copy,
    plant_rope_base,
    text_only_output,
)
from engine_models import tf4_python as tf4
from typer.testing import CliRunner

from gdnfuse.cli import app
from gdnfuse.convert import convert
from gdnfuse.engines import run
from gdnfuse.errors import GdnfuseError, SetupError
from gdnfuse.verify.engine import check_engine

OPTS: dict = {"workers": 1}  # one writer: the tests run on 2 cores
ENGINES = ("vllm", "sglang", "mlx", "transformers")


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sources ``moe`` (r = 2) and ``dense`` (r = 3); per engine E its text-only output
    ``moe-E`` / ``dense-E`` (dense: only where gdnfuse writes one) and ``...-rope``, the same
    with RoPE base 10,000 planted in config.json."""
    root = tmp_path_factory.mktemp("vl")
    made = {"moe": build_vl(root / "moe", moe=True, r=2),
            "dense": build_vl(root / "dense", moe=False, r=3, seed=1)}  # fmt: skip
    for kind in ("moe", "dense"):
        for engine in ENGINES:
            if kind == "dense" and engine != "transformers":
                with pytest.raises(GdnfuseError, match="dense"):
                    text_only_output(made[kind], root / "x", engine=engine, **OPTS)
                continue
            out = text_only_output(made[kind], root / f"{kind}-{engine}", engine=engine, tp=2,
                                   **OPTS)  # fmt: skip
            config = json.loads((out / "config.json").read_text())
            assert config["model_type"] == "qwen3_next", config
            assert config["rope_parameters"]["rope_theta"] == 1e7, config
            made[f"{kind}-{engine}"] = out
            rope = root / f"{kind}-{engine}-rope"
            shutil.copytree(out, rope)
            made[f"{kind}-{engine}-rope"] = plant_rope_base(rope)
    return made


def _prompts(src: Path) -> list[list[int]]:
    """The prompts check_engine uses: >= 32 positions, no image/video placeholder ids."""
    config = json.loads((src / "config.json").read_text())
    avoid = run.special_tokens(config)
    assert avoid == {506, 507, 508, 509}, avoid
    prompts = run.prompts_for(512, avoid=avoid)
    assert min(map(len, prompts)) >= 32 and not avoid & {t for p in prompts for t in p}
    return prompts


def _key(path: Path) -> str:
    return str(path.resolve())


# --- vLLM -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def vllm_runs(request: pytest.FixtureRequest, vl: dict[str, Path]) -> tuple[int, dict]:
    """One vLLM process per TP size: both sources (TP 1), the MoE output and its control."""
    tp = request.param
    names = ["moe", "moe-vllm", "moe-vllm-rope"] + (["dense"] if tp == 1 else [])
    res = run.vllm_generate([vl[n] for n in names], tp=tp, prompts=_prompts(vl["moe"]),
                            python=engine_python())  # fmt: skip
    return tp, {n: res[_key(vl[n])] for n in names}


def test_vllm_serves_vl_sources_text_only_and_checks_the_output(
    vl: dict[str, Path], vllm_runs: tuple[int, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    tp, got = vllm_runs
    for name in ("moe", "dense") if tp == 1 else ("moe",):
        assert "outputs" in got[name], (name, got[name])
        assert got[name]["text_only"] and got[name]["mode"] == "raw_logits"
        assert all(len(o["prompt_logprobs"]) >= 32 for o in got[name]["outputs"])
    cmp = run.compare_generations(got["moe"], got["moe-vllm"])
    assert cmp.same and cmp.positions >= 3 * 32, cmp.detail
    assert cmp.max_logprob_diff <= cmp.limit / 4, cmp  # measured: 1 bf16 ulp (0.0156)
    bad = run.compare_generations(got["moe"], got["moe-vllm-rope"])
    assert not bad.same and "differ" in bad.detail, bad.detail

    def fake(models: list, **kw: Any) -> dict:
        assert kw["tp"] == tp and kw["prompts"] == _prompts(vl["moe"])
        return {_key(Path(m)): got[n] for m in models for n in got if vl[n] == Path(m)}

    monkeypatch.setattr(run, "vllm_generate", fake)
    (ok,) = check_engine(vl["moe-vllm"], vl["moe"], "vllm", tp)
    assert ok.status == "PASS" and ok.name == f"engine.vllm.tp{tp}", ok
    assert "served text only" in ok.detail, ok.detail
    (no,) = check_engine(vl["moe-vllm-rope"], vl["moe"], "vllm", tp)
    assert no.status == "FAIL" and "logits differ" in no.detail, no


def test_vllm_whose_fault(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """vLLM refusing the source cannot judge the output (a setup error, exit 2); refusing the
    output is a failed check quoting vLLM."""
    src, out = tmp_path / "src", tmp_path / "out"
    for refused, want in ((src, SetupError), (out, None)):
        res = {_key(p): ({"refused": "ValueError: no"} if p == refused else {"outputs": []})
               for p in (src, out)}  # fmt: skip
        monkeypatch.setattr(run, "vllm_generate", lambda models, res=res, **kw: res)
        if want is SetupError:
            with pytest.raises(SetupError, match="vLLM cannot load the source here.*no"):
                check_engine(out, src, "vllm", 1)
        else:
            (no,) = check_engine(out, src, "vllm", 1)
            assert no.status == "FAIL" and "refuses to load the output: ValueError" in no.detail


# --- sglang -----------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
def test_sglang_compares_parameters_and_buffers(
    vl: dict[str, Path], tp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    others = [vl["moe-sglang"], vl["moe-sglang-rope"]] + ([vl["dense-transformers"]]
                                                           if tp == 1 else [])  # fmt: skip
    res = run.sglang_compare_many(vl["moe"], others, tp=tp, python=engine_python())
    good, rope = res[_key(vl["moe-sglang"])], res[_key(vl["moe-sglang-rope"])]
    assert len(good) == len(rope) == tp
    for r in good:
        assert "a_refused" not in r and "refused" not in r, r
        assert not r["only_a"] and not r["only_b"] and r["different"] == {}, r
        assert r["source_only_vision"] > 0, r  # sglang's visual.* (not a difference)
        assert r["source_only_mrope"] == ["model.layers.3.rotary_emb.axis_map"], r
        assert r["buffers"] > 0 and r["compared"] > r["params"] - r["source_only_vision"] - 1
    for r in rope:  # the config alone differs: exactly the rotary cache does
        assert list(r["different"]) == ["model.layers.3.rotary_emb.cos_sin_cache"], r
    if tp == 1:  # the dense VL source loads; sglang's Qwen3-Next refuses dense outputs
        dense = run.sglang_compare(vl["dense"], vl["dense-transformers"], tp=1,
                                   python=engine_python())  # fmt: skip
        assert "experts 0" in dense[0]["refused"], dense

    monkeypatch.setattr(run, "sglang_compare", lambda a, b, **kw: res[_key(Path(b))])
    (ok,) = check_engine(vl["moe-sglang"], vl["moe"], "sglang", tp, engine_python())
    assert ok.status == "PASS" and "vision tower" in ok.detail, ok
    (no,) = check_engine(vl["moe-sglang-rope"], vl["moe"], "sglang", tp, engine_python())
    assert no.status == "FAIL" and "cos_sin_cache: max abs difference 2" in no.detail, no


def test_sglang_fp8_source_without_amx_is_a_setup_error(vl: dict[str, Path],
                                                         tmp_path: Path) -> None:  # fmt: skip
    """sglang's CPU FP8 path needs AMX: on a machine without it sglang cannot load an FP8
    source, so it cannot judge an output of it: a setup error (exit 2), not a failed check."""
    src = fp8_copy(vl["dense"], tmp_path / "fp8")
    try:
        (check,) = check_engine(src, src, "sglang", 1, engine_python())
    except SetupError as e:
        assert "sglang cannot load the source here" in str(e) and "AMX" in str(e), e
    else:  # a machine with AMX loads it: then it equals itself
        assert check.status == "PASS", check


# --- transformers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_runs(vl: dict[str, Path]) -> dict[str, dict[str, dict]]:
    """transformers 5.x (this Python) and 4.57 (.venv-tf4) on every VL model of the module."""
    names = [n for n in vl if n in ("moe", "dense") or n.split("-")[1] == "transformers"]
    out = {}
    for label, python in (("5", sys.executable), ("4", tf4())):
        res = run.transformers_logits([vl[n] for n in names], _prompts(vl["moe"]),
                                      python=python)  # fmt: skip
        out[label] = {n: res[_key(vl[n])] for n in names}
    return out


def test_transformers_5_and_4(vl: dict[str, Path], tf_runs: dict) -> None:
    five, four = tf_runs["5"], tf_runs["4"]
    for kind in ("moe", "dense"):
        src = five[kind]
        assert src["cls"] == ("Qwen3_5MoeForCausalLM" if kind == "moe" else
                              "Qwen3_5ForCausalLM"), src  # fmt: skip
        assert not src["missing"] and not src["unexpected"], src  # visual.*, mtp.* ignored
        assert four[kind]["unknown_type"] and "qwen3_5" in four[kind]["refused"], four[kind]
        for version in (five, four):
            out, rope = version[f"{kind}-transformers"], version[f"{kind}-transformers-rope"]
            assert out["cls"] == "Qwen3NextForCausalLM" and not out["missing"], out
            good = run.compare_logits(src["logits"], out["logits"])
            assert good.same, (out["version"], kind, good.detail)
            bad = run.compare_logits(src["logits"], rope["logits"])
            assert not bad.same and bad.relative > 1e-2, (out["version"], kind, bad.detail)


def test_transformers_check(vl: dict[str, Path], tf_runs: dict,
                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Verdicts on the runs above (5.x; 4.x with the source's logits from this Python), then
    once end to end with GDNFUSE_TRANSFORMERS_PYTHON = transformers 4.57."""
    real = run.transformers_logits
    by_python = {sys.executable: tf_runs["5"], tf4(): tf_runs["4"]}

    def fake(models: list, prompts: list, *, python: str) -> dict:
        assert prompts == _prompts(vl["moe"])
        runs = next(v for p, v in by_python.items() if run.same_python(p, python))
        return {_key(Path(m)): runs[n] for m in models for n in runs if vl[n] == Path(m)}

    monkeypatch.setattr(run, "transformers_logits", fake)
    for python in (sys.executable, tf4()):
        for kind in ("moe", "dense"):
            (ok,) = check_engine(vl[f"{kind}-transformers"], vl[kind], "transformers", 1, python)
            assert ok.status == "PASS" and ok.name == "engine.transformers", ok
            (no,) = check_engine(vl[f"{kind}-transformers-rope"], vl[kind], "transformers", 1,
                                 python)  # fmt: skip
            assert no.status == "FAIL" and "of the largest source logit" in no.detail, no
            if python == tf4():
                assert "4.57.6" in ok.detail and "does not know its model type" in ok.detail
    monkeypatch.setattr(run, "transformers_logits", real)
    monkeypatch.setenv("GDNFUSE_TRANSFORMERS_PYTHON", tf4())
    (no,) = check_engine(vl["moe-transformers-rope"], vl["moe"], "transformers", 1,
                         run.engine_python("transformers"))  # fmt: skip
    assert no.status == "FAIL" and "transformers 4.57.6" in no.detail, no


# --- mlx-lm -------------------------------------------------------------------------------


def test_mlx(vl: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """mlx-lm 0.32.2 loads both VL sources (``qwen3_5`` / ``qwen3_5_moe``), the MoE output
    with the source's logits (measured: exactly), not the planted control; its Qwen3-Next
    refuses a dense output (gdnfuse refuses to write one for mlx)."""
    names = ["moe", "moe-mlx", "moe-mlx-rope", "dense", "dense-transformers"]
    res = run.mlx_logits([vl[n] for n in names], _prompts(vl["moe"]), python=engine_python())
    got = {n: res[_key(vl[n])] for n in names}
    assert got["moe"]["cls"].endswith("qwen3_5_moe.Model"), got["moe"]
    assert got["dense"]["cls"].endswith("qwen3_5.Model"), got["dense"]
    assert got["moe-mlx"]["cls"].endswith("qwen3_next.Model"), got["moe-mlx"]
    assert run.compare_logits(got["moe"]["logits"], got["moe-mlx"]["logits"]).same
    assert not run.compare_logits(got["moe"]["logits"], got["moe-mlx-rope"]["logits"]).same
    assert "refused" in got["dense-transformers"], got["dense-transformers"]

    def fake(models: list, prompts: list, *, python: str) -> dict:
        return {_key(Path(m)): got[n] for m in models for n in got if vl[n] == Path(m)}

    monkeypatch.setattr(run, "mlx_logits", fake)
    (ok,) = check_engine(vl["moe-mlx"], vl["moe"], "mlx", 1, engine_python())
    assert ok.status == "PASS" and "max |logit difference| 0," in ok.detail, ok
    (no,) = check_engine(vl["moe-mlx-rope"], vl["moe"], "mlx", 1, engine_python())
    assert no.status == "FAIL", no
    (no,) = check_engine(vl["dense-transformers"], vl["dense"], "mlx", 1, engine_python())
    assert no.status == "FAIL" and "refuses to load the output" in no.detail, no


def test_verify_cli_mlx_source_it_cannot_load_exits_2(tmp_path: Path) -> None:
    """End to end: mlx-lm 0.32.2 knows no ``qwen3_5_moe_text`` (text-only Qwen3.5), so it
    cannot judge an output of such a source: exit 2 and one line, not a failed check."""
    src = build(tmp_path / "src", moe=True, r=2)
    out = convert(src, tmp_path / "out", engine="mlx", **OPTS).out
    args = ["verify", str(out), "--against", str(src), "--engine", "mlx", "--no-numeric"]
    res = CliRunner().invoke(app, args, env={"GDNFUSE_MLX_PYTHON": engine_python()})
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlx-lm cannot load the source here" in lines[0], res.stderr
    assert "qwen3_5_moe_text not supported" in lines[0], lines


def test_engine_python_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """GDNFUSE_<ENGINE>_PYTHON over GDNFUSE_ENGINE_PYTHON; for transformers / mlx-lm a
    chosen Python without the module falls back to this one when it has it."""
    monkeypatch.delenv("GDNFUSE_TRANSFORMERS_PYTHON", raising=False)
    monkeypatch.setenv("GDNFUSE_ENGINE_PYTHON", engine_python())
    assert run.engine_python("vllm") == engine_python()
    assert run.engine_python("transformers") == engine_python()  # it has transformers too
    monkeypatch.setenv("GDNFUSE_TRANSFORMERS_PYTHON", tf4())
    assert run.engine_python("transformers") == tf4()
    assert run.engine_python("transformers", python=engine_python()) == engine_python()
    monkeypatch.setenv("GDNFUSE_TRANSFORMERS_PYTHON", tf4())
    monkeypatch.setenv("GDNFUSE_MLX_PYTHON", tf4())  # no mlx-lm there, none here: as chosen
    assert run.engine_python("mlx") == tf4()
    monkeypatch.setenv("GDNFUSE_VLLM_PYTHON", str(tmp_path / "missing"))
    with pytest.raises(SetupError, match="GDNFUSE_VLLM_PYTHON"):
        run.engine_python("vllm")
    assert run.python_variable("llama.cpp") == "GDNFUSE_LLAMA_CPP_PYTHON"

