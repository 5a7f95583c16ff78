"""Synthetic Qwen3.5-shaped checkpoints: real key names and shapes, random values.

Used by ``gdnfuse demo``, the benchmarks and the tests. Written with gdnfuse's own
header encoder and the standard library (no torch), so the demo needs nothing heavy.
Values are small normal floats (never NaN), so reference forwards on them are meaningful.
"""

from __future__ import annotations

import json
import os
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from gdnfuse.checkpoint import INDEX_NAME
from gdnfuse.safetensors_file import DTYPE_BYTES, encode_header


@dataclass(frozen=True)
class Vision:
    """A Qwen3.5 vision tower's dims (``vision_config``): only shapes and names matter here."""

    depth: int = 27
    hidden: int = 1152
    intermediate: int = 4304
    heads: int = 16
    patch: int = 16
    temporal_patch: int = 2
    spatial_merge: int = 2
    positions: int = 2304
    channels: int = 3


@dataclass(frozen=True)
class ModelShape:
    """The dims of a Qwen3.5 model that decide tensor shapes, and the released config values
    that decide numerics (RoPE base 1e7 with an M-RoPE section, as every release has)."""

    hidden: int
    layers: int
    nk: int
    nv: int
    dk: int = 128
    dv: int = 128
    intermediate: int = 0  # dense MLP width (0 for MoE)
    experts: int = 0
    moe_intermediate: int = 0
    heads: int = 16
    kv_heads: int = 2
    head_dim: int = 256
    vocab: int = 1024
    conv: int = 4
    interval: int = 4  # every interval-th layer is full attention
    experts_per_tok: int = 8
    vision: Vision | None = Vision()  # None: no vision tower (a text-only model)
    mtp_layers: int = 1  # multi-token-prediction layers (mtp.*), full attention, as released
    fused_experts: bool = False  # experts.gate_up_proj / down_proj, as released BF16 MoE stores
    rope_theta: float = 10_000_000.0
    mrope_section: tuple[int, int, int] = (11, 11, 10)


TINY_VISION = Vision(depth=1, hidden=16, intermediate=32, heads=2, patch=2, temporal_patch=2,
                     spatial_merge=2, positions=16)  # fmt: skip

PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=64, layers=4, nk=4, nv=12, dk=16, dv=16, intermediate=128,
                       heads=4, kv_heads=2, head_dim=16, vocab=256, vision=TINY_VISION,
                       mrope_section=(1, 1, 0)),
    "qwen3.5-0.8b": ModelShape(1024, 24, 16, 16, intermediate=3584, heads=8, vocab=248320,
                               vision=Vision(depth=12, hidden=768, intermediate=3072, heads=12)),
    "qwen3.5-9b": ModelShape(4096, 32, 16, 32, intermediate=12288, vocab=248320),
    "qwen3.5-27b": ModelShape(5120, 64, 16, 48, intermediate=17408, heads=24, kv_heads=4,
                              vocab=248320),
    "qwen3.5-35b-a3b": ModelShape(2048, 40, 16, 32, experts=256, moe_intermediate=512,
                                  vocab=248320, fused_experts=True),
    "qwen3.5-397b-a17b": ModelShape(4096, 60, 16, 64, experts=512, moe_intermediate=1024,
                                    heads=32, vocab=248320, experts_per_tok=10),
}  # fmt: skip
"""Released shapes (27B and 35B-A3B configs as published; the others' vision towers and
expert storage as far as known). ``tiny`` keeps every structural feature at toy size."""

TOKENS = {"image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
          "vision_end_token_id": 248054}  # fmt: skip
"""Top-level token ids of the released configs (ids past a toy vocabulary are never looked up
by a text-only forward)."""
EOS_TOKEN_ID = 248044


