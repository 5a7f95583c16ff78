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
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from gdnfuse.checkpoint import INDEX_NAME
from gdnfuse.safetensors_file import DTYPE_BYTES, encode_header


@dataclass(frozen=True)
class ModelShape:
    """The dims of a Qwen3.5 text model that decide tensor shapes."""

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


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=64, layers=4, nk=4, nv=12, dk=16, dv=16, intermediate=128,
                       heads=4, kv_heads=2, head_dim=16, vocab=256),
    "qwen3.5-0.8b": ModelShape(1024, 24, 16, 16, intermediate=3584, heads=8, vocab=248320),
    "qwen3.5-9b": ModelShape(4096, 32, 16, 32, intermediate=12288, vocab=248320),
    "qwen3.5-27b": ModelShape(5120, 64, 16, 48, intermediate=17408, heads=24, kv_heads=4,
                              vocab=248320),
    "qwen3.5-35b-a3b": ModelShape(2048, 40, 16, 32, experts=256, moe_intermediate=512,
                                  vocab=248320),
    "qwen3.5-397b-a17b": ModelShape(4096, 60, 16, 64, experts=512, moe_intermediate=1024,
                                    heads=32, vocab=248320),
}  # fmt: skip


def tensor_shapes(
    m: ModelShape, prefix: str = "model.language_model."
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen3.5 language model, in a natural order."""
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
            sa = p + "self_attn."
            yield sa + "q_proj.weight", (2 * m.heads * m.head_dim, m.hidden)
            yield sa + "k_proj.weight", (m.kv_heads * m.head_dim, m.hidden)
            yield sa + "v_proj.weight", (m.kv_heads * m.head_dim, m.hidden)
            yield sa + "o_proj.weight", (m.hidden, m.heads * m.head_dim)
            yield sa + "q_norm.weight", (m.head_dim,)
            yield sa + "k_norm.weight", (m.head_dim,)
        yield p + "post_attention_layernorm.weight", (m.hidden,)
        if m.experts:
            mp = p + "mlp."
            yield mp + "gate.weight", (m.experts, m.hidden)
            for j in range(m.experts):
                yield mp + f"experts.{j}.gate_proj.weight", (m.moe_intermediate, m.hidden)
                yield mp + f"experts.{j}.up_proj.weight", (m.moe_intermediate, m.hidden)
                yield mp + f"experts.{j}.down_proj.weight", (m.hidden, m.moe_intermediate)
            yield mp + "shared_expert.gate_proj.weight", (m.moe_intermediate, m.hidden)
            yield mp + "shared_expert.up_proj.weight", (m.moe_intermediate, m.hidden)
            yield mp + "shared_expert.down_proj.weight", (m.hidden, m.moe_intermediate)
            yield mp + "shared_expert_gate.weight", (1, m.hidden)
        else:
            yield p + "mlp.gate_proj.weight", (m.intermediate, m.hidden)
            yield p + "mlp.up_proj.weight", (m.intermediate, m.hidden)
            yield p + "mlp.down_proj.weight", (m.hidden, m.intermediate)
    yield f"{prefix}norm.weight", (m.hidden,)
    yield "lm_head.weight", (m.vocab, m.hidden)


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
    text = {
        "model_type": "qwen3_5_moe_text" if m.experts else "qwen3_5_text",
        "hidden_size": m.hidden, "num_hidden_layers": m.layers,
        "linear_num_key_heads": m.nk, "linear_num_value_heads": m.nv,
        "linear_key_head_dim": m.dk, "linear_value_head_dim": m.dv,
        "linear_conv_kernel_dim": m.conv, "full_attention_interval": m.interval,
        "layer_types": ["linear_attention" if (i + 1) % m.interval else "full_attention"
                        for i in range(m.layers)],
        "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim, "vocab_size": m.vocab, "rms_norm_eps": 1e-6,
        "dtype": {"BF16": "bfloat16", "F32": "float32"}[dtype],
    }  # fmt: skip
    if m.experts:
        text.update(num_experts=m.experts, num_experts_per_tok=8,
                    moe_intermediate_size=m.moe_intermediate,
                    shared_expert_intermediate_size=m.moe_intermediate)  # fmt: skip
    else:
        text["intermediate_size"] = m.intermediate
    if not conditional:
        return {"architectures": ["Qwen3_5MoeForCausalLM" if m.experts else "Qwen3_5ForCausalLM"],
                **text}  # fmt: skip
    family = "qwen3_5_moe" if m.experts else "qwen3_5"
    arch = "Qwen3_5MoeForConditionalGeneration" if m.experts else "Qwen3_5ForConditionalGeneration"
    return {"architectures": [arch], "model_type": family, "text_config": text}


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
) -> Path:
    """Write a Qwen3.5-shaped checkpoint with an index and side files; returns its path.

    ``sort``: tensors of each shard in name order, as safetensors' own writer lays them out
    (so offsets are not block-aligned, as in released checkpoints). ``fast``: random bytes
    at disk speed (finite values, for benchmarks). ``sparse``:
    headers only, files truncated to full size with holes (for planning benchmarks of
    huge models; reading the data gives zeros).
    """
    m = PRESETS[shape] if isinstance(shape, str) else shape
    if layers is not None:
        m = replace(m, layers=layers)
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
    weight_map, total = {}, 0
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
    (root / "config.json").write_text(json.dumps(config_for(m, dtype, conditional), indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (root / "generation_config.json").write_text('{"do_sample": false}\n')
    (root / "tokenizer_config.json").write_text('{"model_max_length": 262144}\n')
    (root / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (root / "chat_template.jinja").write_text("{{ messages }}\n")
    (root / "README.md").write_text("Synthetic Qwen3.5-shaped checkpoint made by gdnfuse.\n")
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
