"""Whole model: a converted Qwen3.5 checkpoint loads as Qwen3-Next and computes the same logits.

A tiny ``Qwen3_5ForCausalLM`` (or ``Qwen3_5MoeForCausalLM``) saved by transformers is
converted with the ``qwen3-next`` layout; the test then replaces the output's config.json
with a ``Qwen3NextConfig`` of the same dims (docs/layouts.md section 8: dense models need
``num_experts=0, mlp_only_layers=all``; MoE models map one to one) and loads it with
``Qwen3NextForCausalLM.from_pretrained``. Every key must match, and the logits and a greedy
generation must equal the Qwen3.5 model's. The same comparison run on a ``tp-blocked``
conversion, or on the unconverted source, fails: the check has teeth.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import TinySpec, build_checkpoint, load_spec, text_config_dict, torch_threads
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from gdnfuse.convert import convert
from gdnfuse.layout import Layout

LOGIT_REL = 1e-4
"""float32: max |logit diff| relative to max |logit| (observed: 0 on CPU; the original spec
said 2e-7)."""
NEW_TOKENS = 8


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def qwen3_next_config(spec: TinySpec) -> Qwen3NextConfig:
    """The Qwen3-Next config that describes the same network as the tiny Qwen3.5 one.

    Text-only positions make Qwen3.5's interleaved MRoPE plain partial RoPE, so only the
    rotary fraction and theta carry over. Dense MLPs need every layer in ``mlp_only_layers``.
    """
    text = text_config_dict(spec)
    rope = text.pop("rope_parameters")
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": rope["rope_theta"],
        "partial_rotary_factor": rope["partial_rotary_factor"],
    }
    layers = text["num_hidden_layers"]
    if spec.moe:
        text.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    else:
        text.update(num_experts=0, mlp_only_layers=list(range(layers)))
    return Qwen3NextConfig(**text)


def relabel_as_qwen3_next(out: Path, spec: TinySpec) -> None:
    """Replace config.json with a Qwen3-Next one; keep gdnfuse's layout record."""
    old = json.loads((out / "config.json").read_text())
    config = qwen3_next_config(spec).to_dict()
    config["architectures"] = ["Qwen3NextForCausalLM"]
    config["dtype"] = old.get("dtype", "float32")
    if "gdnfuse" in old:
        config["gdnfuse"] = old["gdnfuse"]
    (out / "config.json").write_text(json.dumps(config, indent=2))


def load_qwen3_next(path: Path) -> tuple[Any, dict[str, list[Any]]]:
    model, info = Qwen3NextForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32
    )
    return model.eval(), info


def logits_and_generation(model: Any, ids: Tensor) -> tuple[Tensor, Tensor]:
    gen = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, generation_config=gen)
    return logits, generated[:, ids.shape[1] :]


def input_ids(spec: TinySpec) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(3, spec.vocab, (2, 11), generator=gen)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    moe = request.param
    root = tmp_path_factory.mktemp("whole")
    return build_checkpoint(root / "src", r=3 if moe else 2, nk=4, dk=8, dv=4, moe=moe, seed=11)


@pytest.fixture(scope="module")
def reference(source: Path) -> tuple[Tensor, Tensor, Tensor]:
    """Input ids, logits and greedy continuation of the Qwen3.5 source model."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    assert type(model).__name__ in ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
    ids = input_ids(load_spec(source))
    logits, generated = logits_and_generation(model, ids)
    return ids, logits, generated


def compare(model: Any, reference: tuple[Tensor, Tensor, Tensor]) -> tuple[float, bool]:
    """(max |logit diff| / max |logit|, greedy generations equal)."""
    ids, want_logits, want_generated = reference
    logits, generated = logits_and_generation(model, ids)
    scale = want_logits.abs().max().item()
    return (logits - want_logits).abs().max().item() / scale, torch.equal(generated, want_generated)


def test_converted_model_loads_as_qwen3_next(
    source: Path, reference: tuple[Tensor, Tensor, Tensor], tmp_path: Path
) -> None:
    spec = load_spec(source)
    out = convert(source, tmp_path / "out", layout=Layout.QWEN3_NEXT, tp=2).out
    relabel_as_qwen3_next(out, spec)
    model, info = load_qwen3_next(out)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info.get("error_msgs"), info.get("error_msgs")
    _, want_logits, want_generated = reference
    assert want_logits.abs().max() > 1.0, "degenerate logits"
    assert len(set(want_generated.flatten().tolist())) > 2, "degenerate generation"
    rel, same_generation = compare(model, reference)
    print(f"{type(model).__name__} vs {spec}: max |logit diff| / max |logit| = {rel:.2e}")
    assert rel < LOGIT_REL, rel
    assert same_generation


def test_tp_blocked_weights_do_not_pass_as_qwen3_next(
    source: Path, reference: tuple[Tensor, Tensor, Tensor], tmp_path: Path
) -> None:
    """Same keys and shapes, wrong row order: loads silently, and the logits catch it."""
    spec = load_spec(source)
    out = convert(source, tmp_path / "out", layout=Layout.TP_BLOCKED, tp=2).out
    relabel_as_qwen3_next(out, spec)
    model, info = load_qwen3_next(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    rel, _ = compare(model, reference)
    print(f"tp-blocked read as qwen3-next: {rel:.2e}")
    assert rel > 100 * LOGIT_REL, rel


def test_unconverted_source_reports_missing_keys(source: Path, tmp_path: Path) -> None:
    """The key check can fail: split weights under a Qwen3-Next config do not match."""
    spec = load_spec(source)
    src = tmp_path / "src"
    shutil.copytree(source, src)
    relabel_as_qwen3_next(src, spec)
    _, info = load_qwen3_next(src)
    assert any("in_proj_qkvz" in k for k in info["missing_keys"])
    assert any("in_proj_qkv." in k for k in info["unexpected_keys"])
