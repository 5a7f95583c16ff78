"""Tensor and module name patterns of Qwen3.5 / Qwen3-Next checkpoints, as data, in one place.

Every rule that recognises a name by its shape (a GDN projection, split or fused, a conv1d, an
expert, the vision tower, an ignore-list entry) is here; planner, verify, engine rules and the
GPU check import them. The tensors present are the truth (docs/layouts.md section 5): a layer
is a GDN layer because it holds these names, whatever its prefix (``mtp.`` too).
"""

from __future__ import annotations

import re

SPLIT_KEY = re.compile(r"^(?P<prefix>.*\.linear_attn\.)in_proj_(?P<part>qkv|z|b|a)\.(?P<leaf>.+)$")
"""A split GDN projection tensor (``...linear_attn.in_proj_qkv.weight``; not ``in_proj_qkvz``)."""
FUSED_KEY = re.compile(r"^(?P<prefix>.*\.linear_attn\.)in_proj_(?P<fused>qkvz|ba)\.(?P<leaf>.+)$")
"""A fused GDN projection tensor (``...linear_attn.in_proj_qkvz.weight``, FP8 scales too)."""
CONV_KEY = re.compile(r"^(?P<prefix>.*\.linear_attn\.)conv1d\.weight$")
"""A GDN layer's depthwise conv (present in every GDN layer, split or fused)."""
DECODER_GDN_LAYER = re.compile(r"^(?!mtp\.).*\blayers\.(\d+)\.linear_attn\.$")
"""A decoder (not MTP) GDN layer prefix, with its layer number."""
LAYER_NUMBER = re.compile(r"layers\.(\d+)\.linear_attn\.$")
"""The layer number of any GDN layer prefix (MTP layers are numbered from 0 too)."""

FUSED_EXPERTS = re.compile(r"^(?P<base>.*\.mlp\.experts\.)(?P<kind>gate_up_proj|down_proj)$")
"""Stacked experts as transformers 5 keeps them (and the released BF16 MoE stores them)."""
PER_EXPERT_GATE_UP = re.compile(
    r"^(?P<base>.*\.mlp\.experts\.\d+\.)(?P<kind>gate|up)_proj\.weight$"
)
"""One expert's gate or up projection."""
EXPERT_KEY = re.compile(
    r"^(?P<base>.*\.mlp\.experts\.)(?:\d+\.(?:gate|up|down)_proj\.|gate_up_proj$|down_proj$)"
)
"""Any expert tensor, per expert or stacked; ``base`` names the MoE layer's experts."""
OTHER_EXPERT_TENSOR = re.compile(r"\.mlp\.experts\.(?!\d+\.(gate_proj|up_proj|down_proj)\.)")
"""An experts tensor that is neither per expert nor a stacked gate_up/down (e.g. stacked
quantization scales)."""

VISUAL_PREFIX = "model.visual."
"""The vision tower of a ConditionalGeneration checkpoint."""

SPLIT_MODULE = re.compile(r"in_proj_(qkv|z|b|a)(?=$|\.)")
"""A split projection's module name in a quantization ignore list."""
SPLIT_BA_MODULE = re.compile(r"in_proj_[ba](?=$|\.)")
FUSED_BA_MODULE = re.compile(r"in_proj_ba(?=$|\.)")
"""in_proj_b / in_proj_a (split) and in_proj_ba (fused) in an ignore list."""
