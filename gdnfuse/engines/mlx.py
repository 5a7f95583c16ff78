"""mlx-lm: read from 0.32.2's model code; it needs Apple silicon, so it cannot run here."""

from gdnfuse.arch import Arch
from gdnfuse.engines.spec import GROUPED, EngineSpec, FamilyRule, Outcome, Target

SPEC = EngineSpec(
    name="mlx",
    label="mlx-lm",
    version="0.32.2 (read)",
    evidence="read",
    families={
        "qwen3_5": FamilyRule(
            where="mlx_lm/models/qwen3_5.py: split modules only, strict load_weights",
            fused_refusal="has only split modules and loads strictly (unexpected keys)",
        ),
        "qwen3_next": FamilyRule(
            where="mlx_lm/models/qwen3_next.py: Model.sanitize",
            split=Outcome.REFUSES,
            fused_rows=GROUPED,
            dense=Outcome.MISREADS,
            dense_reason="sanitize returns early without MoE tensors, skipping the conv1d axis "
            "move and the +1 norm shift",
        ),
    },
    outputs=(Target(Arch.QWEN3_NEXT, GROUPED),),
    refuse_hint="convert the source with mlx-lm itself (its qwen3_5 module loads split "
    "projections)",
)
