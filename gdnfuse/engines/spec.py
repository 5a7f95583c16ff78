"""The shape of engine knowledge: what a loader does with a checkpoint, as data.

No engine reads gdnfuse's layout record; each fixes the row order of fused GDN tensors by
its model class. So an engine is described by a few rules per model family (which names
it knows, which row order it reads fused tensors in, whether it builds dense models,
which quantization ignore-list names it matches), and the same pure function
(:meth:`EngineSpec.judge`) answers for every engine and every checkpoint: loads
correctly, refuses loudly, or loads and computes something else (misreads).

The per-engine descriptions live beside this module, one small module each; nothing
outside :mod:`gdnfuse.engines` knows an engine's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from gdnfuse.arch import Arch
from gdnfuse.layout import BA, QKVZ, GdnDims, Layout, coalesce, fused_runs


class Outcome(StrEnum):
    LOADS = "loads"
    """Loads and computes what the source computes."""
    REFUSES = "refuses"
    """Raises at load (a loud, safe failure)."""
    MISREADS = "misreads"
    """Loads without error and computes something else: the failure gdnfuse exists to prevent."""
    UNKNOWN = "unknown"
    """Depends on facts the checkpoint does not state (fused rows without a layout record)."""


@dataclass(frozen=True)
class Rows:
    """A row order of the fused tensors: ``layout`` with ``tp`` (``tp`` matters for tp-blocked)."""

    layout: Layout
    tp: int = 1

    def __str__(self) -> str:
        if self.tp == 0:
            return "no known order (found against the source)"
        if self.layout is Layout.TP_BLOCKED:
            return "plain [Q;K;V;Z]" if self.tp == 1 else f"tp-blocked T={self.tp}"
        return "qwen3-next (per key-head group)"


GROUPED = Rows(Layout.QWEN3_NEXT)
PLAIN = Rows(Layout.TP_BLOCKED, 1)
NO_KNOWN_ORDER = Rows(Layout.TP_BLOCKED, 0)
"""Fused rows that match none of the known orders of their source: every reader misreads."""


def same_rows(dims: GdnDims, a: Rows, b: Rows) -> bool:
    """Whether two row orders put every row at the same place for these dims.

    They can coincide (``nk / T == 1`` makes tp-blocked equal qwen3-next; ``nk == 1`` makes
    all equal), so compare the row runs themselves rather than the names.
    """
    if NO_KNOWN_ORDER in (a, b):
        return False

    def runs(f: str, r: Rows) -> tuple:
        return coalesce(fused_runs(f, dims, r.layout, r.tp))

    return all(runs(f, a) == runs(f, b) for f in (QKVZ, BA))


@dataclass(frozen=True)
class Facts:
    """What a loader sees of a checkpoint's GDN layers (built by :func:`gdnfuse.engines.facts`).

    ``family``: ``qwen3_5`` or ``qwen3_next`` by model_type, else the model_type itself
    (which no engine knows: a stamped gdnfuse output). ``rows``: the fused row order, None
    when split or when nothing records it. ``fp8_ignore``: the name forms (``split``,
    ``fused``) of in_proj_b/a in the quantization ignore lists; None when not FP8.
    """

    family: str
    fused: bool
    rows: Rows | None
    moe: bool
    dims: GdnDims
    fp8_ignore: frozenset[str] | None = None
    rope_nested_only: bool = False
    """RoPE base or rotary fraction stated only in ``rope_parameters``, differing from the
    defaults (10,000 and 0.25) that readers of the top-level keys fall back to."""
    text_model_type: bool = False
    """A text-only model type (``qwen3_5_text``, ``qwen3_5_moe_text``), not the released
    ConditionalGeneration one."""
    per_expert: bool = False
    """MoE experts of the decoder layers stored one tensor per expert (not stacked)."""


@dataclass(frozen=True)
class FamilyRule:
    """How one engine loads one model family (``qwen3_5`` or ``qwen3_next`` model types)."""

    where: str
    """File and function the rule was read from (or run against)."""
    split: Outcome = Outcome.LOADS
    fused_rows: Rows | None = None
    """The order it reads fused tensors in (TP-invariant for the engines here: they split the
    global tensor, or slice whole key-head groups); None: it refuses fused tensors."""
    fused_refusal: str = ""
    fused_unsupported: Outcome = Outcome.REFUSES
    """What it does with fused tensors when ``fused_rows`` is None (transformers: random init)."""
    dense: Outcome = Outcome.LOADS
    dense_reason: str = ""
    needs_dk_eq_dv: bool = False
    fp8_ignore: frozenset[str] | None = None
    """Name forms of in_proj_b/a (``split``, ``fused``) its FP8 ignore-list matching honours
    for this family; None: the engine's default (:attr:`EngineSpec.fp8_ignore`)."""
    text_types: Outcome = Outcome.LOADS
    """What it does with the text-only model types of the family."""
    per_expert_moe: Outcome = Outcome.LOADS
    """What it does with per-expert MoE tensors (when it only knows stacked ones)."""
    rope_top_level: Outcome = Outcome.LOADS
    """What it does when the RoPE base/fraction is only in ``rope_parameters`` (it reads the
    top-level ``rope_theta`` / ``partial_rotary_factor``): misread with its defaults, or
    refuse (a required field)."""


