"""mlx-lm: read from 0.32.2's model code and run here on mlx's Linux CPU build (mlx[cpu])."""

from gdnfuse.arch import Arch
from gdnfuse.engines.spec import GROUPED, EngineSpec, FamilyRule, Outcome, Target

SPEC = EngineSpec(
    name="mlx",
    label="mlx-lm",
    version="0.32.2 (run, mlx[cpu] 0.32.4)",
    evidence="run",
    families={
        "qwen3_5": FamilyRule(
            where="mlx_lm/models/qwen3_5.py: split modules only, strict load_weights",
            fused_refusal="has only split modules and loads strictly (unexpected keys)",
            # run: "Model type qwen3_5_text not supported"; its Qwen3.5 MoE sanitize expects
            # experts.gate_up_proj (stacked), and the strict load refuses per-expert tensors
            text_types=Outcome.REFUSES,
            per_expert_moe=Outcome.REFUSES,
        ),
        "qwen3_next": FamilyRule(
            where="mlx_lm/models/qwen3_next.py: Model.sanitize",
            split=Outcome.REFUSES,
            fused_rows=GROUPED,
            # A loud failure, not a misread: without the axis move, conv1d's (C, 1, K) weight
            # fails the strict shape check of mlx/nn/layers/base.py: Module.load_weights
            # against mlx's (C, K, 1), for every kernel size K > 1 (released models: 4).
            dense=Outcome.REFUSES,
            dense_reason="its ModelArgs require the MoE fields, and Model.sanitize returns "
            "early without per-expert MoE tensors (mtp.* kept, conv1d in torch's axis order): "
            "the strict load raises",
            # mlx_lm/models/qwen3_next.py: ModelArgs requires rope_theta and
            # partial_rotary_factor (and intermediate_size) at the top level: TypeError
            rope_top_level=Outcome.REFUSES,
        ),
    },
    outputs=(Target(Arch.QWEN3_NEXT, GROUPED),),
    refuse_hint="convert the source with mlx-lm itself (its qwen3_5 module loads split "
    "projections)",
)
