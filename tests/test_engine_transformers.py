"""transformers 5.24 (this venv) on gdnfuse outputs: its verdicts are what the rules say.

Stamped outputs are refused by AutoConfig; the --engine transformers output loads with
every key matched and the source's logits, and so does the --engine sglang output (MoE; dense
is refused); Qwen3.5 names with plain rows, which gdnfuse refuses to write because the rules
call it a transformers misread (split projections missing, randomly initialised), must
indeed make transformers report those keys missing (so the table is not a guess).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_models import build, unstamped
from transformers import AutoModelForCausalLM
from transformers.utils import logging

from gdnfuse import loaders
from gdnfuse.convert import convert
from gdnfuse.engines import Outcome
from gdnfuse.layout import Layout

OPTS: dict = {"workers": 1}  # one writer: the tests run on 2 cores


@pytest.mark.parametrize("moe", [True, False])
def test_transformers_verdicts(tmp_path: Path, moe: bool) -> None:
    logging.set_verbosity_error()
    src = build(tmp_path / "src", moe=moe, r=3)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    outs = {
        "default": convert(src, tmp_path / "default", tp=2, **OPTS).out,
        "transformers": convert(src, tmp_path / "tf", engine="transformers", **OPTS).out,
        "never-written": unstamped(
            convert(src, tmp_path / "plain", layout=Layout.TP_BLOCKED, **OPTS).out,
            tmp_path / "never-written"),
    }
    if moe:
        outs["sglang"] = convert(src, tmp_path / "sglang", engine="sglang", **OPTS).out
    for name, out in outs.items():
        verdict = loaders.verdicts(out)["transformers"].outcome
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                out, dtype=torch.float32, output_loading_info=True
            )
        except ValueError as e:
            assert "gdnfuse_fused" in str(e) and verdict is Outcome.REFUSES, name
            continue
        if verdict is Outcome.LOADS:
            assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
            torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-4)
        else:
            assert verdict is Outcome.MISREADS, name
            assert any("in_proj_qkv" in k for k in info["missing_keys"]), (name, info)
    assert loaders.verdicts(outs["default"])["transformers"].outcome is Outcome.REFUSES
    assert loaders.verdicts(outs["never-written"])["transformers"].outcome is Outcome.MISREADS
