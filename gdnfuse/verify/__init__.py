"""``gdnfuse verify``: prove a converted checkpoint right before it is deployed.

The worst converter failure is one that finishes and writes wrong weights: engines load them
without error and serve garbage. So verify runs three independent checks and reports each
fault by file and tensor (:class:`~gdnfuse.verify.report.VerifyReport`):

1. structure (:mod:`gdnfuse.verify.structure`): headers, index, total_size, no split key
   left, fused shapes, the layout record and shard metadata, the manifest's sizes/hashes;
2. exact, with ``against`` (:mod:`gdnfuse.verify.exact`): un-fused bytes equal the source
   bit for bit, every other tensor and side file is byte-identical (streamed, bounded memory);
3. numeric (:mod:`gdnfuse.verify.numeric`, needs torch): each GDN layer run split and fused,
   per TP rank of the recorded layout's consumer, float64, agreeing to 1e-12.

Bad input (not a checkpoint, ``--tp`` or ``--layers`` that cannot apply) raises
:class:`~gdnfuse.errors.GdnfuseError`; a fault in the checkpoint is a failed check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from gdnfuse.arch import TARGET_MODEL_TYPE
from gdnfuse.checkpoint import CONFIG_NAME, Checkpoint, open_checkpoint
from gdnfuse.engines.spec import Rows
from gdnfuse.errors import GdnfuseError, SetupError, option
from gdnfuse.layout import check_tp
from gdnfuse.record import Record
from gdnfuse.verify.report import CheckResult, VerifyReport, failed, passed, skipped, timed
from gdnfuse.verify.structure import (
    FusedCheckpoint,
    check_structure,
    layer_number,
    open_fused,
)

Progress = Callable[[str, int, int], None]
"""``progress(step, done, total)``: a check is starting; ``done`` of ``total`` are finished."""

__all__ = ["CheckResult", "VerifyReport", "select_layers", "verify"]


def layer_key(prefix: str) -> int | str:
    """How ``--layers`` names a GDN layer: its decoder number (``3``), or ``mtp.N`` for a
    multi-token-prediction layer (numbered from 0 too, so a bare number never means it)."""
    n = layer_number(prefix)
    if prefix.startswith("mtp."):
        return f"mtp.{n}"
    return n if n is not None else prefix


def select_layers(ck: FusedCheckpoint, layers: Iterable[int | str] | None) -> tuple[str, ...]:
    """GDN layer prefixes to run numerically: all, or those named (``0``, ``mtp.0``, ``mtp``)."""
    all_layers = ck.gdn_layers
    if layers is None:
        return all_layers
    have = {layer_key(p): p for p in all_layers}
    wanted: set[int | str] = set()
    missing = []
    for item in layers:
        if isinstance(item, str) and item.isdigit():
            item = int(item)
        if item == "mtp":
            wanted |= {k for k in have if isinstance(k, str) and k.startswith("mtp.")}
        elif isinstance(item, bool) or not isinstance(item, int | str) or item not in have:
            missing.append(str(item))
        else:
            wanted.add(item)
    if missing or not wanted:
        names = ",".join(str(k) for k in have)
        raise GdnfuseError(
            f"{option('layers', ','.join(missing) or 'mtp')}: not a GDN layer; GDN layers are "
            f"{names}",
            path=str(ck.root),
        )
    return tuple(p for p in all_layers if layer_key(p) in wanted)


def verify(
    checkpoint_dir: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    tp: int | None = None,
    layers: Iterable[int | str] | None = None,
    numeric: bool = True,
    device: str = "cpu",
    engine: str | None = None,
    engine_python: str | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Run every check on the converted checkpoint in ``checkpoint_dir``.

    ``against``: the unconverted source, for the exact comparison and a source-based numeric
    check. ``tp``: the consumer's tensor-parallel size (default: the recorded one).
    ``layers``: layer numbers for the numeric check (default: every GDN layer).
    ``engine``: also run source and output in that engine (``vllm``, ``sglang``,
    ``transformers``, ``mlx``; vLLM and sglang at ``tp``, default 1) and require the same
    result (:mod:`gdnfuse.verify.engine`); needs ``against``.
    ``progress(step, done, total)`` is told each step as it starts (the CLI shows a bar).
    """
    tell = progress or (lambda step, done, total: None)
    started = time.perf_counter()
    if numeric or device != "cpu":
        _need_torch(device)
    if isinstance(layers, str | bytes):  # "0-1" would be iterated by character
        raise GdnfuseError(f"layers={layers!r}: give a list, e.g. [0, 1, 'mtp.0']")
    layers = None if layers is None else list(layers)
    ck = open_fused(checkpoint_dir)
    if tp is not None:
        check_tp(ck.model.dims, tp)
    selected = select_layers(ck, layers)
    if engine is not None:
        from gdnfuse.engines.run import engine_python as find_python

        if against is None:
            raise GdnfuseError(f"{option('engine', engine)} needs {option('against')}: it "
                               "compares with the source")  # fmt: skip
        engine_python = find_python(engine, engine_python)  # before minutes of other checks
    src = None
    if against is not None:
        if Path(against).resolve() == ck.root.resolve():
            raise GdnfuseError(f"{option('against')} is the checkpoint itself", path=str(against))
        src = open_checkpoint(against)

    total = 1 + (src is not None) + numeric + (engine is not None)
    step = iter(range(total))
    step_now = [0]

    def begin(name: str) -> None:
        step_now[0] = next(step)
        tell(name, step_now[0], total)

    layout_check: list[CheckResult] = []
    rows = None
    if src is not None:
        started_layout = time.perf_counter()
        ck, layout_check, rows = _rows_against(ck, src)
        spent = time.perf_counter() - started_layout
        layout_check = [replace(c, seconds=spent) for c in layout_check]
    begin("structure")
    checks: list[CheckResult] = check_structure(ck)
    n_layers = len(selected)
    layer_now, layer_line = [""], [""]  # while the byte comparison runs / after it
    exact_done = [src is None]

    def layer(i: int, prefix: str) -> None:
        layer_now[0] = f"; numeric forward: {i + 1} of {n_layers} GDN layers"
        layer_line[0] = (f"numeric forward: {prefix.removesuffix('.')} ({i + 1} of {n_layers} "
                         "GDN layers, float64)")  # fmt: skip
        if exact_done[0]:
            tell(layer_line[0], step_now[0], total)

    def run_numeric() -> tuple[list[CheckResult], float]:
        from gdnfuse.verify.numeric import check_numeric

        began = time.perf_counter()
        found = check_numeric(ck, src, selected, tp=tp, device=device, on_layer=layer)
        return found, time.perf_counter() - began

    # The byte comparison waits on the disk and the float64 forward on the CPU: on CPU they
    # run together. torch is imported first: its libraries, paged in from a cold cache behind
    # the comparison's queue of reads, took 12 s instead of 1.5 s.
    background = None
    if numeric and src is not None and device == "cpu":
        import gdnfuse.verify.numeric  # noqa: F401

        background = _Background(run_numeric)
    if src is not None:
        from gdnfuse.verify.exact import check_exact

        begin("exact bytes")
        index = step_now[0]
        size = sum(h.file_size for h in ck.shards.values())
        seen = [0]

        def compared(n: int) -> None:
            seen[0] += n
            tell(f"exact bytes: {_size(seen[0])} of {_size(size)}{layer_now[0]}", index, total)

        exact = check_exact(ck, src, compared)
        exact_done[0] = True
        lead = sum(1 for c in exact[:1] if c.name == "exact.source")  # is it the source? first
        checks += exact[:lead] + layout_check + exact[lead:]
    else:
        checks.append(skipped("exact", "no --against: bytes not compared with the source"))
    if numeric:
        begin(f"numeric forward ({n_layers} GDN layers, float64)")
        if layer_line[0]:  # where the check running alongside has got to
            tell(layer_line[0], step_now[0], total)
        numeric_checks, spent = background.result() if background else run_numeric()
        checks += [replace(c, seconds=spent) for c in numeric_checks]
        if device != "cpu":
            gpu_tp = tp or (ck.record.tp if ck.record else 1)
            found = ck.record if ck.rows_from != "record" else None  # found, not recorded
            checks += timed(lambda: check_gpu(ck.root, against, gpu_tp, device, layers=selected,
                                              rows=found))  # fmt: skip
    else:
        checks.append(skipped("numeric", "--no-numeric: reference forward not run"))
    if engine is not None:
        from gdnfuse.verify.engine import check_engine

        begin(f"engine {engine} (loads source and output)")
        checks += timed(check_engine, ck.root, against, engine, tp or 1, engine_python)
    settings = {
        "engine": engine,
        "tp": tp,
        "layers": None if layers is None else sorted({str(x) for x in layers}),
        "numeric": numeric,
        "device": device,
    }
    return VerifyReport(
        checkpoint=str(checkpoint_dir),
        against=None if against is None else str(against),
        checks=tuple(checks),
        record=ck.raw_record if isinstance(ck.raw_record, dict) else None,
        seconds=time.perf_counter() - started,
        settings=settings,
        loaded_by=_loaded_by(ck, rows),
    )


