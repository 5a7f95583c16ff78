"""Which source bytes each output tensor must hold, for ``gdnfuse verify --against``.

A ``--arch qwen3_5`` output keeps every name. A ``--arch qwen3-next`` output (config
``model_type`` ``qwen3_next``) renames the decoder (``model.language_model.*`` ->
``model.*``), leaves out the vision tower and cuts fused experts into per-expert tensors.
This module rebuilds that mapping from the *source's* headers alone, not through the
converter's planner (:mod:`gdnfuse.arch`), so a planner bug is a failed check rather than a
shared blind spot: the per-expert byte ranges follow from the fused tensors' own shapes and
transformers' convention (``gate_up_proj[j] = [gate_proj; up_proj]`` along rows, the
``qwen2_moe`` conversion mapping's ``MergeModulelist(dim=0), Concatenate(dim=1)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gdnfuse.arch import KEPT_TOP_LEVEL, TARGET_MODEL_TYPE, rope_of
from gdnfuse.checkpoint import CONFIG_NAME, Checkpoint
from gdnfuse.errors import GdnfuseError
from gdnfuse.model import ModelInfo, TensorRef
from gdnfuse.names import FUSED_EXPERTS, PER_EXPERT_GATE_UP, VISUAL_PREFIX
from gdnfuse.record import RECORD_KEY
from gdnfuse.safetensors_file import DTYPE_BYTES
from gdnfuse.verify.report import CheckResult, failed, outcome, passed
from gdnfuse.verify.structure import FusedCheckpoint

SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "rms_norm_eps",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size",
)  # fmt: skip
"""Source text-config fields a Qwen3-Next output must repeat: they fix shapes and numerics."""


@dataclass(frozen=True)
class Names:
    """Output name <-> source name. ``source_prefix`` None: the output keeps every name."""

    source_prefix: str | None

    @property
    def relabelled(self) -> bool:
        return self.source_prefix is not None

    def to_output(self, name: str) -> str:
        p = self.source_prefix
        if p is None or name.startswith(KEPT_TOP_LEVEL) or not name.startswith(p):
            return name
        return "model." + name[len(p) :]

    def to_source(self, name: str) -> str:
        p = self.source_prefix
        if p is None or name.startswith(KEPT_TOP_LEVEL) or not name.startswith("model."):
            return name
        return p + name[len("model.") :]


def names_for(ck: FusedCheckpoint, src_model: ModelInfo) -> Names:
    """The renaming an output of this ``model_type`` implies for a source of ``src_model``."""
    if ck.model.model_type == TARGET_MODEL_TYPE:
        return Names(src_model.layer_prefix)
    return Names(None)


@dataclass(frozen=True)
class Source:
    """Where one output tensor's bytes are: ``length`` bytes at ``offset`` into ``tensor``.

    ``what`` says which part (empty for a whole tensor); ``sibling`` is the part it is most
    likely confused with, ``(tensor, offset, what)`` (gate <-> up of the same expert).
    """

    tensor: str
    offset: int
    length: int
    shape: tuple[int, ...]
    what: str = ""
    sibling: tuple[str, int, str] | None = None


@dataclass(frozen=True)
class Expected:
    """Every output tensor the source implies (GDN-fused ones aside).

    ``required`` are those whose absence is a fault (a source tensor fused into a GDN
    projection, or a fused expert tensor, may also appear whole: other checks judge that);
    ``dropped`` the source tensors left out on purpose, with their byte counts.
    """

    tensors: Mapping[str, Source]
    required: frozenset[str]
    dropped: Mapping[str, int]
    split_experts: int


def expected_tensors(
    names: Names, tensors: Mapping[str, TensorRef], consumed: frozenset[str]
) -> Expected:
    """The output tensors of ``tensors`` under ``names``; ``consumed``: GDN-fused sources."""
    out: dict[str, Source] = {}
    required: set[str] = set()
    dropped: dict[str, int] = {}
    split = 0
    for name, ref in tensors.items():
        info = ref.info
        if names.relabelled and names.source_prefix != "model." and name.startswith(VISUAL_PREFIX):
            dropped[name] = info.nbytes
            continue
        out_name = names.to_output(name)
        out[out_name] = Source(name, 0, info.nbytes, tuple(info.shape), "", _sibling(name))
        if names.relabelled and (m := FUSED_EXPERTS.match(name)) and len(info.shape) == 3:
            pieces = _expert_pieces(names.to_output(m["base"]), m["kind"], name, ref)
            out.update(pieces)
            required |= set(pieces)
            split += 1
        elif name not in consumed:
            required.add(out_name)
    return Expected(out, frozenset(required), dropped, split)


def _sibling(name: str) -> tuple[str, int, str] | None:
    m = PER_EXPERT_GATE_UP.match(name)
    if not m:
        return None
    other = "up" if m["kind"] == "gate" else "gate"
    return f"{m['base']}{other}_proj.weight", 0, ""


def _expert_pieces(out_base: str, kind: str, name: str, ref: TensorRef) -> dict[str, Source]:
    """Per-expert tensors of ``gate_up_proj [E, 2I, H]`` or ``down_proj [E, H, I]``."""
    e, rows, cols = ref.info.shape
    item = DTYPE_BYTES[ref.info.dtype]
    slab = rows * cols * item
    if kind == "down_proj":
        return {
            f"{out_base}{j}.down_proj.weight": Source(
                name, j * slab, slab, (rows, cols), f"expert {j}"
            )  # fmt: skip
            for j in range(e)
        }
    half, inter = slab // 2, rows // 2
    out = {}
    for j in range(e):
        where = {
            "gate": (j * slab, f"expert {j} gate rows 0..{inter - 1}"),
            "up": (j * slab + half, f"expert {j} up rows {inter}..{rows - 1}"),
        }
        for part, other in (("gate", "up"), ("up", "gate")):
            offset, what = where[part]
            out[f"{out_base}{j}.{part}_proj.weight"] = Source(
                name, offset, half, (inter, cols), what, (name, *where[other])
            )
    return out


def check_arch_config(
    ck: FusedCheckpoint, src: Checkpoint, src_model: ModelInfo, expected: Expected
) -> list[CheckResult]:
    """``exact.config`` of a Qwen3-Next output: the config is rebuilt, not copied, so check
    the record's ``arch`` entry against the source and the fields that fix shapes/numerics."""
    name = "exact.config"
    record = ck.raw_record if isinstance(ck.raw_record, Mapping) else {}
    arch = record.get("arch")
    recorded = ck.raw_record is not None  # a Qwen3-Next checkpoint without one needs none
    if not isinstance(arch, Mapping) and recorded:
        return [
            failed(
                name,
                f'model_type is {TARGET_MODEL_TYPE} but the "{RECORD_KEY}" record has no "arch" '
                "entry saying what was relabelled",
                file=CONFIG_NAME,
            )
        ]
    fails: list[CheckResult] = []
    want: dict[str, Any] = {
        "target": TARGET_MODEL_TYPE,
        "source_model_type": src_model.model_type,
        "dropped_tensors": len(expected.dropped),
        "dropped_bytes": sum(expected.dropped.values()),
        "fused_expert_tensors_split": expected.split_experts,
    } if isinstance(arch, Mapping) else {}  # fmt: skip
    for key, value in want.items():
        assert isinstance(arch, Mapping)  # want is empty otherwise
        if arch.get(key) != value:
            fails.append(
                failed(
                    name,
                    f"record arch.{key} is {arch.get(key)!r}, the source implies {value!r}",
                    file=CONFIG_NAME,
                )
            )
    text = src.config.get("text_config") if src_model.text_config_key else src.config
    text = text if isinstance(text, Mapping) else {}
    for key in SHAPE_FIELDS:
        if key in text and ck.config.get(key) != text[key]:
            fails.append(
                failed(
                    name,
                    f"{key} is {ck.config.get(key)!r}, the source's text config has {text[key]!r}",
                    file=CONFIG_NAME,
                )
            )
    fails += _rope_fails(ck, text, name)
    entry = ("record arch entry agrees with the source" if want
             else "no gdnfuse record; compared with the source")  # fmt: skip
    return outcome(
        name,
        fails,
        f"rebuilt {TARGET_MODEL_TYPE} config: {entry} ({src_model.model_type}), shape fields "
        "and RoPE (base, rotary fraction, in rope_parameters and at the top level) equal the "
        "source's text config",
    )


