"""Hugging Face transformers: read from 5.25's model classes and run by the tests (5.25, and
4.57.6 for Qwen3-Next outputs: it has Qwen3-Next but not Qwen3.5)."""

from gdnfuse.arch import Arch
from gdnfuse.engines.spec import GROUPED, EngineSpec, FamilyRule, Outcome, Target

SPEC = EngineSpec(
    name="transformers",
    label="transformers",
    version="5.25 (run; 4.57.6 run on Qwen3-Next)",
    evidence="run",
    families={
        "qwen3_5": FamilyRule(
            where="transformers/models/qwen3_5/modeling_qwen3_5.py: Qwen3_5GatedDeltaNet has "
            "only the split linears",
            fused_unsupported=Outcome.MISREADS,
            # quantizers/quantizers_utils.py: should_convert_module matches modules_to_not_convert
            # against module names: the split linears here, the fused in_proj_ba in Qwen3-Next
            fp8_ignore=frozenset({"split"}),
            fused_refusal="fused tensors are unexpected keys and in_proj_qkv/z/b/a are "
            "randomly initialised (only a warning)",
        ),
        "qwen3_next": FamilyRule(
            where="transformers/models/qwen3_next/modeling_qwen3_next.py: "
            "Qwen3NextGatedDeltaNet.fix_query_key_value_ordering",
            split=Outcome.MISREADS,
            fused_rows=GROUPED,
            fp8_ignore=frozenset({"fused"}),
        ),
    },
    outputs=(Target(Arch.QWEN3_NEXT, GROUPED),),
    refuse_hint="load the source checkpoint",
)
