"""Tiny random Qwen3.5 models sized for real engines (vLLM's CPU kernels, sglang's loader).

Like :mod:`tiny_models` (saved by transformers itself, every parameter redrawn so that a
layout error changes the output), but with head dims the engines' CPU kernels accept
(``dk = dv = 64``, attention head_dim 64) and ``full_attention_interval`` in the config
(sglang derives layer kinds from it and ignores ``layer_types``). ``nk = 4``, so TP 2 has
``nk / T = 2`` key heads per rank: the layouts differ there.

:func:`build_vl` makes released-style vision-language sources (Qwen3.5 as published:
``Qwen3_5(Moe)ForConditionalGeneration``, RoPE base 1e7, interleaved MRoPE, an MTP layer,
fused experts on disk) and :func:`text_only_output` their text-only gdnfuse outputs.

Also :func:`engine_python` (which Python has vLLM, sglang and mlx-lm), :func:`tf4_python`
(transformers 4.x) and the planted faults the engine harnesses must catch (among them
:func:`plant_rope_base`: right weights, a wrong RoPE base in config.json).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import _redraw, add_shard
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
)

ROOT = Path(__file__).resolve().parent.parent
NK, DK, DV = 4, 64, 64


def _python(variable: str, venv: str, what: str) -> str:
    """The Python ``variable`` names, else ``venv``'s. Missing, it skips, except where
    GDNFUSE_REQUIRE_ENGINES=1 (scripts/test.sh, CI): a run that was meant to test against
    engines must not pass without them."""
    path = os.environ.get(variable) or str(ROOT / venv / "bin/python")
    if Path(path).exists():
        return path
    why = f"no {what} Python at {path} (bash scripts/setup-engines.sh makes {venv})"
    if os.environ.get("GDNFUSE_REQUIRE_ENGINES") == "1":
        pytest.fail(why)
    pytest.skip(why)


def engine_python() -> str:
    """The engines' Python (vLLM, sglang, mlx-lm): GDNFUSE_ENGINE_PYTHON, else .venv-engines."""
    return _python("GDNFUSE_ENGINE_PYTHON", ".venv-engines", "engine")


def tf4_python() -> str:
    """transformers 4.x's Python: GDNFUSE_TF4_PYTHON, else .venv-tf4."""
    return _python("GDNFUSE_TF4_PYTHON", ".venv-tf4", "transformers 4.x")


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


VL_TOKENS = {"image_token_id": 508, "video_token_id": 509, "vision_start_token_id": 506,
             "vision_end_token_id": 507}  # fmt: skip
"""Top-level special token ids of the tiny VL sources (inside the 512-token vocabulary; the
engine checks' prompts leave them out)."""
VL_ROPE = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
           "mrope_section": [3, 3, 2], "mrope_interleaved": True}  # fmt: skip
"""As released (rope_theta 1e7, a quarter of head_dim rotated, interleaved MRoPE); the
sections sum to rotary_dim / 2 = 64 * 0.25 / 2 = 8, as [11, 11, 10] does for head_dim 256."""
VISION = {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
          "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
          "num_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
          "deepstack_visual_indexes": []}  # fmt: skip (released: no deepstack mergers)
VL_SIDE_FILES = {
    "preprocessor_config.json": {
        "image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        "processor_class": "Qwen3VLProcessor"},
    "video_preprocessor_config.json": {
        "video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 4096, "longest_edge": 25165824},
        "processor_class": "Qwen3VLProcessor"},
    "tokenizer_config.json": {"model_max_length": 262144, "tokenizer_class": "Qwen2Tokenizer",
                              "processor_class": "Qwen3VLProcessor"},
}  # fmt: skip
"""Side files a released Qwen3.5 carries (values of the released ones where they matter; no
tokenizer.json: the engines run with token ids only)."""
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                 "{% endfor %}")


