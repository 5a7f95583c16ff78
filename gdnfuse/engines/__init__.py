"""Which engine loads which checkpoint correctly: one home for that knowledge.

Each engine is a small declarative :class:`~gdnfuse.engines.spec.EngineSpec` in a module of
its own (``vllm``, ``sglang``, ``trtllm``, ``transformers``, ``mlx``, ``llama_cpp``). This
package turns a checkpoint into :class:`Facts` and asks every spec the same question, so
``convert --engine``, ``inspect``, the convert summary and the README table all come from
the same rules. The planner never sees an engine name: ``convert`` resolves ``--engine`` to
an architecture and a row order (:func:`choose`) before planning.

No engine reads gdnfuse's layout record, so an output that keeps Qwen3.5 names with fused
tensors and was not written for one engine is *stamped* (:func:`stamp_config`): its
``model_type`` and ``architectures`` become gdnfuse's own, which every engine refuses
loudly, instead of the sglang/TensorRT-LLM/transformers misreads its rows would get. The
rule behind both: no output gdnfuse writes is one that any engine here misreads
(:func:`misreaders`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gdnfuse.arch import Arch
from gdnfuse.engines import llama_cpp, mlx, sglang, transformers, trtllm, vllm
from gdnfuse.engines.spec import (
    GROUPED,
    NO_KNOWN_ORDER,
    PLAIN,
    EngineSpec,
    Facts,
    FamilyRule,
    Outcome,
    Rows,
    Target,
    Verdict,
    same_rows,
)
from gdnfuse.errors import GdnfuseError, option
from gdnfuse.layout import GdnDims, Layout
from gdnfuse.model import FAMILIES
from gdnfuse.names import EXPERT_KEY, FUSED_BA_MODULE, FUSED_EXPERTS, SPLIT_BA_MODULE
from gdnfuse.quant import IGNORE_LISTS
from gdnfuse.record import STAMP_MODEL_TYPE

__all__ = [
    "ENGINES",
    "GROUPED",
    "NO_KNOWN_ORDER",
    "PLAIN",
    "STAMP_MODEL_TYPE",
    "EngineSpec",
    "Facts",
    "FamilyRule",
    "Outcome",
    "Rows",
    "Target",
    "Verdict",
    "choose",
    "engine",
    "facts",
    "judge_all",
    "misreaders",
    "markdown_table",
    "same_rows",
]

ENGINES: tuple[EngineSpec, ...] = (
    vllm.SPEC, sglang.SPEC, trtllm.SPEC, transformers.SPEC, mlx.SPEC, llama_cpp.SPEC,
)  # fmt: skip
"""Every engine gdnfuse knows, in the order tables list them."""



def engine(name: str) -> EngineSpec:
    """The spec for an ``--engine`` value; a one-line error lists the valid ones."""
    for spec in ENGINES:
        if spec.name == name:
            return spec
    raise GdnfuseError(
        f"unknown engine {name!r}; choose one of {', '.join(s.name for s in ENGINES)}"
    )


def family(model_type: str) -> str:
    """``qwen3_5`` for every Qwen3.5 model type (engines treat them alike), else itself."""
    return "qwen3_5" if model_type in FAMILIES else model_type


def fp8_ignore_forms(config: Mapping[str, Any]) -> frozenset[str] | None:
    """Name forms (``split``, ``fused``) of in_proj_b/a in an FP8 config's ignore lists.

    ``split`` only where both ``in_proj_b`` and ``in_proj_a`` of one layer are listed: the
    engines skip a packed module only when every shard of it is listed (docs/layouts.md 4.1).
    """
    holders = [config, config.get("text_config") or {}]
    quants = [h.get("quantization_config") for h in holders if isinstance(h, Mapping)]
    quants = [q for q in quants if isinstance(q, Mapping)]
    if not quants:
        return None
    forms = set()
    halves: dict[str, set[str]] = {}
    for q in quants:
        for key in IGNORE_LISTS:
            for name in (q or {}).get(key) or []:
                if not isinstance(name, str):
                    continue
                if (m := SPLIT_BA_MODULE.search(name)) is not None:
                    halves.setdefault(name[: m.start()], set()).add(m.group()[-1])
                if FUSED_BA_MODULE.search(name):
                    forms.add("fused")
    if any(h == {"a", "b"} for h in halves.values()):
        forms.add("split")
    return frozenset(forms)


def facts(
    config: Mapping[str, Any],
    tensor_names: Iterable[str],
    dims: GdnDims,
    rows: Rows | None,
) -> Facts:
    """What a loader sees of a checkpoint.

    ``rows``: the fused row order from the layout record, None without one. A Qwen3-Next
    checkpoint without a record holds grouped rows by the format's definition.
    """
    fam = family(str(config.get("model_type")))
    names = list(tensor_names)
    fused = any(".linear_attn.in_proj_qkvz." in n for n in names)
    if fused and rows is None and fam == "qwen3_next":
        rows = GROUPED
    moe = any(".mlp.experts." in n for n in names)
    per_expert = any(EXPERT_KEY.match(n) and not n.startswith("mtp.")
                     and not FUSED_EXPERTS.match(n) for n in names)  # fmt: skip
    text_type = str(config.get("model_type")).endswith("_text")
    return Facts(fam, fused, rows if fused else None, moe, dims, fp8_ignore_forms(config),
                 rope_nested_only(config), text_type, per_expert)  # fmt: skip


def rope_nested_only(config: Mapping[str, Any]) -> bool:
    """RoPE base or rotary fraction only inside ``rope_parameters`` (of the model's own text
    fields), with values a top-level reader's defaults (10,000; 0.25) would get wrong."""
    text = config.get("text_config")
    fields = text if isinstance(text, Mapping) else config
    nested = fields.get("rope_parameters")
    if not isinstance(nested, Mapping):
        return False
    defaults = {"rope_theta": 10_000.0, "partial_rotary_factor": 0.25}
    return any(key not in fields and nested.get(key, value) != value
               for key, value in defaults.items())  # fmt: skip


