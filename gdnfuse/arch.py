"""``--arch qwen3-next``: re-label a Qwen3.5 language model as a Qwen3-Next checkpoint.

With the GDN projections fused in the ``qwen3-next`` layout, a Qwen3.5 text model *is* a
Qwen3-Next model up to names (docs/layouts.md sections 4, 5 and 8): the attention (with output
gate), the zero-centred RMSNorms, the MoE block (softmax top-k with normalised weights,
sigmoid-gated shared expert) and the dense MLP are the same modules, and for text-only
positions Qwen3.5's MRoPE equals plain partial RoPE. So every engine that runs Qwen3-Next
can run Qwen3.5's language model once the checkpoint says ``qwen3_next``.

This module only plans names and byte ranges (pure, no I/O, no torch): which source tensor
becomes which output tensors (:class:`Piece`), and the new config.json. The fusion planner
(:func:`gdnfuse.fusion.plan_conversion`) applies it to every tensor it writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gdnfuse.errors import GdnfuseError, option
from gdnfuse.model import FAMILIES, ModelInfo, TensorRef
from gdnfuse.names import FUSED_EXPERTS, OTHER_EXPERT_TENSOR, VISUAL_PREFIX
from gdnfuse.quant import IGNORE_LISTS
from gdnfuse.safetensors_file import DTYPE_BYTES


class Arch(StrEnum):
    """Architecture the output checkpoint declares."""

    QWEN3_5 = "qwen3.5"
    """Keep the source's Qwen3.5 names and config; only the GDN projections change."""
    QWEN3_NEXT = "qwen3-next"
    """A text-only ``Qwen3NextForCausalLM`` checkpoint (requires the ``qwen3-next`` layout)."""

    @classmethod
    def _missing_(cls, value: object) -> Arch | None:
        """Spellings with ``_`` or ``-`` (``qwen3_5``, ``qwen3-5``, ``qwen3_next``) are the same."""
        if isinstance(value, str):
            key = value.lower().replace("_", "-").replace(".", "-")
            for member in cls:
                if member.value.replace(".", "-") == key:
                    return member
        return None


TARGET_MODEL_TYPE = "qwen3_next"
TARGET_ARCHITECTURE = "Qwen3NextForCausalLM"
KEPT_TOP_LEVEL = ("lm_head.", "mtp.")
LAYER_KINDS = ("linear_attention", "full_attention")

# Fused experts as transformers keeps them in memory (and some checkpoints on disk).

# Qwen3.5 defaults (transformers 5.24 configuration_qwen3_5*.py) for fields whose Qwen3-Next
# default differs: a config that omits one of them must not silently take Qwen3-Next's value.
_QWEN3_5_DEFAULTS: dict[str, Any] = {
    "vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4,
}  # fmt: skip
_QWEN3_5_MOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40,
    "num_attention_heads": 16, "num_key_value_heads": 2, "num_experts_per_tok": 8,
    "num_experts": 256, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
}  # fmt: skip
_SHARED_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu", "max_position_embeddings": 32768, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "use_cache": True, "attention_bias": False, "attention_dropout": 0.0,
    "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "router_aux_loss_coef": 0.001, "output_router_logits": False,
}  # fmt: skip
_PASSTHROUGH = ("mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "pad_token_id",
                "bos_token_id", "eos_token_id", "mamba_ssm_dtype", "attn_output_gate",
                "max_window_layers", "use_sliding_window", "sliding_window")  # fmt: skip
"""Keys read by some Qwen3-Next reader that mean the same there (``mamba_ssm_dtype``: the
recurrent state's dtype, sglang's ``mamba2_state_dtype``; ``attn_output_gate``: sglang)."""
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")


@dataclass(frozen=True)
class Piece:
    """One output tensor cut from a source tensor: ``length`` bytes at ``offset`` into its data."""

    name: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class Relabel:
    """How the target architecture names what the source holds.

    ``pieces`` maps every source tensor that does not simply keep its bytes under
    :meth:`rename` to its output tensors (empty: left out). ``config`` is the new
    config.json (without the gdnfuse record); ``summary`` says what was done, for the
    record and the conversion summary.
    """

    source_prefix: str
    pieces: Mapping[str, tuple[Piece, ...]]
    config: Mapping[str, Any]
    summary: Mapping[str, Any]

    def rename(self, name: str) -> str:
        """Target name of a source tensor kept whole (the fused GDN tensors too)."""
        if name.startswith(self.source_prefix):
            return "model." + name[len(self.source_prefix) :]
        return name

    def outputs(self, name: str, shape: tuple[int, ...], nbytes: int) -> tuple[Piece, ...]:
        """Output tensors of source tensor ``name``, in order."""
        if name in self.pieces:
            return self.pieces[name]
        return (Piece(self.rename(name), shape, 0, nbytes),)