def _rope_fails(ck: FusedCheckpoint, text: Mapping[str, Any], name: str) -> list[CheckResult]:
    """RoPE base and rotary fraction where each Qwen3-Next reader takes them (engines that
    predate ``rope_parameters`` read the top level, defaulting silently to 10,000 / 0.25)."""
    try:
        want = rope_of(text)
    except GdnfuseError:
        return []
    got_nested = ck.config.get("rope_parameters")
    got_nested = got_nested if isinstance(got_nested, Mapping) else {}
    fails = []
    for key in ("rope_theta", "partial_rotary_factor"):
        places = ((f"rope_parameters.{key}", got_nested.get(key)), (key, ck.config.get(key)))
        # Absent in one place (a config re-saved by transformers 5 has no top-level keys):
        # right for the readers of the other; the per-engine verdicts say who defaults then.
        # Absent in both: every reader takes its default.
        if all(got is None for _, got in places):
            fails.append(failed(name, f"{key} is stated nowhere (readers take their "
                                f"default); the source's RoPE has {want[key]!r}",
                                file=CONFIG_NAME))  # fmt: skip
        for where, got in places:
            if got is not None and got != want[key]:
                fails.append(failed(name, f"{where} is {got!r}, the source's RoPE has "
                                    f"{want[key]!r}", file=CONFIG_NAME))  # fmt: skip
    return fails


def dropped_result(expected: Expected) -> CheckResult:
    """The vision tensors left out on purpose, counted (never reported as missing)."""
    n, nbytes = len(expected.dropped), sum(expected.dropped.values())
    return passed(
        "exact.dropped",
        f"{n} source tensors ({nbytes:,} bytes) intentionally left out: the vision tower "
        f"({VISUAL_PREFIX}*), Qwen3-Next is text-only",
    )