@dataclass(frozen=True)
class Target:
    """An output gdnfuse can write: architecture names plus fused row order."""

    arch: Arch
    rows: Rows

    def __str__(self) -> str:
        names = "Qwen3-Next names" if self.arch is Arch.QWEN3_NEXT else (
            "Qwen3.5 names")  # fmt: skip
        return f"{names}, {self.rows} rows"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its rules per family, and the outputs to write for it, best first."""

    name: str
    """The ``--engine`` value."""
    label: str
    version: str
    """Release whose loader code the rules were read from."""
    evidence: str
    """``run`` when tests load outputs in the real engine here, else ``read``."""
    families: dict[str, FamilyRule]
    outputs: tuple[Target, ...]
    """What ``--engine`` writes: the first of these that :meth:`judge` says loads."""
    refuse_hint: str
    """What to do instead when no output of :attr:`outputs` loads (one clause)."""
    fp8_ignore: frozenset[str] = field(default=frozenset({"split", "fused"}))
    """Name forms of a packed module its quantization ignore-list matching honours."""

    def judge(self, f: Facts) -> Verdict:
        rule = self.families.get(f.family)
        if rule is None:
            return Verdict(Outcome.REFUSES, f"does not know model_type {f.family!r}")
        if not f.moe and rule.dense is not Outcome.LOADS:
            return Verdict(rule.dense, rule.dense_reason)
        if rule.needs_dk_eq_dv and f.dims.dk != f.dims.dv:
            return Verdict(Outcome.REFUSES, "needs linear_key_head_dim == linear_value_head_dim")
        forms = rule.fp8_ignore if rule.fp8_ignore is not None else self.fp8_ignore
        if f.fp8_ignore is not None and not f.fp8_ignore & forms:
            names = " or ".join("in_proj_b/in_proj_a" if x == "split" else "in_proj_ba"
                                for x in sorted(forms, reverse=True))  # fmt: skip
            return Verdict(
                Outcome.REFUSES,
                f"its {f.family} model matches FP8 ignore lists by {names}, which the config "
                "lacks: it would quantize the bf16 in_proj_ba (its block size check raises)",
            )
        if f.text_model_type and rule.text_types is not Outcome.LOADS:
            return Verdict(rule.text_types, f"does not support the text-only {f.family} model "
                           "types (only the released ConditionalGeneration one)")  # fmt: skip
        if f.moe and f.per_expert and rule.per_expert_moe is not Outcome.LOADS:
            return Verdict(rule.per_expert_moe, "loads stacked MoE experts only (as released), "
                           "not one tensor per expert")  # fmt: skip
        if f.rope_nested_only and rule.rope_top_level is not Outcome.LOADS:
            return Verdict(rule.rope_top_level, "reads the RoPE base and rotary fraction at the "
                           "top level of config.json, which states them only in "
                           "rope_parameters (it would use 10,000 / 0.25)")  # fmt: skip
        if not f.fused:
            return Verdict(rule.split, "split projections" if rule.split is Outcome.LOADS else (
                "expects fused in_proj_qkvz/in_proj_ba"))  # fmt: skip
        if rule.fused_rows is None:
            return Verdict(rule.fused_unsupported, rule.fused_refusal)
        if f.rows is None:
            return Verdict(
                Outcome.UNKNOWN,
                f"reads fused rows as {rule.fused_rows}; no layout record says what these are",
            )
        if same_rows(f.dims, f.rows, rule.fused_rows):
            return Verdict(Outcome.LOADS, f"reads fused rows as {rule.fused_rows}")
        return Verdict(
            Outcome.MISREADS, f"reads fused rows as {rule.fused_rows}, these are {f.rows}"
        )
