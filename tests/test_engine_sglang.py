"""sglang's own loader (0.5.23, CPU, in .venv-engines) loads gdnfuse outputs: run, not read.

Every ``--engine sglang`` output (MoE: ``--arch qwen3-next``) must load into the per-rank
parameters sglang loads from the split source, at TP 1 and 2 (nk / T = 2), with the fused
rows compared in the order each model's forward reads them (the harness applies the
module's own ``fix_query_key_value_ordering``); the other gdnfuse outputs must be refused
(the stamp), never loaded different; dense ``--engine sglang`` is refused by gdnfuse; and
the negative controls must load different parameters: a Qwen3-Next checkpoint with plain
rows (what a converter that ignored the grouping would write) and a source with two value
heads swapped. sglang's CPU forward itself needs sgl_kernel, which has no CPU build: loading
only, and its import-time stand-ins must never be called.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_models import build, engine_python, plant_rows, swap_value_heads, unstamped

from gdnfuse import loaders
from gdnfuse.convert import convert
from gdnfuse.engines import Outcome, run
from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import Layout

OPTS: dict = {"workers": 1}  # one writer: the tests run on 2 cores


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
    made = {
        "src": src,
        "sglang": convert(src, root / "sglang", engine="sglang", tp=2, **OPTS).out,
        "default": convert(src, root / "default", tp=2, **OPTS).out,
        "plain": convert(src, root / "plain", layout=Layout.TP_BLOCKED, **OPTS).out,
    }
    made["planted"] = plant_rows(made["sglang"], made["plain"], root / "planted")
    return made


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_sglang_output_loads_the_source_parameters(moe: dict[str, Path], tp: int) -> None:
    _equal(run.sglang_compare(moe["src"], moe["sglang"], tp=tp, python=engine_python()), tp)
    assert loaders.verdicts(moe["sglang"])["sglang"].outcome is Outcome.LOADS


def test_stamped_refused_and_planted_rows_differ(moe: dict[str, Path]) -> None:
    ranks = run.sglang_compare(moe["src"], moe["default"], tp=1, python=engine_python())
    assert "gdnfuse_fused" in ranks[0]["refused"], ranks
    assert loaders.verdicts(moe["default"])["sglang"].outcome is Outcome.REFUSES
    # Negative control: Qwen3-Next names, plain rows. sglang loads it, every rank different.
    ranks = run.sglang_compare(moe["src"], moe["planted"], tp=2, python=engine_python())
    for r in ranks:
        assert "refused" not in r and any("in_proj_qkvz" in n for n in r["different"]), r
        assert any("in_proj_ba" in n for n in r["different"]), r


def test_dense_r3_refused_with_tp2_plain_rows_and_controls(tmp_path: Path) -> None:
    """Dense, r = 3: gdnfuse refuses --engine sglang; the Qwen3.5-named plain-rows layout it
    refuses to write (transformers would misread it) is what sglang reads right, at TP 2;
    a dense --arch qwen3-next and a stamped tp-blocked T=2 output are refused by sglang; the
    swapped-heads source loads different parameters."""
    src = build(tmp_path / "src", moe=False, r=3)
    with pytest.raises(GdnfuseError, match="serve the source"):
        convert(src, tmp_path / "x", engine="sglang", tp=2, **OPTS)
    assert not (tmp_path / "x").exists()
    plain = convert(src, tmp_path / "plain", layout=Layout.TP_BLOCKED, **OPTS).out
    never = unstamped(plain, tmp_path / "never-written")
    _equal(run.sglang_compare(src, never, tp=2, python=engine_python()), 2)
    assert loaders.verdicts(never)["sglang"].outcome is Outcome.LOADS
    assert loaders.verdicts(never)["transformers"].outcome is Outcome.MISREADS
    arch = convert(src, tmp_path / "arch", arch="qwen3-next", **OPTS).out
    tpb = convert(src, tmp_path / "tpb", layout=Layout.TP_BLOCKED, tp=2, **OPTS).out
    for path in (arch, tpb):
        ranks = run.sglang_compare(src, path, tp=1, python=engine_python())
        assert "refused" in ranks[0], (path.name, ranks)
        assert loaders.verdicts(path)["sglang"].outcome is Outcome.REFUSES, path.name
    bad = swap_value_heads(src, tmp_path / "swapped")
    ranks = run.sglang_compare(src, bad, tp=1, python=engine_python())
    assert any("in_proj_qkvz" in name for name in ranks[0]["different"]), ranks
