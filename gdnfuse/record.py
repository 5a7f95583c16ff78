"""What gdnfuse writes into a checkpoint, in one place: the layout record and the stamp.

The record (``config.json["gdnfuse"]`` and ``gdnfuse.*`` keys in each rewritten shard's
``__metadata__``) says which row order the fused tensors hold, for which TP size, from which
source. The stamp replaces ``model_type`` / ``architectures`` with gdnfuse's own so that
engines which would misread an output refuse it instead; the record keeps what was replaced.
Pure data and functions: the planner writes through them, verify, inspect and the GPU check
read through them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gdnfuse.layout import GdnDims, Layout, valid_tp

RECORD_KEY = "gdnfuse"
"""Key of the layout record in config.json; shard metadata uses ``gdnfuse.<field>``."""
RECORD_FORMAT = 1
STAMP_KEY = "stamp"
"""In the record: the model_type and architectures the stamp replaced."""
STAMP_MODEL_TYPE = "gdnfuse_fused"
"""model_type of a stamped gdnfuse output (:func:`gdnfuse.engines.stamp_config`): unknown to
transformers' AutoConfig and so to every engine, which then refuse it loudly."""
STAMP_ARCH_PREFIX = "GdnfuseFused"
ARCH_MODEL_TYPES: dict[str, str] = {
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
}
"""transformers' architecture names of the Qwen3.5 families (to unstamp without a record)."""


@dataclass(frozen=True)
class Record:
    """The layout record that ``convert`` writes into config.json (valid for these dims)."""

    layout: Layout
    tp: int


def parse_record(raw: Any, dims: GdnDims) -> tuple[Record | None, str | None]:
    """The record, or why it is unusable."""
    if raw is None:
        return None, (
            f'config.json has no "{RECORD_KEY}" layout record, so no consumer can tell which '
            "layout the fused tensors hold"
        )
    if not isinstance(raw, Mapping):
        return None, f'"{RECORD_KEY}" in config.json is not an object'
    if raw.get("format") != RECORD_FORMAT:
        return None, f"record format {raw.get('format')!r} is not {RECORD_FORMAT}"
    if raw.get("layout") not in {str(x) for x in Layout}:
        return None, f"record layout {raw.get('layout')!r} is not one of {[str(x) for x in Layout]}"
    tp = raw.get("tp")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1 or dims.nk % tp:
        return None, (
            f"record tp {tp!r} does not divide linear_num_key_heads={dims.nk} "
            f"(valid: {valid_tp(dims.nk)})"
        )
    return Record(Layout(raw["layout"]), tp), None


def stamp_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rename model_type and architectures to gdnfuse's own (the config, and what it replaced).

    transformers' AutoConfig raises on an unknown model_type, and vLLM, sglang, TensorRT-LLM
    and mlx-lm all pick their model by it (or by architectures): each refuses with an error
    naming the model type, where the unstamped output would load with misread rows.
    """
    was = {"model_type": config.get("model_type"), "architectures": config.get("architectures")}
    out = dict(config)
    out["model_type"] = STAMP_MODEL_TYPE
    out["architectures"] = [STAMP_ARCH_PREFIX + a for a in (config.get("architectures") or [])]
    return out, was


def unstamp_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stamped config as the source declared it (model_type, architectures restored)."""
    out = dict(config)
    if out.get("model_type") != STAMP_MODEL_TYPE:
        return out
    record = out.get(RECORD_KEY)
    was = record.get(STAMP_KEY) if isinstance(record, Mapping) else None
    if not isinstance(was, Mapping):  # record lost: the architectures still say what it was
        archs = [a.removeprefix(STAMP_ARCH_PREFIX) for a in out.get("architectures") or []
                 if isinstance(a, str)]  # fmt: skip
        was = {"model_type": next((ARCH_MODEL_TYPES[a] for a in archs if a in ARCH_MODEL_TYPES),
                                  STAMP_MODEL_TYPE), "architectures": archs}  # fmt: skip
    out["model_type"] = was.get("model_type")
    if was.get("architectures") is None:
        out.pop("architectures", None)
    else:
        out["architectures"] = was.get("architectures")
    return out
