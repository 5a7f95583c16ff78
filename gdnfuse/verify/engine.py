"""Check 4 of `gdnfuse verify`, with --engine: the real engine serves the output as the source.

The other checks prove the bytes and the layout; this one proves what users run. vLLM:
load the source and the output, greedy-generate from fixed token prompts, and require
equal tokens and top-k logprobs (:func:`gdnfuse.engines.run.compare_generations`). sglang
(loading only on CPU): every rank's parameters from the output equal those from the
source, fused GDN rows compared in the order each model's forward reads them. Engines
gdnfuse cannot run are bad input (their rules are read, not run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gdnfuse.checkpoint import CONFIG_NAME
from gdnfuse.engines import run
from gdnfuse.verify.report import CheckResult, failed, passed


def _vocab(root: Path) -> int:
    config = json.loads((root / CONFIG_NAME).read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = text.get("vocab_size") or config.get("vocab_size")
    return vocab if isinstance(vocab, int) and vocab > 0 else 1000


def check_engine(
    root: Path, against: str | os.PathLike[str], engine: str, tp: int, python: str | None = None
) -> list[CheckResult]:
    """One check named ``engine.<engine>.tp<N>``."""
    name = f"engine.{engine}.tp{tp}"
    if engine == "vllm":
        prompts = run.prompts_for(_vocab(Path(against)))
        res = run.vllm_generate([against, root], tp=tp, prompts=prompts, python=python)
        src, out = res[str(Path(against).resolve())], res[str(Path(root).resolve())]
        if "refused" in src:
            return [failed(name, f"vLLM refuses the source itself: {src['refused']}")]
        if "refused" in out:
            return [failed(name, f"vLLM refuses to load the output: {out['refused']}")]
        cmp = run.compare_generations(src, out)
        detail = f"vLLM at TP {tp}, source vs output: {cmp.detail}"
        return [passed(name, detail) if cmp.same else failed(name, detail)]
    run.engine_python(engine, python)  # refuses engines that cannot run here, in one line
    ranks = run.sglang_compare(against, root, tp=tp, python=python)
    fails = []
    for r in ranks:
        rank = r.get("rank", "?")
        if "error" in r or "a_refused" in r:
            return [failed(name, f"rank {rank}: sglang cannot load the source: "
                           f"{r.get('error') or r.get('a_refused')}")]  # fmt: skip
        if "refused" in r:
            return [failed(name, f"sglang refuses to load the output: {r['refused']}")]
        for key, what in (("only_a", "only from the source"), ("only_b", "only from the output")):
            if r.get(key):
                fails.append(f"rank {rank}: {len(r[key])} parameters {what} ({r[key][0]} ...)")
        for param, why in sorted(r.get("different", {}).items()):
            fails.append(f"rank {rank}: {param}: {why}")
    if fails:
        return [failed(name, f"sglang loads different parameters at TP {tp}: "
                       f"{'; '.join(fails[:4])}{' ...' if len(fails) > 4 else ''}")]  # fmt: skip
    count = ranks[0].get("params", 0) if ranks else 0
    return [passed(name, f"sglang at TP {tp}: all {count} parameters of every rank equal the "
                   "source's (fused rows in forward order; loading only)")]  # fmt: skip