VISION_SIDE_FILES = ("preprocessor_config.json", "video_preprocessor_config.json",
                     "processor_config.json")  # fmt: skip
"""Side files only the vision tower uses (image and video processors): a text-only output
leaves them out, so that no processor loader offers images to a model that cannot see."""


def vision_tensors(tensors: Mapping[str, TensorRef], model: ModelInfo) -> dict[str, int]:
    """The vision tower's tensors (name -> bytes) of a ConditionalGeneration checkpoint."""
    if FAMILIES.get(model.model_type) == "model.":
        return {}
    return {n: r.info.nbytes for n, r in tensors.items() if n.startswith(VISUAL_PREFIX)}


def vision_side_files(names: Iterable[str], relabel: Relabel | None) -> list[str]:
    """The side files a text-only output leaves out (none when no vision tower is dropped)."""
    if relabel is None or not relabel.summary.get("dropped_tensors"):
        return []
    return sorted(n for n in names if n in VISION_SIDE_FILES)


def plan_relabel(
    tensors: Mapping[str, TensorRef],
    config: Mapping[str, Any],
    model: ModelInfo,
    *,
    text_only: bool = False,
) -> Relabel:
    """Plan the Qwen3-Next names of every tensor and its config; refuse what it cannot say.

    Qwen3-Next is text only: a vision tower is left out only when ``text_only`` says the
    user accepts an output that can no longer read images; otherwise a one-line refusal.
    """
    prefix = FAMILIES[model.model_type]
    vision = vision_tensors(tensors, model)
    if vision and not text_only:
        size = sum(vision.values())
        raise GdnfuseError(
            f"the source has a vision tower ({VISUAL_PREFIX}*: {len(vision)} tensors, "
            f"{size:,} bytes) and a Qwen3-Next checkpoint is text only, so this output "
            "could not read images. To serve images, serve the source (vLLM and sglang load "
            f"it as it is); to write the language model alone, add {option('text_only', True)}",
            path="config.json",
        )
    text = config["text_config"] if model.text_config_key else config
    moe = model.model_type in ("qwen3_5_moe", "qwen3_5_moe_text")
    pieces: dict[str, tuple[Piece, ...]] = {}
    dropped, dropped_bytes, split_experts = 0, 0, 0
    for name, ref in tensors.items():
        info = ref.info
        if name.startswith(VISUAL_PREFIX) and prefix != "model.":
            pieces[name] = ()
            dropped += 1
            dropped_bytes += info.nbytes
            continue
        if not (name.startswith(prefix) or name.startswith(KEPT_TOP_LEVEL)):
            raise GdnfuseError(
                f"tensor outside the language model ({prefix}*), lm_head, mtp and the vision "
                "tower: Qwen3-Next has no place for it",
                path=ref.file,
                tensor=name,
            )
        m = FUSED_EXPERTS.match(name)
        if m:
            pieces[name] = _split_experts(m["base"], m["kind"], ref, text, model, prefix)
            split_experts += 1
        elif OTHER_EXPERT_TENSOR.search(name):
            raise GdnfuseError(
                "fused expert tensor other than gate_up_proj/down_proj (e.g. quantization "
                "scales of fused experts) cannot be split per expert",
                path=ref.file,
                tensor=name,
            )
    _check_attention_gate(tensors, text, prefix)
    if moe and not any(".mlp.experts." in n for n in tensors):
        raise GdnfuseError("MoE config but no mlp.experts tensors", path="config.json")
    new_config = qwen3_next_config(config, model)
    summary = {
        "target": TARGET_MODEL_TYPE,
        "source_model_type": model.model_type,
        "dropped_tensors": dropped,
        "dropped_bytes": dropped_bytes,
        "dropped_reason": "vision tower (model.visual.*) left out on request: Qwen3-Next is "
        "text-only" if dropped else None,
        "experts": "split from fused gate_up_proj/down_proj" if split_experts else (
            "per expert" if moe else "dense MLP (num_experts=0, mlp_only_layers=all)"),
        "fused_expert_tensors_split": split_experts,
    }  # fmt: skip
    return Relabel(prefix, pieces, new_config, summary)