def judge_all(f: Facts) -> dict[str, Verdict]:
    """Every engine's verdict on one checkpoint, by ``--engine`` name."""
    return {spec.name: spec.judge(f) for spec in ENGINES}


def target_facts(target: Target, source: Facts) -> Facts:
    """The facts of what gdnfuse would write for ``target`` from a split source."""
    fam = "qwen3_next" if target.arch is Arch.QWEN3_NEXT else "qwen3_5"
    fp8 = None if source.fp8_ignore is None else frozenset({"split", "fused"})
    # gdnfuse writes the RoPE fields at the top level too (arch.qwen3_next_config)
    return Facts(fam, True, target.rows, source.moe, source.dims, fp8)


def misreaders(f: Facts) -> list[str]:
    """The engines that would load this checkpoint without error and compute something else."""
    return [s.label for s in ENGINES if s.judge(f).outcome is Outcome.MISREADS]


def choose(spec: EngineSpec, source: Facts) -> Target:
    """The first of ``spec.outputs`` that the engine loads correctly from this source and
    that no engine misreads, or a one-line refusal saying why and what to do instead.

    "Misread by none" is checked here, for every engine, rather than trusted to each spec's
    list: an output written for one engine is still a checkpoint on disk that others load.
    """
    reasons = []
    for target in spec.outputs:
        f = target_facts(target, source)
        verdict = spec.judge(f)
        wrong = misreaders(f)
        if verdict.outcome is Outcome.LOADS and not wrong:
            return target
        why = verdict.reason if verdict.outcome is not Outcome.LOADS else (
            f"{', '.join(wrong)} would load it misread")  # fmt: skip
        reasons.append(f"{target}: {why}")
    kind = "MoE" if source.moe else "dense"
    raise GdnfuseError(
        f"{option('engine', spec.name)}: no output that {spec.label} serves correctly and no "
        f"engine misreads, for this {kind} model ({'; '.join(reasons)}); {spec.refuse_hint}"
    )


def markdown_table(rows: Iterable[tuple[str, Facts]]) -> str:
    """A Markdown table: one row per labelled checkpoint, one column per engine."""
    head = "| output | " + " | ".join(f"{s.label} ({s.evidence})" for s in ENGINES) + " |"
    lines = [head, "|" + " --- |" * (len(ENGINES) + 1)]
    for label, f in rows:
        cells = [spec.judge(f).outcome.value for spec in ENGINES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_rows(dims: GdnDims) -> list[tuple[str, Facts]]:
    """The checkpoints the README's engine table describes, for dims where layouts differ:
    what gdnfuse writes, the source, and the fused layouts it refuses to write unstamped."""
    out = []
    for moe in (True, False):
        kind = "MoE" if moe else "dense"
        out += [
            (f"the split source, {kind}", Facts("qwen3_5", False, None, moe, dims)),
            (f"default and `--layout tp-blocked` (stamped), {kind}",
             Facts(STAMP_MODEL_TYPE, True, GROUPED, moe, dims)),
            (f"`--arch qwen3-next` = every `--engine` output, {kind}",
             Facts("qwen3_next", True, GROUPED, moe, dims)),
            (f"never written: Qwen3.5 names, qwen3-next rows, unstamped, {kind}",
             Facts("qwen3_5", True, GROUPED, moe, dims)),
            (f"never written: Qwen3.5 names, plain rows, {kind}",
             Facts("qwen3_5", True, PLAIN, moe, dims)),
            (f"never written: Qwen3.5 names, tp-blocked T=2, unstamped, {kind}",
             Facts("qwen3_5", True, Rows(Layout.TP_BLOCKED, 2), moe, dims)),
        ]  # fmt: skip
    return out