def _rows_against(
    ck: FusedCheckpoint, src: Checkpoint
) -> tuple[FusedCheckpoint, list[CheckResult], Rows]:
    """The fused rows' order found against the source (``exact.layout``), the checkpoint the
    other checks read (where no record says the order: the one found) and the order the
    per-engine verdicts follow (what the bytes are, whatever the record says)."""
    from gdnfuse.engines import NO_KNOWN_ORDER, same_rows
    from gdnfuse.verify.exact import candidate_layouts, detect_layout, layout_name

    name = "exact.layout"
    found = detect_layout(ck, src)
    tried = ", ".join(layout_name(*c) for c in candidate_layouts(ck.model.dims))
    if isinstance(found, str):  # no fused tensors to compare: say why, keep the record's error
        return ck, [failed(name, found, file=CONFIG_NAME)], NO_KNOWN_ORDER
    if found is None:
        why = f"the fused rows are in none of the known orders ({tried}) of the source's rows"
        if ck.record is None and ck.raw_record is None:
            ck = replace(ck, record_error=why)
        return ck, [failed(name, why, file=CONFIG_NAME)], NO_KNOWN_ORDER
    seen = layout_name(*found)
    if ck.record is None and ck.raw_record is not None:  # a broken record stays a failure
        return ck, [passed(name, f"fused rows are {seen}, found against the source (the "
                           "layout record is unusable: see structure.record)")], Rows(
            *found)  # fmt: skip
    if ck.record is None:
        ck = replace(ck, record=Record(*found), record_error=None, rows_from="detected")
        return ck, [passed(name, f"fused rows are {seen}, found against the source (no layout "
                           "record says it; the per-engine verdicts follow from it)")], Rows(
            *found)  # fmt: skip
    said = Rows(ck.record.layout, ck.record.tp)
    if same_rows(ck.model.dims, said, Rows(*found)):
        where = "the record says" if ck.rows_from == "record" else f"{ck.model.model_type} defines"
        return ck, [passed(name, f"fused rows are {seen}, as {where} (checked against the "
                           "source)")], said  # fmt: skip
    where = "the layout record says" if ck.rows_from == "record" else (
        f"a {ck.model.model_type} checkpoint must hold")  # fmt: skip
    return ck, [failed(name, f"{where} {layout_name(ck.record.layout, ck.record.tp)}, but the "
                       f"fused rows are {seen}", file=CONFIG_NAME)], Rows(*found)  # fmt: skip


