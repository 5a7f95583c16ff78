"""llama.cpp (convert_hf_to_gguf.py + its qwen3next graph): read, not run here."""

from gdnfuse.arch import Arch
from gdnfuse.engines.spec import GROUPED, EngineSpec, FamilyRule, Outcome, Target

SPEC = EngineSpec(
    name="llama.cpp",
    label="llama.cpp",
    version="master (read)",
    evidence="read",
    families={
        "qwen3_5": FamilyRule(
            where="convert_hf_to_gguf.py: Qwen3.5 model class (maps split tensor names)",
            fused_refusal="its converter maps Qwen3.5 tensors by their split names and stops "
            "at in_proj_qkvz (cannot map tensor)",
        ),
        "qwen3_next": FamilyRule(
            where="convert_hf_to_gguf.py: Qwen3NextModel; src/models/qwen3next.cpp",
            split=Outcome.REFUSES,
            fused_rows=GROUPED,
            dense=Outcome.REFUSES,
            dense_reason="its qwen3next expects MoE tensors and rejects dense MLP ones",
            needs_dk_eq_dv=True,
        ),
    },
    outputs=(Target(Arch.QWEN3_NEXT, GROUPED),),
    refuse_hint="convert the source with llama.cpp's own convert_hf_to_gguf.py",
)