def _vision_shapes(v: Vision, out_hidden: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``model.visual.*`` as transformers' ``Qwen3_5VisionModel`` names and shapes them."""
    p = "model.visual."
    yield p + "patch_embed.proj.weight", (v.hidden, v.channels, v.temporal_patch, v.patch,
                                          v.patch)  # fmt: skip
    yield p + "patch_embed.proj.bias", (v.hidden,)
    yield p + "pos_embed.weight", (v.positions, v.hidden)
    for i in range(v.depth):
        b = f"{p}blocks.{i}."
        for norm in ("norm1", "norm2"):
            yield b + f"{norm}.weight", (v.hidden,)
            yield b + f"{norm}.bias", (v.hidden,)
        yield b + "attn.qkv.weight", (3 * v.hidden, v.hidden)
        yield b + "attn.qkv.bias", (3 * v.hidden,)
        yield b + "attn.proj.weight", (v.hidden, v.hidden)
        yield b + "attn.proj.bias", (v.hidden,)
        yield b + "mlp.linear_fc1.weight", (v.intermediate, v.hidden)
        yield b + "mlp.linear_fc1.bias", (v.intermediate,)
        yield b + "mlp.linear_fc2.weight", (v.hidden, v.intermediate)
        yield b + "mlp.linear_fc2.bias", (v.hidden,)
    merged = v.hidden * v.spatial_merge**2
    yield p + "merger.norm.weight", (v.hidden,)
    yield p + "merger.norm.bias", (v.hidden,)
    yield p + "merger.linear_fc1.weight", (merged, merged)
    yield p + "merger.linear_fc1.bias", (merged,)
    yield p + "merger.linear_fc2.weight", (out_hidden, merged)
    yield p + "merger.linear_fc2.bias", (out_hidden,)


def _mlp_shapes(m: ModelShape, p: str, fused: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    if not m.experts:
        yield p + "mlp.gate_proj.weight", (m.intermediate, m.hidden)
        yield p + "mlp.up_proj.weight", (m.intermediate, m.hidden)
        yield p + "mlp.down_proj.weight", (m.hidden, m.intermediate)
        return
    mp = p + "mlp."
    yield mp + "gate.weight", (m.experts, m.hidden)
    if fused:  # no ".weight": how transformers 5 and the released BF16 MoE store them
        yield mp + "experts.gate_up_proj", (m.experts, 2 * m.moe_intermediate, m.hidden)
        yield mp + "experts.down_proj", (m.experts, m.hidden, m.moe_intermediate)
    else:
        for j in range(m.experts):
            yield mp + f"experts.{j}.gate_proj.weight", (m.moe_intermediate, m.hidden)
            yield mp + f"experts.{j}.up_proj.weight", (m.moe_intermediate, m.hidden)
            yield mp + f"experts.{j}.down_proj.weight", (m.hidden, m.moe_intermediate)
    yield mp + "shared_expert.gate_proj.weight", (m.moe_intermediate, m.hidden)
    yield mp + "shared_expert.up_proj.weight", (m.moe_intermediate, m.hidden)
    yield mp + "shared_expert.down_proj.weight", (m.hidden, m.moe_intermediate)
    yield mp + "shared_expert_gate.weight", (1, m.hidden)


def _attention_shapes(m: ModelShape, p: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    sa = p + "self_attn."
    yield sa + "q_proj.weight", (2 * m.heads * m.head_dim, m.hidden)  # queries + output gate
    yield sa + "k_proj.weight", (m.kv_heads * m.head_dim, m.hidden)
    yield sa + "v_proj.weight", (m.kv_heads * m.head_dim, m.hidden)
    yield sa + "o_proj.weight", (m.hidden, m.heads * m.head_dim)
    yield sa + "q_norm.weight", (m.head_dim,)
    yield sa + "k_norm.weight", (m.head_dim,)


def tensor_shapes(
    m: ModelShape, prefix: str = "model.language_model."
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen3.5 checkpoint, in a natural order: the language model, its head,
    the MTP layers (``mtp.*``, per-expert experts as released) and, for a ConditionalGeneration
    prefix, the vision tower (``model.visual.*``)."""
    yield f"{prefix}embed_tokens.weight", (m.vocab, m.hidden)
    for i in range(m.layers):
        p = f"{prefix}layers.{i}."
        yield p + "input_layernorm.weight", (m.hidden,)
        if (i + 1) % m.interval:
            la = p + "linear_attn."
            conv = 2 * m.nk * m.dk + m.nv * m.dv
            yield la + "in_proj_qkv.weight", (conv, m.hidden)
            yield la + "in_proj_z.weight", (m.nv * m.dv, m.hidden)
            yield la + "in_proj_b.weight", (m.nv, m.hidden)
            yield la + "in_proj_a.weight", (m.nv, m.hidden)
            yield la + "conv1d.weight", (conv, 1, m.conv)
            yield la + "A_log", (m.nv,)
            yield la + "dt_bias", (m.nv,)
            yield la + "norm.weight", (m.dv,)
            yield la + "out_proj.weight", (m.hidden, m.nv * m.dv)
        else:
            yield from _attention_shapes(m, p)
        yield p + "post_attention_layernorm.weight", (m.hidden,)
        yield from _mlp_shapes(m, p, m.fused_experts)
    yield f"{prefix}norm.weight", (m.hidden,)
    yield "lm_head.weight", (m.vocab, m.hidden)
    if m.mtp_layers:
        yield "mtp.fc.weight", (m.hidden, 2 * m.hidden)
        yield "mtp.pre_fc_norm_embedding.weight", (m.hidden,)
        yield "mtp.pre_fc_norm_hidden.weight", (m.hidden,)
        for i in range(m.mtp_layers):
            p = f"mtp.layers.{i}."
            yield p + "input_layernorm.weight", (m.hidden,)
            yield from _attention_shapes(m, p)
            yield p + "post_attention_layernorm.weight", (m.hidden,)
            yield from _mlp_shapes(m, p, fused=False)
        yield "mtp.norm.weight", (m.hidden,)
    if m.vision is not None and prefix == "model.language_model.":
        yield from _vision_shapes(m.vision, m.hidden)


def random_bytes(n_values: int, dtype: str, rng: random.Random) -> bytes:
    """``n_values`` small normal random values (slow but realistic: for tiny models)."""
    nbytes = n_values * DTYPE_BYTES[dtype]
    f32 = array("f", (rng.gauss(0.0, 0.05) for _ in range(n_values))).tobytes()
    if dtype == "F32":
        return f32
    if dtype == "BF16":  # the high half of each little-endian float32
        out = bytearray(nbytes)
        out[0::2], out[1::2] = f32[2::4], f32[3::4]
        return bytes(out)
    raise ValueError(f"synthetic data supports F32 and BF16, not {dtype}")


def config_for(m: ModelShape, dtype: str, conditional: bool) -> dict:
    """config.json with every key and value a released Qwen3.5 config has (text_config, RoPE
    base 1e7 and M-RoPE section in ``rope_parameters``, MTP count, token ids, vision_config)."""
    text = {
        "model_type": "qwen3_5_moe_text" if m.experts else "qwen3_5_text",
        "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True,
        "dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
        "eos_token_id": EOS_TOKEN_ID, "full_attention_interval": m.interval,
        "head_dim": m.head_dim, "hidden_act": "silu", "hidden_size": m.hidden,
        "initializer_range": 0.02,
        "layer_types": ["linear_attention" if (i + 1) % m.interval else "full_attention"
                        for i in range(m.layers)],
        "linear_conv_kernel_dim": m.conv, "linear_key_head_dim": m.dk,
        "linear_num_key_heads": m.nk, "linear_num_value_heads": m.nv,
        "linear_value_head_dim": m.dv, "max_position_embeddings": 262144,
        "mlp_only_layers": [], "mtp_num_hidden_layers": m.mtp_layers,
        "mtp_use_dedicated_embeddings": False, "num_attention_heads": m.heads,
        "num_hidden_layers": m.layers, "num_key_value_heads": m.kv_heads,
        "rms_norm_eps": 1e-06, "use_cache": True, "vocab_size": m.vocab,
        "mamba_ssm_dtype": "float32",
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": list(m.mrope_section),
                            "rope_type": "default", "rope_theta": m.rope_theta,
                            "partial_rotary_factor": 0.25},
    }  # fmt: skip
    if m.experts:
        text.update(moe_intermediate_size=m.moe_intermediate, num_experts=m.experts,
                    num_experts_per_tok=m.experts_per_tok, router_aux_loss_coef=0.001,
                    shared_expert_intermediate_size=m.moe_intermediate)  # fmt: skip
    else:
        text["intermediate_size"] = m.intermediate
    if not conditional:
        arch = "Qwen3_5MoeForCausalLM" if m.experts else "Qwen3_5ForCausalLM"
        return {"architectures": [arch], **text, "tie_word_embeddings": False}
    family = "qwen3_5_moe" if m.experts else "qwen3_5"
    arch = "Qwen3_5MoeForConditionalGeneration" if m.experts else "Qwen3_5ForConditionalGeneration"
    config: dict = {"architectures": [arch], "image_token_id": TOKENS["image_token_id"],
                    "model_type": family, "text_config": text, "tie_word_embeddings": False,
                    "video_token_id": TOKENS["video_token_id"]}  # fmt: skip
    if m.vision is not None:
        v = m.vision
        config["vision_config"] = {
            "deepstack_visual_indexes": [], "depth": v.depth, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v.hidden, "in_channels": v.channels, "initializer_range": 0.02,
            "intermediate_size": v.intermediate, "model_type": family, "num_heads": v.heads,
            "num_position_embeddings": v.positions, "out_hidden_size": m.hidden,
            "patch_size": v.patch, "spatial_merge_size": v.spatial_merge,
            "temporal_patch_size": v.temporal_patch,
        }  # fmt: skip
    config["vision_end_token_id"] = TOKENS["vision_end_token_id"]
    config["vision_start_token_id"] = TOKENS["vision_start_token_id"]
    return config


SIDE_FILES: dict[str, str] = {
    "generation_config.json": json.dumps({"bos_token_id": EOS_TOKEN_ID, "do_sample": True,
                                          "eos_token_id": [248046, EOS_TOKEN_ID],
                                          "pad_token_id": EOS_TOKEN_ID, "temperature": 0.6,
                                          "top_k": 20, "top_p": 0.95}, indent=2) + "\n",
    "tokenizer_config.json": '{"model_max_length": 262144, "tokenizer_class": "Qwen2Tokenizer"}\n',
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
    "vocab.json": "{}\n",
    "merges.txt": "#version: 0.2\n",
    "chat_template.jinja": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                           "<|im_end|>\n{% endfor %}\n",
    "README.md": "Synthetic Qwen3.5-shaped checkpoint made by gdnfuse.\n",
    "LICENSE": "Apache-2.0 (synthetic weights)\n",
}  # fmt: skip
"""Side files a release carries (the tokenizer is a stand-in: no test tokenizes text)."""
VISION_SIDE_FILES: dict[str, str] = {
    "preprocessor_config.json": json.dumps({
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
        "image_processor_type": "Qwen2VLImageProcessorFast"}, indent=2) + "\n",
    "video_preprocessor_config.json": json.dumps({
        "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
        "video_processor_type": "Qwen3VLVideoProcessor"}, indent=2) + "\n",
}  # fmt: skip
"""The image and video processor configs of a vision-language release."""


def write_checkpoint(
    out: str | os.PathLike[str],
    shape: ModelShape | str = "tiny",
    *,
    layers: int | None = None,
    dtype: str = "BF16",
    shard_bytes: int = 5 << 30,
    conditional: bool = True,
    seed: int = 0,
    fast: bool = False,
    sparse: bool = False,
    sort: bool = False,
    vocab: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a Qwen3.5-shaped checkpoint with an index and side files; returns its path.

    ``sort``: tensors of each shard in name order, as safetensors' own writer lays them out
    (so offsets are not block-aligned, as in released checkpoints). ``fast``: random bytes
    at disk speed (finite values, for benchmarks). ``sparse``:
    headers only, files truncated to full size with holes (for planning benchmarks of
    huge models; reading the data gives zeros). ``vocab``: another vocabulary size (the
    embeddings and lm_head of a 248k vocabulary dominate a checkpoint with few layers).
    ``progress(done, total)``: bytes written so far, of all.
    """
    m = PRESETS[shape] if isinstance(shape, str) else shape
    if layers is not None:
        m = replace(m, layers=layers)
    if vocab is not None:
        m = replace(m, vocab=vocab)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prefix = "model.language_model." if conditional else "model."
    tensors = list(tensor_shapes(m, prefix))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensors:
        n = _numel(shp) * DTYPE_BYTES[dtype]
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    everything = sum(_numel(shp) for _, shp in tensors) * DTYPE_BYTES[dtype]
    for i, shard in enumerate(shards):
        if sort:
            shard.sort()
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(n, dtype, s, _numel(s) * DTYPE_BYTES[dtype]) for n, s in shard]
        with open(root / fname, "wb") as f:
            f.write(encode_header(entries, {"format": "pt"}))
            if sparse:
                f.truncate(f.tell() + sum(e[3] for e in entries))
                weight_map.update((name, fname) for name, _ in shard)
                total += sum(e[3] for e in entries)
                continue
            for name, shp in shard:
                values = _numel(shp)
                if name.endswith(("A_log", "dt_bias", "norm.weight", "layernorm.weight")):
                    f.write(_constant_like(values, dtype, rng))
                elif fast:
                    _write_noise(f, values * DTYPE_BYTES[dtype], rng, DTYPE_BYTES[dtype])
                else:
                    f.write(random_bytes(values, dtype, rng))
                weight_map[name] = fname
                total += values * DTYPE_BYTES[dtype]
                if progress is not None:
                    progress(total, everything)
    (root / "config.json").write_text(json.dumps(config_for(m, dtype, conditional), indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2))
    vision = conditional and m.vision is not None
    for name, text in {**SIDE_FILES, **(VISION_SIDE_FILES if vision else {})}.items():
        (root / name).write_text(text)
    return root


_NOISE_POOL = 64 << 20


_FINITE = bytes(b & 0xBF for b in range(256))


def _write_noise(f: BinaryIO, nbytes: int, rng: random.Random, itemsize: int) -> None:
    """Random floats at disk speed: slices of one random pool at random offsets.

    The top exponent bit of every value is cleared (its most significant byte masked), so
    every bf16/f16/f32 value is finite with magnitude below 2: verify's numeric check on a
    benchmark checkpoint stays meaningful.
    """
    n = min(nbytes, _NOISE_POOL) + 4096
    pool = bytearray(rng.randbytes(n - n % itemsize))
    pool[itemsize - 1 :: itemsize] = pool[itemsize - 1 :: itemsize].translate(_FINITE)
    while nbytes:
        n = min(nbytes, _NOISE_POOL)
        start = rng.randrange(0, (len(pool) - n) // itemsize + 1) * itemsize
        f.write(memoryview(pool)[start : start + n])
        nbytes -= n


def embedding_bytes(m: ModelShape, dtype: str = "BF16") -> int:
    """Bytes of the input embeddings and the output head (vocab x hidden, twice)."""
    return 2 * m.vocab * m.hidden * DTYPE_BYTES[dtype]


def checkpoint_bytes(m: ModelShape, dtype: str = "BF16", conditional: bool = True) -> int:
    """Bytes of every tensor :func:`write_checkpoint` writes for ``m``."""
    prefix = "model.language_model." if conditional else "model."
    return sum(_numel(s) for _, s in tensor_shapes(m, prefix)) * DTYPE_BYTES[dtype]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _constant_like(n: int, dtype: str, rng: random.Random) -> bytes:
    """Positive values near 1 for norms, A_log and dt_bias (keeps the gates tame)."""
    f32 = array("f", (rng.uniform(0.5, 1.5) for _ in range(n))).tobytes()
    if dtype == "F32":
        return f32
    out = bytearray(2 * n)
    out[0::2], out[1::2] = f32[2::4], f32[3::4]
    return bytes(out)
