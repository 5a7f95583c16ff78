"""sglang: read from 0.5.23's loader code; its real loader runs here on CPU (loading only)."""

from gdnfuse.arch import Arch
from gdnfuse.engines.spec import GROUPED, PLAIN, EngineSpec, FamilyRule, Outcome, Target

SPEC = EngineSpec(
    name="sglang",
    label="sglang",
    version="0.5.23",
    evidence="run",
    families={
        "qwen3_5": FamilyRule(
            where="sglang/srt/models/qwen3_5.py: load_weights (stacked_params_mapping names end "
            "in a dot, so a fused name passes unmangled); srt/layers/linear.py: "
            "MergedColumnParallelLinear.weight_loader with shard id None splits the global "
            "tensor by output_sizes [key, key, value, value], then slices each rank",
            fused_rows=PLAIN,
            # srt/models/qwen3_5.py: packed_modules_mapping maps in_proj_ba to in_proj_b,
            # in_proj_a; srt/layers/quantization/utils.py: is_layer_skipped matches those
            fp8_ignore=frozenset({"split"}),
        ),
        "qwen3_next": FamilyRule(
            where="sglang/srt/models/qwen3_next.py: Qwen3NextGatedDeltaNet."
            "_make_packed_weight_loader (a fused tensor is sliced contiguously per rank) and "
            "fix_query_key_value_ordering (reads each rank's rows per key-head group)",
            split=Outcome.REFUSES,
            fused_rows=GROUPED,
            dense=Outcome.REFUSES,
            dense_reason="its Qwen3-Next builds every layer as MoE (num_experts = 0 fails)",
            # srt/configs/qwen3_next.py: Qwen3NextConfig(rope_theta=10000.0,
            # partial_rotary_factor=0.25) from the top level; srt/models/qwen3_next.py:
            # Qwen3NextAttention passes rope_parameters only as rope_scaling (run: the
            # harness compares the rotary cos_sin_cache buffers)
            rope_top_level=Outcome.MISREADS,
            # srt/models/qwen3_next.py: Qwen3NextForCausalLM.packed_modules_mapping has no
            # in_proj_ba entry, so is_layer_skipped matches the module's own (fused) name
            fp8_ignore=frozenset({"fused"}),
        ),
    },
    # Qwen3-Next names first: every engine that loads them reads them right. Qwen3.5 names
    # with plain rows are what sglang's qwen3_5.py reads, but transformers and TensorRT-LLM
    # would load them misread, so `choose` refuses that one (dense models).
    outputs=(Target(Arch.QWEN3_NEXT, GROUPED), Target(Arch.QWEN3_5, PLAIN)),
    refuse_hint="serve the source checkpoint: sglang fuses the split projections at load",
)
