"""TensorRT-LLM (PyTorch backend): read from its loader code at main; it cannot run here."""

from gdnfuse.arch import Arch
from gdnfuse.engines.spec import GROUPED, EngineSpec, FamilyRule, Target

SPEC = EngineSpec(
    name="trtllm",
    label="TensorRT-LLM",
    version="main (PyTorch backend, read)",
    evidence="read",
    families={
        "qwen3_5": FamilyRule(
            where="tensorrt_llm/_torch/models/checkpoints/hf/qwen3_5_weight_mapper.py: "
            "_SPLIT_PROJ_PATTERN needs a dot after the short name, so fused tensors pass "
            "through and are permuted as grouped rows by qwen3_next_weight_mapper.py: "
            "grouped_to_dense_in_proj_qkvz_perm",
            fused_rows=GROUPED,
        ),
        "qwen3_next": FamilyRule(
            where="tensorrt_llm/_torch/models/checkpoints/hf/qwen3_next_weight_mapper.py "
            "(num_experts = 0 builds a dense MLP)",
            fused_rows=GROUPED,
        ),
    },
    # Qwen3-Next names. Qwen3.5 names with grouped rows also load correctly in TensorRT-LLM,
    # but sglang and transformers would misread them, so `choose` refuses that one.
    outputs=(Target(Arch.QWEN3_NEXT, GROUPED), Target(Arch.QWEN3_5, GROUPED)),
    refuse_hint="serve the source checkpoint",
)
