"""Tiny random Qwen3.5 models sized for real engines (vLLM's CPU kernels, sglang's loader).

Like :mod:`tiny_models` (saved by transformers itself, every parameter redrawn so that a
layout error changes the output), but with head dims the engines' CPU kernels accept
(``dk = dv = 64``, attention head_dim 64) and ``full_attention_interval`` in the config
(sglang derives layer kinds from it and ignores ``layer_types``). ``nk = 4``, so TP 2 has
``nk / T = 2`` key heads per rank: the layouts differ there.

Also :func:`engine_python` (which Python has vLLM and sglang) and the planted faults the
engine harnesses must catch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import _redraw
from transformers import (
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
)

ROOT = Path(__file__).resolve().parent.parent
NK, DK, DV = 4, 64, 64


def engine_python() -> str:
    """The engines' Python: GDNFUSE_ENGINE_PYTHON, else .venv-engines (scripts/setup.sh).

    Missing engines skip, except where GDNFUSE_REQUIRE_ENGINES=1 (scripts/test.sh, CI): a
    run that was meant to test against engines must not pass without them.
    """
    path = os.environ.get("GDNFUSE_ENGINE_PYTHON") or str(ROOT / ".venv-engines/bin/python")
    if Path(path).exists():
        return path
    why = f"no engine Python at {path} (bash scripts/setup-engines.sh installs vLLM and sglang)"
    if os.environ.get("GDNFUSE_REQUIRE_ENGINES") == "1":
        pytest.fail(why)
    pytest.skip(why)


def build(path: Path, *, moe: bool, r: int, seed: int = 0) -> Path:
    """Save a tiny ``Qwen3_5(Moe)ForCausalLM`` in bf16 with several shards."""
    kw = dict(
        vocab_size=512, hidden_size=256, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], full_attention_interval=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=NK, linear_num_value_heads=NK * r, linear_key_head_dim=DK,
        linear_value_head_dim=DV, linear_conv_kernel_dim=4, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
    )  # fmt: skip
    if moe:
        kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                  shared_expert_intermediate_size=64)  # fmt: skip
        config, cls = Qwen3_5MoeTextConfig(**kw), Qwen3_5MoeForCausalLM
    else:
        kw.update(intermediate_size=512)
        config, cls = Qwen3_5TextConfig(**kw), Qwen3_5ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(torch.bfloat16).eval()
    _redraw(model, seed)
    model.save_pretrained(path, max_shard_size="2MB")
    return path


def _rewrite(root: Path, edit) -> None:  # noqa: ANN001
    """Apply ``edit(name, tensor) -> tensor`` to every tensor, shard by shard."""
    for shard in sorted(root.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({n: edit(n, t).contiguous() for n, t in tensors.items()}, shard,
                  metadata={"format": "pt"})  # fmt: skip


def swap_value_heads(src: Path, dst: Path) -> Path:
    """A copy of a split source with value heads 0 and 1 of every GDN layer swapped (V rows
    and Z rows): a fault of the kind a wrong layout makes, for the negative controls."""
    shutil.copytree(src, dst)

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith("in_proj_qkv.weight"):
            v0 = 2 * NK * DK
            t = t.clone()
            first, second = t[v0 : v0 + DV].clone(), t[v0 + DV : v0 + 2 * DV].clone()
            t[v0 : v0 + DV], t[v0 + DV : v0 + 2 * DV] = second, first
        elif name.endswith("in_proj_z.weight"):
            t = t.clone()
            t[:DV], t[DV:2 * DV] = t[DV:2 * DV].clone(), t[:DV].clone()
        return t

    _rewrite(dst, edit)
    return dst


def plant_rows(good: Path, rows_from: Path, dst: Path) -> Path:
    """A copy of ``good`` whose fused GDN tensors are replaced by those of ``rows_from`` (same
    names, other row order): a mis-laid-out checkpoint that claims to be right."""
    shutil.copytree(good, dst)
    other = {}
    for shard in rows_from.glob("*.safetensors"):
        other.update({n: t for n, t in load_file(shard).items() if ".in_proj_" in n})
    _rewrite(dst, lambda n, t: other.get(n, t))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert any(".in_proj_qkvz" in n for n in index["weight_map"])
    return dst


def unstamped(stamped: Path, dst: Path) -> Path:
    """A copy of a stamped gdnfuse output with its original model_type and architectures back:
    a fused layout gdnfuse never writes unstamped, to test the verdicts that make it refuse to."""
    from gdnfuse.engines import unstamp_config

    shutil.copytree(stamped, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(unstamp_config(config), indent=2))
    return dst