def _split_experts(
    base: str, kind: str, ref: TensorRef, text: Mapping[str, Any], model: ModelInfo, prefix: str
) -> tuple[Piece, ...]:
    """Per-expert tensors of ``gate_up_proj [E, 2I, H]`` (gate first, then up) or
    ``down_proj [E, H, I]``, as byte ranges (transformers' qwen2_moe conversion mapping
    concatenates ``[gate_proj; up_proj]`` along dim 1 of the stacked experts)."""
    info = ref.info
    e = _get(text, "num_experts", model)
    inter = _get(text, "moe_intermediate_size", model)
    h = model.hidden_size
    want = (e, 2 * inter, h) if kind == "gate_up_proj" else (e, h, inter)
    if tuple(info.shape) != want:
        raise GdnfuseError(
            f"fused experts of shape {list(info.shape)}, expected {list(want)} "
            f"(num_experts={e}, moe_intermediate_size={inter}, hidden_size={h})",
            path=ref.file,
            tensor=info.name,
        )
    item = DTYPE_BYTES[info.dtype]
    out_base = "model." + base[len(prefix) :] if base.startswith(prefix) else base
    if kind == "down_proj":
        size = h * inter * item
        return tuple(
            Piece(f"{out_base}{j}.down_proj.weight", (h, inter), j * size, size) for j in range(e)
        )
    half = inter * h * item
    return tuple(
        Piece(f"{out_base}{j}.{name}_proj.weight", (inter, h), j * 2 * half + k * half, half)
        for j in range(e)
        for k, name in enumerate(("gate", "up"))
    )


def _check_attention_gate(
    tensors: Mapping[str, TensorRef], text: Mapping[str, Any], prefix: str
) -> None:
    """Qwen3-Next always gates attention output (q_proj has 2x the query rows)."""
    if text.get("attn_output_gate", True) is not True:
        raise GdnfuseError(
            "attn_output_gate is false: Qwen3-Next always applies the attention output gate, "
            "so this model cannot be expressed as Qwen3-Next",
            path="config.json",
        )
    heads, head_dim = text.get("num_attention_heads"), text.get("head_dim", 256)
    for name, ref in tensors.items():
        if name.startswith(prefix) and name.endswith(".self_attn.q_proj.weight"):
            rows = ref.info.shape[0]
            if isinstance(heads, int) and rows != 2 * heads * head_dim:
                raise GdnfuseError(
                    f"q_proj has {rows} rows, Qwen3-Next needs 2 * num_attention_heads * "
                    f"head_dim = {2 * heads * head_dim} (queries and their output gate)",
                    path=ref.file,
                    tensor=name,
                )


def _get(text: Mapping[str, Any], key: str, model: ModelInfo) -> Any:
    moe = model.model_type in ("qwen3_5_moe", "qwen3_5_moe_text")
    defaults = {**_SHARED_DEFAULTS, **(_QWEN3_5_MOE_DEFAULTS if moe else _QWEN3_5_DEFAULTS)}
    return text.get(key, defaults.get(key))


def layer_types(text: Mapping[str, Any], layers: int) -> list[str]:
    """``layer_types``, or every ``full_attention_interval``-th layer full attention."""
    kinds = text.get("layer_types")
    if kinds is None:
        interval = text.get("full_attention_interval", 4)
        kinds = ["linear_attention" if (i + 1) % interval else "full_attention"
                 for i in range(layers)]  # fmt: skip
    bad = sorted({k for k in kinds if k not in LAYER_KINDS})
    if bad or len(kinds) != layers:
        raise GdnfuseError(
            f"layer_types {bad or kinds} cannot be expressed as Qwen3-Next (needs "
            f"{layers} entries of {', '.join(LAYER_KINDS)})",
            path="config.json",
        )
    return list(kinds)