def _loaded_by(ck: FusedCheckpoint, rows: Rows | None) -> tuple[str, ...] | None:
    """The engines whose rules say they load this checkpoint as it is (information), for the
    row order found against the source, else the one the checks read (recorded, or defined
    by the format)."""
    from gdnfuse import engines, loaders

    if rows is None and ck.record is not None:
        rows = Rows(ck.record.layout, ck.record.tp)
    try:
        found = engines.judge_all(loaders.read_facts(ck.root, rows=rows))
    except GdnfuseError:  # a checkpoint the rules cannot describe: the checks say why
        return None
    labels = {s.name: s.label for s in engines.ENGINES}
    return tuple(labels[n] for n, v in found.items() if v.outcome is engines.Outcome.LOADS)


class _Background:
    """``fn()`` on a daemon thread: a Ctrl-C in the main thread is not held up by it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True,
                                        name="gdnfuse-numeric")  # fmt: skip
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as e:  # re-raised in the caller's thread
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _need_torch(device: str) -> None:
    """One line, before any work, when the environment cannot run the requested checks."""
    if importlib.util.find_spec("torch") is None:
        raise SetupError(
            "the numeric check needs torch: pip install 'gdnfuse[verify]' (CPU-only machines: "
            "pip install torch==2.13.0 or the CPU index first), or skip it with numeric=False "
            "(--no-numeric)"
        )
    if device == "cpu":
        return
    if not (device == "cuda" or device.startswith("cuda:")):
        raise GdnfuseError(f"device {device!r}: use cpu or cuda")
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise SetupError(
            f"device {device!r}: torch {torch.__version__} ({build}) sees no CUDA device; "
            "run on a GPU machine, or use device cpu"
        )


def check_gpu(
    root: Path,
    against: str | os.PathLike[str] | None,
    tp: int,
    device: str,
    *,
    layers: Iterable[str] | None = None,
    rows: Record | None = None,
) -> list[CheckResult]:
    """The engines' precision on the engines' hardware: bf16, fla/Triton kernels, real ranks.

    With ``tp`` > 1 and that many GPUs, one process per GPU (NCCL), each reading only its
    own slice of the fused tensors; otherwise the ranks are simulated on one device.
    Thresholds and why: :mod:`gdnfuse.reference.gpu` and the README.
    """
    if against is None:
        return [skipped("numeric.gpu", "--device needs --against: it compares with the split")]
    if json.loads((root / CONFIG_NAME).read_text()).get("model_type") == TARGET_MODEL_TYPE:
        return [
            skipped(
                "numeric.gpu",
                f"not run for {TARGET_MODEL_TYPE} outputs (--arch qwen3-next): the GPU path reads "
                "source and output under one name; the float64 check above covers the layers",
            )
        ]
    import torch

    from gdnfuse.reference import distributed

    chosen = None if layers is None else list(layers)
    try:
        open_fused_strictly = open_checkpoint(root)  # the GPU path reads the output's bytes
        distributed.describe_fused(open_fused_strictly, rows)
    except GdnfuseError as e:  # a broken output is a failed check, not bad input
        return [failed("numeric.gpu", f"cannot run the GPU path on the output: {e.reason}",
                       file=e.path, tensor=e.tensor)]  # fmt: skip
    if tp > 1 and device == "cuda" and torch.cuda.device_count() >= tp:
        report = distributed.verify_tp(root, against, tp, device, layers=chosen, rows=rows)
        lines = distributed.format_report(report)
        return [CheckResult(f"numeric.gpu.tp{tp}", bool(report["passed"]), "; ".join(lines))]
    results = distributed.verify_gpu(root, against, device=device, tp=tp, layers=chosen,
                                     rows=rows)  # fmt: skip
    return [
        CheckResult(
            f"numeric.gpu.{r.layer}",
            r.passed,
            "; ".join(line.strip() for line in r.lines()),
            tensor=r.layer,
        )  # fmt: skip
        for r in results
    ]
