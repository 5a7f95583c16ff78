"""sglang's own loader (0.5.23, CPU, in .venv-engines) loads gdnfuse outputs: run, not read.

Every ``--engine sglang`` output must load into exactly the per-rank parameters sglang
loads from the split source, at TP 1 and 2 (nk / T = 2); the other gdnfuse outputs that
keep Qwen3.5 names must be refused (the stamp), never loaded different; and a source with
two value heads swapped must load different parameters (the negative control). Equal
parameters on every rank imply an equal forward (sglang's CPU forward itself needs
sgl_kernel, which has no CPU build: loading only, and its stand-ins must never be called).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_models import build, engine_python, swap_value_heads

from gdnfuse import loaders
from gdnfuse.convert import convert
from gdnfuse.engines import Outcome, run
from gdnfuse.executor import ExecuteOptions
from gdnfuse.layout import Layout

OPTS = ExecuteOptions(workers=1)


def _equal(ranks: list[dict], tp: int) -> None:
    assert len(ranks) == tp, ranks
    for r in ranks:
        assert "error" not in r and "refused" not in r and "a_refused" not in r, r
        assert r["params"] > 0 and not r["only_a"] and not r["only_b"], r
        assert r["different"] == {}, r["different"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sglang-moe")
    src = build(root / "src", moe=True, r=2)
    return {
        "src": src,
        "sglang": convert(src, root / "sglang", engine="sglang", tp=2, options=OPTS).out,
        "default": convert(src, root / "default", tp=2, options=OPTS).out,
    }


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_sglang_output_loads_the_source_parameters(moe: dict[str, Path], tp: int) -> None:
    _equal(run.sglang_compare(moe["src"], moe["sglang"], tp=tp, python=engine_python()), tp)
    assert loaders.verdicts(moe["sglang"])["sglang"].outcome is Outcome.LOADS


def test_default_output_is_refused(moe: dict[str, Path]) -> None:
    ranks = run.sglang_compare(moe["src"], moe["default"], tp=1, python=engine_python())
    assert "gdnfuse_fused" in ranks[0]["refused"], ranks
    assert loaders.verdicts(moe["default"])["sglang"].outcome is Outcome.REFUSES


def test_dense_r3_tp2_and_controls(tmp_path: Path) -> None:
    """Dense, r = 3: the sglang output at TP 2; a dense --arch qwen3-next and a tp-blocked
    T=2 output are refused; the swapped-heads source loads different parameters."""
    src = build(tmp_path / "src", moe=False, r=3)
    out = convert(src, tmp_path / "sglang", engine="sglang", tp=2, options=OPTS).out
    _equal(run.sglang_compare(src, out, tp=2, python=engine_python()), 2)
    arch = convert(src, tmp_path / "arch", arch="qwen3-next", options=OPTS).out
    tpb = convert(src, tmp_path / "tpb", layout=Layout.TP_BLOCKED, tp=2, options=OPTS).out
    for path in (arch, tpb):
        ranks = run.sglang_compare(src, path, tp=1, python=engine_python())
        assert "refused" in ranks[0], (path.name, ranks)
        assert loaders.verdicts(path)["sglang"].outcome is Outcome.REFUSES, path.name
    bad = swap_value_heads(src, tmp_path / "swapped")
    ranks = run.sglang_compare(src, bad, tp=1, python=engine_python())
    assert any("in_proj_qkvz" in name for name in ranks[0]["different"]), ranks