def rope_of(text: Mapping[str, Any]) -> dict[str, Any]:
    """Plain partial RoPE with Qwen3.5's theta and factor (text-only MRoPE is exactly that)."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
        raise GdnfuseError(
            f"rope_parameters {rope!r} (per layer type) cannot be expressed as Qwen3-Next",
            path="config.json",
        )
    out = {k: v for k, v in rope.items() if k not in _MROPE_KEYS and k != "type"}
    out.setdefault("rope_type", rope.get("type", "default"))
    out.setdefault("rope_theta", text.get("rope_theta", 10_000.0))
    out.setdefault("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    return out


def qwen3_next_config(config: Mapping[str, Any], model: ModelInfo) -> dict[str, Any]:
    """A complete Qwen3NextConfig dict from a Qwen3.5 config (``text_config`` or top level).

    Every field is written out, so Qwen3-Next's own defaults (which differ from Qwen3.5's)
    never decide anything.
    """
    conditional = model.text_config_key is not None
    text = config["text_config"] if conditional else config
    moe = model.model_type in ("qwen3_5_moe", "qwen3_5_moe_text")
    layers = _get(text, "num_hidden_layers", model)
    out: dict[str, Any] = {
        "architectures": [TARGET_ARCHITECTURE],
        "model_type": TARGET_MODEL_TYPE,
    }
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", *_SHARED_DEFAULTS):  # fmt: skip
        out[key] = _get(text, key, model)
    out["layer_types"] = layer_types(text, layers)
    full = [i for i, k in enumerate(out["layer_types"]) if k == "full_attention"]
    if (
        full
        and all((i + 1) % (full[0] + 1) == 0 for i in full)
        and len(full) == layers // (full[0] + 1)
    ):
        out["full_attention_interval"] = full[0] + 1  # engines that predate layer_types read it
    rope = rope_of(text)
    out["rope_parameters"] = rope
    # Readers that predate rope_parameters take the base and rotary fraction from the top level
    # and default to 10,000 / 0.25 without a word: sglang 0.5.23's Qwen3NextConfig
    # (srt/configs/qwen3_next.py), transformers 4.57's Qwen3NextConfig, mlx-lm 0.32's
    # qwen3_next.ModelArgs (required fields). The same values in both places.
    out["rope_theta"] = rope["rope_theta"]
    out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if moe:
        out.update(
            num_experts=_get(text, "num_experts", model),
            num_experts_per_tok=_get(text, "num_experts_per_tok", model),
            moe_intermediate_size=_get(text, "moe_intermediate_size", model),
            shared_expert_intermediate_size=_get(text, "shared_expert_intermediate_size", model),
            norm_topk_prob=True,  # Qwen3.5-MoE's router always renormalises the top-k weights
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    else:
        out.update(
            num_experts=0,
            mlp_only_layers=list(range(layers)),
            decoder_sparse_step=1,
        )
    # Dense MLP width: used by dense layers only, yet a required field of mlx-lm's qwen3_next
    # ModelArgs, so MoE outputs carry it too. Qwen3.5-MoE configs have none; no MoE layer
    # reads it (mlp_only_layers is empty), so the shared expert's width stands in.
    out["intermediate_size"] = _get(text, "intermediate_size", model) if not moe else (
        text.get("intermediate_size") or out["shared_expert_intermediate_size"])  # fmt: skip
    # The ConditionalGeneration model ties by its top-level flag; a text-only one by its own.
    out["tie_word_embeddings"] = bool(
        (config if conditional else text).get("tie_word_embeddings", False)
    )
    for key in _PASSTHROUGH:
        if key in text:
            out[key] = text[key]
        elif key in config:
            out[key] = config[key]
    mtp = out.get("mtp_num_hidden_layers")
    if isinstance(mtp, int) and mtp > 0:
        # vLLM's Qwen3-Next MTP (config/speculative.py, models/qwen3_next_mtp.py) counts its
        # layers by this name; Qwen3.5 readers by mtp_num_hidden_layers.
        out["num_nextn_predict_layers"] = mtp
    dtype = text.get("dtype") or config.get("dtype") or config.get("torch_dtype")
    if dtype:
        out["dtype"] = dtype
    quant = config.get("quantization_config") or text.get("quantization_config")
    if isinstance(quant, Mapping):
        out["quantization_config"] = relabel_quantization_config(quant, FAMILIES[model.model_type])
    return out


def relabel_quantization_config(quant: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Module names in ignore lists under Qwen3-Next's prefix; vision entries left out."""
    out = dict(quant)
    vis = VISUAL_PREFIX.rstrip(".")
    for key in IGNORE_LISTS:
        names = quant.get(key)
        if not isinstance(names, list):
            continue
        new = []
        for n in names:
            if isinstance(n, str) and prefix != "model." and (n == vis or n.startswith(vis + ".")):
                continue
            if isinstance(n, str) and n.startswith(prefix):
                n = "model." + n[len(prefix) :]
            new.append(n)
        out[key] = new
    return out
