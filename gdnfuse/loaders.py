"""Who can load a checkpoint on disk: per engine, loads correctly / refuses / would misread.

Works on any checkpoint directory: a split Qwen3.5 source, a gdnfuse output (stamped or
made for an engine), or a fused checkpoint from elsewhere (Qwen3-Next, or Qwen3.5 names
without a layout record, whose rows nobody can know). Reads config.json, the index and the
shard headers only; the rules themselves are :mod:`gdnfuse.engines`'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gdnfuse import engines
from gdnfuse.checkpoint import CONFIG_NAME, INDEX_NAME, list_files, load_json, require_dir
from gdnfuse.engines import Facts, Rows, Verdict
from gdnfuse.errors import GdnfuseError
from gdnfuse.fusion import ConversionPlan
from gdnfuse.layout import GdnDims
from gdnfuse.model import OUTPUT_FAMILIES, describe_config
from gdnfuse.record import RECORD_KEY, parse_record, unstamp_config
from gdnfuse.safetensors_file import read_header


def read_facts(root: str | os.PathLike[str], rows: Rows | None = None) -> Facts:
    """The :class:`~gdnfuse.engines.Facts` of the checkpoint in ``root``; ``rows``: the fused
    row order when known otherwise (found against the source), instead of the record's."""
    root = Path(root).expanduser()
    require_dir(root)
    config = load_json(root / CONFIG_NAME)
    if not isinstance(config, dict):
        raise GdnfuseError("config is not a JSON object", path=str(root / CONFIG_NAME))
    return facts_of(config, _tensor_names(root), str(root / CONFIG_NAME), rows)


def facts_of(config: dict[str, Any], tensor_names: list[str], path: str = CONFIG_NAME,
             rows: Rows | None = None) -> Facts:  # fmt: skip
    """Facts from a config.json and the tensor names a loader will find."""
    model = describe_config(unstamp_config(config), path,
                            families=OUTPUT_FAMILIES)  # fmt: skip
    rows = rows or _rows(config, model.dims)
    return engines.facts(config, tensor_names, model.dims, rows)


def plan_facts(cplan: ConversionPlan) -> Facts:
    """Facts of what a plan will write (for ``--dry-run``): its config.json and index."""
    files = {f.name: f.prefix for f in cplan.plan.files if f.last}
    config = json.loads(files[CONFIG_NAME])
    return facts_of(config, list(json.loads(files[INDEX_NAME])["weight_map"]))


def _tensor_names(root: Path) -> list[str]:
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError):
            weight_map = None
        if isinstance(weight_map, dict):
            return list(weight_map)
    return [t.name for f in list_files(root) if f.endswith(".safetensors")
            for t in read_header(root / f).tensors]  # fmt: skip


def _rows(config: dict[str, Any], dims: GdnDims) -> Rows | None:
    """The fused row order the layout record states (the one strict reader of it)."""
    record, _ = parse_record(config.get(RECORD_KEY), dims)
    return None if record is None else Rows(record.layout, record.tp)


def verdicts(root: str | os.PathLike[str]) -> dict[str, Verdict]:
    """Every engine's verdict on the checkpoint in ``root``."""
    return engines.judge_all(read_facts(root))


def to_json(found: dict[str, Verdict]) -> dict[str, dict[str, str]]:
    specs = {s.name: s for s in engines.ENGINES}
    return {
        name: {"outcome": str(v.outcome), "reason": v.reason, "engine": specs[name].label,
               "version": specs[name].version, "evidence": specs[name].evidence}
        for name, v in found.items()
    }  # fmt: skip
