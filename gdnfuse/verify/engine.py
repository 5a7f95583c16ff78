"""Check 4 of `gdnfuse verify`, with --engine: the real engine computes from the output what
it computes from the source.

The other checks prove the bytes and the layout; this one proves what users run, and so
also the parts of the output the bytes do not cover: its config.json (a RoPE base of 10,000
where the source says 1e7 loads fine and computes something else). Per engine:

- ``vllm``: load the source and the output, run fixed token prompts of at least
  :data:`~gdnfuse.engines.run.PROMPT_LENGTH` positions, greedy-generate, and require the
  same greedy tokens and the same top-k logits at every prompt position and step
  (:func:`gdnfuse.engines.run.compare_generations`). A vision-language source is served text
  only.
- ``sglang`` (loading only on CPU): every rank's parameters *and buffers* (rotary
  ``cos_sin_cache``, derived norm weights) from the output equal those from the source,
  fused GDN rows compared in the order each model's forward reads them; the vision tower
  only the source has is counted, not failed.
- ``transformers``, ``mlx``: full float32 logits of every prompt position, output vs source,
  within :data:`LOGITS_TOLERANCE` of the largest source logit.

Whose fault: an engine that cannot load the *source* here (the machine, the engine build,
an engine version that does not know the model type and no other Python here that does)
cannot judge the output: :class:`~gdnfuse.errors.SetupError` (exit 2), never a failed check.
An engine that refuses the *output*, or computes something else from it, fails the check
(exit 1), quoting the engine.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gdnfuse.checkpoint import CONFIG_NAME
from gdnfuse.engines import run
from gdnfuse.errors import SetupError
from gdnfuse.verify.report import CheckResult, failed, passed

LOGITS_TOLERANCE = 1e-5
"""transformers / mlx-lm: max |logit difference| / max |source logit|, float32. Measured on
the tests' tiny models: transformers 5.25 5.4e-6 (the fused GEMM rounds differently from
the split ones), mlx-lm 0; a RoPE base of 1e4 instead of 1e7: 0.15-0.17."""
ENGINES = ("vllm", "sglang", "transformers", "mlx")
NAMES = {"vllm": "vLLM", "sglang": "sglang", "transformers": "transformers", "mlx": "mlx-lm"}


def _config(root: Path) -> dict[str, Any]:
    try:
        config = json.loads((root / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _vocab(config: Mapping[str, Any]) -> int:
    nested = config.get("text_config")
    text: Mapping[str, Any] = nested if isinstance(nested, dict) else config
    vocab = text.get("vocab_size") or config.get("vocab_size")
    return vocab if isinstance(vocab, int) and vocab > 0 else 1000


def _prompts(against: Path) -> list[list[int]]:
    config = _config(against)
    return run.prompts_for(_vocab(config), avoid=run.special_tokens(config))


def _cannot_judge(engine: str, against: str | os.PathLike[str], why: str) -> SetupError:
    return SetupError(f"{NAMES[engine]} cannot load the source here, so it cannot judge the "
                      f"output: {why}", path=str(against))  # fmt: skip


def check_engine(
    root: Path, against: str | os.PathLike[str], engine: str, tp: int, python: str | None = None
) -> list[CheckResult]:
    """One check: ``engine.<engine>.tp<N>`` (vLLM, sglang) or ``engine.<engine>``."""
    if engine == "vllm":
        return [_vllm(Path(root), Path(against), tp, python)]
    if engine == "sglang":
        return [_sglang(Path(root), Path(against), tp, python)]
    if engine in ("transformers", "mlx"):
        return [_logits(engine, Path(root), Path(against), python)]
    run.engine_python(engine, python)  # refuses engines that cannot run here, in one line
    raise SetupError(f"no engine check for {engine}")  # pragma: no cover (RUNNABLE == ENGINES)


def _vllm(root: Path, against: Path, tp: int, python: str | None) -> CheckResult:
    name = f"engine.vllm.tp{tp}"
    res = run.vllm_generate([against, root], tp=tp, prompts=_prompts(against), python=python)
    src, out = res[str(against.resolve())], res[str(root.resolve())]
    if "refused" in src:
        raise _cannot_judge("vllm", against, src["refused"])
    if "refused" in out:
        return failed(name, f"vLLM refuses to load the output: {out['refused']}")
    cmp = run.compare_generations(src, out)
    text = " (the source served text only)" if src.get("text_only") else ""
    detail = f"vLLM at TP {tp}, source{text} vs output: {cmp.detail}"
    return passed(name, detail) if cmp.same else failed(name, detail)


def _sglang(root: Path, against: Path, tp: int, python: str | None) -> CheckResult:
    name = f"engine.sglang.tp{tp}"
    run.engine_python("sglang", python)  # refuses in one line when sglang is missing
    ranks = run.sglang_compare(against, root, tp=tp, python=python)
    fails = []
    for r in ranks:
        rank = r.get("rank", "?")
        if "a_refused" in r:
            raise _cannot_judge("sglang", against, f"rank {rank}: {r['a_refused']}")
        if "error" in r:
            return failed(name, f"rank {rank}: sglang did not finish: {r['error']}")
        if "refused" in r:
            return failed(name, f"sglang refuses to load the output: {r['refused']}")
        for key, what in (("only_a", "only from the source"), ("only_b", "only from the output")):
            if r.get(key):
                fails.append(f"rank {rank}: {len(r[key])} parameters or buffers {what} "
                             f"({r[key][0]} ...)")  # fmt: skip
        for param, why in sorted(r.get("different", {}).items()):
            fails.append(f"rank {rank}: {param}: {why}")
    if fails:
        return failed(name, f"sglang loads different parameters or buffers at TP {tp}: "
                      f"{'; '.join(fails[:4])}{' ...' if len(fails) > 4 else ''}")  # fmt: skip
    first = ranks[0] if ranks else {}
    extra = []
    if first.get("source_only_vision"):
        extra.append(f"the source's vision tower ({first['source_only_vision']} tensors) is "
                     "not in the output, as intended")  # fmt: skip
    if first.get("source_only_mrope"):
        extra.append("so is its MRoPE axis map (text positions use none)")
    return passed(name, f"sglang at TP {tp}: all {first.get('compared', 0)} parameters and "
                  "buffers of every rank equal the source's (fused rows in forward order, "
                  "rotary cos/sin cache included; loading only)"
                  + (f"; {', '.join(extra)}" if extra else ""))  # fmt: skip


def _fallbacks(engine: str, used: str) -> list[str]:
    """Other Pythons here that have ``engine``: this one, then GDNFUSE_ENGINE_PYTHON."""
    found: list[str] = []
    for py in (sys.executable, os.environ.get("GDNFUSE_ENGINE_PYTHON")):
        if (py and Path(py).exists() and not run.same_python(py, used)
                and not any(run.same_python(py, f) for f in found)
                and run.has_module(py, run.RUNNABLE[engine])):  # fmt: skip
            found.append(py)
    return found


def _logits(engine: str, root: Path, against: Path, python: str | None) -> CheckResult:
    name = f"engine.{engine}"
    label = NAMES[engine]
    fn = run.transformers_logits if engine == "transformers" else run.mlx_logits
    py = run.engine_python(engine, python)
    prompts = _prompts(against)
    res = fn([against, root], prompts, python=py)
    src, out = res[str(against.resolve())], res[str(root.resolve())]
    src_note = ""
    if "refused" in src and src.get("unknown_type"):
        for other in _fallbacks(engine, py):  # a Python whose engine knows the source's type
            again = fn([against], prompts, python=other)[str(against.resolve())]
            if "refused" not in again:
                src_note = (f" (the source's from {label} {again.get('version')} in {other}: "
                            f"{src.get('version')} does not know its model type)")  # fmt: skip
                src = again
                break
    if "refused" in src:
        raise _cannot_judge(engine, against, f"{label} {src.get('version', '?')}: "
                            f"{src['refused']}")  # fmt: skip
    if src.get("missing"):
        raise _cannot_judge(engine, against, f"{label} {src.get('version', '?')} leaves "
                            f"{len(src['missing'])} weights of it unloaded "
                            f"({src['missing'][0]} ...)")  # fmt: skip
    if "refused" in out:
        return failed(name, f"{label} {out.get('version', '?')} refuses to load the output: "
                      f"{out['refused']}")  # fmt: skip
    for key, what in (("missing", "weights the output lacks (left at their random init)"),
                      ("unexpected", "tensors of the output it does not use"),
                      ("mismatched", "tensors of the output with the wrong shape")):  # fmt: skip
        if out.get(key):
            return failed(name, f"{label} {out.get('version', '?')} loads the output with "
                          f"{len(out[key])} {what}: {', '.join(out[key][:3])}"
                          f"{' ...' if len(out[key]) > 3 else ''}")  # fmt: skip
    cmp = run.compare_logits(src["logits"], out["logits"], LOGITS_TOLERANCE)
    detail = (f"{label} {out.get('version', '?')} float32, {out.get('cls', '?')} (output) vs "
              f"{src.get('cls', '?')} (source){src_note}: {cmp.detail}")  # fmt: skip
    return passed(name, detail) if cmp.same else failed(name, detail)