def _mrope_section(head_dim: int) -> list[int]:
    """The released split of the rotary half-dim over (t, h, w): [11, 11, 10] for 32, so
    [3, 3, 2] for head_dim 64 and [6, 6, 4] for 128 (partial_rotary_factor 0.25)."""
    half = int(head_dim * VL_ROPE["partial_rotary_factor"]) // 2
    third = -(-half // 3)
    return [third, third, half - 2 * third]


def build_vl(path: Path, *, moe: bool, r: int, seed: int = 0, rope_theta: float = 1e7,
             head_dim: int = 64, dk: int = DK, moe_intermediate: int = 64,
             stacked_experts: bool = True) -> Path:  # fmt: skip
    """Save a tiny released-style Qwen3.5 VL checkpoint: ``Qwen3_5(Moe)ForConditionalGeneration``
    (vision tower ``model.visual.*``, language model ``model.language_model.*``) in bf16 and
    several shards, the released text_config keys, an MTP layer in a shard of its own (named
    as vLLM's ``qwen3_5_mtp.py`` loads it) and the released side files.

    Engine-sized like :func:`build`: ``dk = dv = head_dim = 64``, ``nk = 4``. ``rope_theta``:
    the RoPE base (as released: 1e7). MoE experts are stored stacked, as the bf16 release
    stores them (:func:`_fuse_experts`), or per expert (``stacked_experts=False``) as the FP8
    release does. ``head_dim``, ``dk`` (= ``dv``), ``moe_intermediate``: other engine sizes
    (FP8 with 128 x 128 blocks needs 128-row heads).
    """
    text = dict(
        vocab_size=512, hidden_size=256, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], full_attention_interval=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        linear_num_key_heads=NK, linear_num_value_heads=NK * r, linear_key_head_dim=dk,
        linear_value_head_dim=dk, linear_conv_kernel_dim=4, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2,
        pad_token_id=None, attn_output_gate=True, mamba_ssm_dtype="float32",
        mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False, attention_bias=False,
        rope_parameters={**VL_ROPE, "rope_theta": rope_theta,
                         "mrope_section": _mrope_section(head_dim)},
    )  # fmt: skip
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=moe_intermediate,
                    shared_expert_intermediate_size=moe_intermediate)  # fmt: skip
        config_cls, cls = Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
        donor_config, donor_cls = Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM
    else:
        text.update(intermediate_size=512)
        config_cls, cls = Qwen3_5Config, Qwen3_5ForConditionalGeneration
        donor_config, donor_cls = Qwen3_5TextConfig, Qwen3_5ForCausalLM
    config = config_cls(text_config=text, vision_config={**VISION, "out_hidden_size": 256},
                        tie_word_embeddings=False, **VL_TOKENS)  # fmt: skip
    torch.manual_seed(seed)
    model = cls(config).to(torch.bfloat16).eval()
    _redraw(model, seed)
    model.save_pretrained(path, max_shard_size="2MB")
    if moe and stacked_experts:
        _fuse_experts(path)
    # MTP: one full-attention decoder layer (with the MLP / MoE block) + fc and norms, as
    # released checkpoints carry it and vLLM's Qwen3_5MTP loads it; transformers ignores mtp.*
    one = {**text, "num_hidden_layers": 1, "layer_types": ["full_attention"]}
    one.pop("full_attention_interval")
    donor = donor_cls(donor_config(**one)).to(torch.bfloat16)
    _redraw(donor, seed + 1000)
    donor.save_pretrained(path / "mtp-donor", max_shard_size="1GB")
    mtp = {"mtp." + n.removeprefix("model."): t for n, t in
           load_file(path / "mtp-donor/model.safetensors").items()
           if n.startswith("model.layers.0.")}  # fmt: skip
    shutil.rmtree(path / "mtp-donor")
    gen = torch.Generator().manual_seed(seed + 2000)
    hidden = text["hidden_size"]
    mtp["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden, generator=gen) * (2 * hidden) ** -0.5
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{norm}.weight"] = torch.randn(hidden, generator=gen) * 0.2
    mtp = {n: t.to(torch.bfloat16).contiguous() for n, t in sorted(mtp.items())}
    add_shard(path, "model-mtp.safetensors", mtp)
    for name, content in VL_SIDE_FILES.items():
        (path / name).write_text(json.dumps(content, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def text_only_copy(vl: Path, dst: Path) -> Path:
    """The language model of a VL source as a text-only Qwen3.5 checkpoint (vision tower
    dropped, ``model.language_model.*`` renamed ``model.*``, ``text_config`` as config.json),
    same bytes otherwise: to make ``--arch qwen3-next`` outputs of a VL source's weights
    where ``convert`` has no ``text_only`` yet."""
    dst.mkdir(parents=True)
    config = json.loads((vl / "config.json").read_text())
    text = dict(config["text_config"])
    moe = text["model_type"] == "qwen3_5_moe_text"
    text["architectures"] = ["Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"]
    text["tie_word_embeddings"] = config.get("tie_word_embeddings", False)
    (dst / "config.json").write_text(json.dumps(text, indent=2))
    index = json.loads((vl / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        kept = {n.replace("model.language_model.", "model.", 1): t
                for n, t in load_file(vl / shard).items() if not n.startswith("model.visual.")}
        if kept:
            save_file(kept, dst / shard, metadata={"format": "pt"})
            weight_map.update({n: shard for n in kept})
    size = sum(t.numel() * t.element_size() for shard in set(weight_map.values())
               for t in load_file(dst / shard).values())  # fmt: skip
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst


def _fuse_experts(root: Path) -> None:
    """Store the decoder layers' routed experts as released Qwen3.5 MoE checkpoints do (and
    mlx-lm's ``qwen3_5_moe`` requires): ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows
    then up rows) and ``mlp.experts.down_proj`` ``[E, H, I]``, not transformers' per-expert
    ``save_pretrained`` form. The MTP layer keeps per-expert tensors, as released."""
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = {s: load_file(root / s) for s in sorted(set(index["weight_map"].values()))}
    per_expert = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$")
    layers: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    home: dict[str, str] = {}  # the shard of a layer's fused experts: its first expert's
    for shard, tensors in shards.items():
        for name in [n for n in tensors if per_expert.match(n) and not n.startswith("mtp.")]:
            m = per_expert.match(name)
            layers.setdefault(m[1], {})[(m[3], int(m[2]))] = tensors.pop(name)
            home.setdefault(m[1], shard)
            del index["weight_map"][name]
    for prefix, parts in layers.items():
        n = 1 + max(e for _, e in parts)
        gate_up = torch.stack([torch.cat([parts["gate", e], parts["up", e]]) for e in range(n)])
        down = torch.stack([parts["down", e] for e in range(n)])
        for kind, t in (("gate_up_proj", gate_up), ("down_proj", down)):
            shards[home[prefix]][prefix + kind] = t.contiguous()
            index["weight_map"][prefix + kind] = home[prefix]
    for shard, tensors in shards.items():
        save_file(tensors, root / shard, metadata={"format": "pt"})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    index_path.write_text(json.dumps(index, indent=2))


def text_only_output(src: Path, dst: Path, **convert_args) -> Path:  # noqa: ANN003
    """``convert(src, dst, text_only=True, **convert_args)``: the language model of a VL
    source as a gdnfuse output. Where ``convert`` has no ``text_only`` yet, the same bytes
    through :func:`text_only_copy` (then the output's record names the copy as its source)."""
    import inspect

    from gdnfuse.convert import convert

    if "text_only" in inspect.signature(convert).parameters:
        return convert(src, dst, text_only=True, **convert_args).out
    copy = text_only_copy(src, dst.parent / f"{dst.name}-text-only-source")
    return convert(copy, dst, **convert_args).out


DEFAULT_FP8_IGNORE = ["in_proj_b", "in_proj_a", "mlp.gate", "visual", "mtp", "lm_head",
                      "embed_tokens", "norm"]
"""A short ``modules_to_not_convert`` (substring names): what stays bf16 in :func:`fp8_copy`."""


def fp8_copy(src: Path, dst: Path, block: int = 128,
             ignore: Callable[[dict], list[str]] | None = None) -> Path:  # fmt: skip
    """A copy of ``src`` with its decoder layers' linear weights block-quantized to FP8 as the
    official ``Qwen3.5-*-FP8`` checkpoints are: ``float8_e4m3fn`` weights and a bf16
    ``weight_scale_inv`` per ``block x block`` (``quant_method: fp8``); matrices that are not
    whole blocks (``in_proj_b``/``a``, routers), norms, conv1d, embeddings, the head, the
    vision tower and MTP stay bf16. ``ignore(config)``: the ``modules_to_not_convert`` to
    write (default :data:`DEFAULT_FP8_IGNORE`). sglang's CPU FP8 path needs AMX, which this
    machine lacks, when it repacks weights after loading."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for name, t in load_file(dst / shard).items():
            whole_blocks = t.dim() == 2 and t.shape[0] % block == 0 and t.shape[1] % block == 0
            if (name.startswith(("model.language_model.layers.", "model.layers."))
                    and name.endswith(".weight") and ".mlp.gate." not in name
                    and whole_blocks):  # fmt: skip
                w = t.float().reshape(t.shape[0] // block, block, t.shape[1] // block, block)
                scale = (w.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0).to(torch.bfloat16)
                q = w / scale.float()[:, None, :, None]
                out[name] = q.reshape(t.shape).to(torch.float8_e4m3fn)
                out[name + "_scale_inv"] = scale
                index["weight_map"][name + "_scale_inv"] = shard
            else:
                out[name] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
        "modules_to_not_convert": ignore(config) if ignore else list(DEFAULT_FP8_IGNORE),
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def plant_rope_base(out: Path, base: float = 10_000.0) -> Path:
    """Write RoPE base ``base`` into ``out``'s config.json everywhere an engine reads it (top
    level ``rope_theta``, ``rope_parameters.rope_theta``, and the same in ``text_config``):
    a checkpoint whose weights are right and whose config is wrong, for the negative controls.
    """
    path = out / "config.json"
    config = json.loads(path.read_text())
    planted = 0
    for top, c in ((True, config), (False, config.get("text_config"))):
        if not isinstance(c, dict):
            continue
        if top or "rope_theta" in c:
            c["rope_theta"] = base
            planted += 1
        if isinstance(c.get("rope_parameters"), dict):
            c["rope_parameters"]["rope_theta"] = base
            planted += 1
    assert planted > 1, "no rope_parameters to plant into"
    path.write_text(json.dumps(config, indent=2))
    return out


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
    layers, other row order; a VL ``rows_from``'s ``model.language_model.`` names are read as
    ``model.``): a mis-laid-out checkpoint that claims to be right."""
    shutil.copytree(good, dst)
    other = {}
    for shard in rows_from.glob("*.safetensors"):
        other.update({n.replace("model.language_model.", "model."): t
                      for n, t in load_file(shard).items() if ".in_proj_" in n})  # fmt: skip
    replaced = []

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in other:
            replaced.append(name)
        return other.get(name, t)

    _rewrite(dst, edit)
    assert any(".in_proj_qkvz" in n for n in replaced), "nothing planted"
    return dst


def unstamped(stamped: Path, dst: Path) -> Path:
    """A copy of a stamped gdnfuse output with its original model_type and architectures back:
    a fused layout gdnfuse never writes unstamped, to test the verdicts that make it refuse to."""
    from gdnfuse.record import unstamp_config

    shutil.copytree(stamped, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(unstamp_config(config), indent=2))
    return dst
