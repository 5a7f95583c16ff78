"""Tensor-parallel verification of a fused checkpoint on real ranks (one process per GPU).

Each rank reads only its own contiguous ``1/tp`` of ``in_proj_qkvz``/``in_proj_ba`` rows from the
safetensors files (``safe_open(...).get_slice``: a partial read of the mapped file, never the
whole tensor), plus its own channels of ``conv1d``, heads of ``A_log``/``dt_bias`` and columns of
``out_proj``; it un-interleaves and runs its heads (:func:`gdnfuse.reference.gpu.rank_forward`)
and the partial outputs are summed with an all-reduce, as an engine's row-parallel
``out_proj`` does. Rank 0 compares the sum with the split checkpoint's layer, run on one device
in the same precision, and with the float64 reference.

NCCL on CUDA (NVLink multicast kept off: ``NCCL_NVLS_ENABLE=0`` and friends), gloo on CPU (tests).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gdnfuse.checkpoint import Checkpoint, open_checkpoint
from gdnfuse.errors import GdnfuseError, option
from gdnfuse.layout import GdnDims, Layout, check_tp
from gdnfuse.model import describe_config, natural_key, norm_eps
from gdnfuse.names import FUSED_KEY
from gdnfuse.record import RECORD_KEY, Record, parse_record, unstamp_config
from gdnfuse.reference import gpu
from gdnfuse.reference.naive import GdnWeights

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
"""NVLink multicast can take a shared host's GPUs out of service; never enable it."""

_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


@dataclass(frozen=True)
class FusedModel:
    """What a rank needs to find its slices: the fused checkpoint, its dims and its record."""

    root: str
    dims: GdnDims
    layout: Layout
    record_tp: int
    prefixes: tuple[str, ...]
    files: dict[str, str]  # tensor name -> shard file (relative)
    eps: float


def describe_fused(ckpt: Checkpoint, rows: Record | None = None) -> FusedModel:
    """Read the layout record and the GDN layers of a fused checkpoint (headers only);
    ``rows``: the row order when known otherwise (found against the source by verify)."""
    model = describe_config(unstamp_config(ckpt.config))  # a stamped output: as declared
    record, why = parse_record(ckpt.config.get(RECORD_KEY), model.dims)
    record = rows or record
    if record is None:
        raise GdnfuseError(f"{why}: not a usable gdnfuse-fused checkpoint", path=str(ckpt.root))
    tensors = ckpt.tensors
    prefixes = tuple(m["prefix"] for n in tensors if (m := FUSED_KEY.match(n))
                     and m["fused"] == "qkvz" and m["leaf"] == "weight")  # fmt: skip
    if not prefixes:
        raise GdnfuseError("no linear_attn.in_proj_qkvz.weight tensors", path=str(ckpt.root))
    for name, ref in tensors.items():
        if name.startswith(prefixes) and ref.info.dtype not in _FLOAT_DTYPES:
            raise GdnfuseError(
                f"dtype {ref.info.dtype} is not supported by the GPU check (bf16/fp16/fp32 only)",
                tensor=name,
            )
    return FusedModel(
        root=str(ckpt.root), dims=model.dims, layout=record.layout,
        record_tp=record.tp, prefixes=tuple(sorted(prefixes, key=natural_key)),
        files={n: r.file for n, r in tensors.items()}, eps=norm_eps(ckpt.config, model),
    )  # fmt: skip


def check_verify_tp(model: FusedModel, tp: int) -> None:
    """Which ``tp`` can load this checkpoint by contiguous row slices."""
    check_tp(model.dims, tp)
    if model.layout is Layout.TP_BLOCKED and tp != model.record_tp:
        raise GdnfuseError(
            f"this checkpoint is tp-blocked for {model.record_tp} ranks; its contiguous slices "
            f"are rank shards only with {option('tp', model.record_tp)}, not {tp}"
        )


class SliceReader:
    """Row (and column) slices of tensors, read lazily from their shards; counts bytes read."""

    def __init__(self, root: str, files: dict[str, str]) -> None:
        self.root, self.files = root, files
        self.bytes_read = 0

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise GdnfuseError("tensor missing", path=self.root, tensor=name)
        with safe_open(os.path.join(self.root, self.files[name]), "pt", device="cpu") as f:
            sl = f.get_slice(name)
            rows = rows or slice(None)
            t = sl[rows] if cols is None else sl[rows, cols]
        self.bytes_read += t.numel() * t.element_size()
        return t


def load_rank(
    reader: SliceReader, model: FusedModel, prefix: str, tp: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor, GdnWeights]:
    """Rank ``rank``'s slices of one layer: fused rows, conv channels, heads, out_proj columns."""
    d = model.dims
    nk_t, nv_t, dk, dv = d.nk // tp, d.nv // tp, d.dk, d.dv
    rq, rb = d.qkvz_rows // tp, d.ba_rows // tp
    qkvz = reader.read(prefix + "in_proj_qkvz.weight", slice(rank * rq, (rank + 1) * rq))
    ba = reader.read(prefix + "in_proj_ba.weight", slice(rank * rb, (rank + 1) * rb))
    conv = prefix + "conv1d.weight"
    q0, k0, v0 = rank * nk_t * dk, d.nk * dk + rank * nk_t * dk, 2 * d.nk * dk + rank * nv_t * dv
    conv1d = torch.cat([
        reader.read(conv, slice(q0, q0 + nk_t * dk)),
        reader.read(conv, slice(k0, k0 + nk_t * dk)),
        reader.read(conv, slice(v0, v0 + nv_t * dv)),
    ])  # fmt: skip
    heads = slice(rank * nv_t, (rank + 1) * nv_t)
    w = GdnWeights(
        conv1d=conv1d,
        A_log=reader.read(prefix + "A_log", heads),
        dt_bias=reader.read(prefix + "dt_bias", heads),
        norm=reader.read(prefix + "norm.weight"),
        out_proj=reader.read(
            prefix + "out_proj.weight", None, slice(rank * nv_t * dv, (rank + 1) * nv_t * dv)
        ),
        eps=model.eps,
    )
    return qkvz, ba, w


def load_split_layer(
    split: Checkpoint, fused_reader: SliceReader, prefix: str, eps: float
) -> gpu.LayerTensors:
    """The split source's projections plus the fused tensors and shared weights, whole."""
    src = SliceReader(str(split.root), {n: r.file for n, r in split.tensors.items()})
    w = GdnWeights(
        conv1d=src.read(prefix + "conv1d.weight"), A_log=src.read(prefix + "A_log"),
        dt_bias=src.read(prefix + "dt_bias"), norm=src.read(prefix + "norm.weight"),
        out_proj=src.read(prefix + "out_proj.weight"), eps=eps,
    )  # fmt: skip
    return gpu.LayerTensors(
        qkv=src.read(prefix + "in_proj_qkv.weight"), z=src.read(prefix + "in_proj_z.weight"),
        b=src.read(prefix + "in_proj_b.weight"), a=src.read(prefix + "in_proj_a.weight"),
        qkvz=fused_reader.read(prefix + "in_proj_qkvz.weight"),
        ba=fused_reader.read(prefix + "in_proj_ba.weight"), weights=w,
    )  # fmt: skip


def _select(model: FusedModel, layers: Sequence[str] | None) -> tuple[str, ...]:
    """The GDN layer prefixes to run: all, or those named (``verify --layers``), in order."""
    if layers is None:
        return model.prefixes
    wanted = set(layers)
    return tuple(p for p in model.prefixes if p in wanted)


def verify_gpu(
    checkpoint_dir: str | os.PathLike[str],
    against: str | os.PathLike[str],
    *,
    device: str = "cuda",
    tp: int = 1,
    tokens: int = 64,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    rows: Record | None = None,
) -> list[gpu.GpuVerifyResult]:
    """One device: every GDN layer (or those whose prefixes ``layers`` names), fused (``tp``
    simulated ranks) vs split in bf16, both vs float64. For ``gdnfuse verify --device cuda``."""
    ckpt, split = open_checkpoint(checkpoint_dir), open_checkpoint(against)
    model = describe_fused(ckpt, rows)
    check_verify_tp(model, tp)
    reader = SliceReader(model.root, model.files)
    return [
        gpu.gpu_verify_layer(
            prefix.removesuffix("."),
            load_split_layer(split, reader, prefix, model.eps),
            model.dims,
            model.layout,
            tp=tp,
            device=device,
            tokens=tokens,
            seed=seed,
        )  # fmt: skip
        for prefix in _select(model, layers)
    ]


@dataclass(frozen=True)
class _Job:
    checkpoint_dir: str
    against: str
    tp: int
    device: str
    tokens: int
    seed: int
    layers: tuple[str, ...] | None
    rows: tuple[str, int] | None
    init_method: str
    result_path: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, job: _Job) -> None:
    """One rank's process: own slices -> own heads -> all-reduce; rank 0 compares and reports."""
    import torch.distributed as dist

    os.environ.update(MULTICAST_OFF)
    cuda = job.device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=job.init_method, rank=rank, world_size=job.tp
    )
    try:
        rows = None if job.rows is None else Record(Layout(job.rows[0]), job.rows[1])
        model = describe_fused(open_checkpoint(job.checkpoint_dir), rows)
        check_verify_tp(model, job.tp)
        d = model.dims
        local = GdnDims(d.nk // job.tp, d.nv // job.tp, d.dk, d.dv)
        ops = gpu.pick_ops(dev)
        reader = SliceReader(model.root, model.files)
        results, rank_bytes = [], []
        for prefix in _select(model, job.layers):
            before = reader.bytes_read
            qkvz, ba, w = load_rank(reader, model, prefix, job.tp, rank)
            rank_read = reader.bytes_read - before
            hidden = w.out_proj_weight().shape[0]
            x64 = gpu.make_input(hidden, job.tokens, job.seed)  # same x on all ranks
            with torch.no_grad():
                part = gpu.rank_forward(
                    x64.to(dev, torch.bfloat16), qkvz.to(dev, torch.bfloat16),
                    ba.to(dev, torch.bfloat16), gpu._to(w, dev, torch.bfloat16), local,
                    model.layout, ops,
                )  # fmt: skip
            dist.all_reduce(part)
            reads: list[Any] = [None] * job.tp
            dist.all_gather_object(reads, rank_read)
            if rank == 0:
                full = load_split_layer(open_checkpoint(job.against), reader, prefix, model.eps)
                ref = gpu.reference_forward(x64, full, d)
                with torch.no_grad():
                    qkv, z, b, a = (p.to(dev, torch.bfloat16)
                                    for p in (full.qkv, full.z, full.b, full.a))  # fmt: skip
                    split = gpu.split_forward(x64.to(dev, torch.bfloat16), qkv, z, b, a,
                                              gpu._to(full.weights, dev, torch.bfloat16), d, ops)
                layer_bytes = sum(
                    t.nbytes for t in (full.qkvz, full.ba, *vars(full.weights).values())
                    if isinstance(t, torch.Tensor)
                )  # fmt: skip
                rank_bytes.append(
                    {"layer": prefix, "layer_bytes": layer_bytes, "rank_bytes": reads}
                )
                results.append(
                    gpu.GpuVerifyResult(
                        prefix.removesuffix("."),
                        f"{dev.type} x{job.tp}",
                        "bfloat16",
                        str(model.layout),
                        job.tp,
                        job.tokens,
                        ops,
                        gpu.verify_outputs(part, split, ref),
                    )  # fmt: skip
                )
        if rank == 0:
            report = gpu.summarize(results)
            report["reads"] = rank_bytes
            report["backend"] = dist.get_backend()
            Path(job.result_path).write_text(json.dumps(report, indent=1))
    finally:
        dist.destroy_process_group()


def verify_tp(
    checkpoint_dir: str | os.PathLike[str],
    against: str | os.PathLike[str],
    tp: int,
    device: str = "cuda",
    *,
    tokens: int = 64,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    rows: Record | None = None,
) -> dict:
    """``tp`` processes (one per GPU; gloo processes on CPU), NCCL all-reduce, rank 0 compares.

    Returns :func:`gdnfuse.reference.gpu.summarize`'s dict plus ``reads``: per layer, the bytes
    of the whole layer and the bytes each rank read (about ``1/tp`` of it: partial reads).
    """
    import torch.multiprocessing as mp

    model = describe_fused(open_checkpoint(checkpoint_dir), rows)
    check_verify_tp(model, tp)
    open_checkpoint(against)  # refuse a bad source before starting processes
    if device == "cuda" and torch.cuda.device_count() < tp:
        raise GdnfuseError(
            f"{option('tp', tp)} needs {tp} GPUs; this machine has {torch.cuda.device_count()}"
        )
    if device not in ("cuda", "cpu"):
        raise GdnfuseError(f"device {device!r}: use cuda or cpu")
    os.environ.update(MULTICAST_OFF)  # children inherit it
    with tempfile.TemporaryDirectory(prefix="gdnfuse-tp-") as tmp:
        job = _Job(
            str(checkpoint_dir), str(against), tp, device, tokens, seed,
            None if layers is None else tuple(layers),
            None if rows is None else (str(rows.layout), rows.tp),
            f"tcp://127.0.0.1:{_free_port()}", os.path.join(tmp, "result.json"),
        )  # fmt: skip
        mp.spawn(_rank_main, args=(job,), nprocs=tp, join=True)
        return json.loads(Path(job.result_path).read_text())


def format_report(report: dict) -> list[str]:
    """Human-readable lines of a :func:`verify_tp` report."""
    lines = []
    for layer in report["layers"]:
        lines.append(f"{layer['layer']} [{layer['device']}, tp {layer['tp']}, {layer['tokens']} "
                     f"tokens, layout {layer['layout']}]")  # fmt: skip
        for c in layer["comparisons"]:
            lines.append(f"  {c['name']}: rel RMSE {c['rel_rmse']:.3e} max abs {c['max_abs']:.3e} "
                         f"{'ok' if c['passed'] else 'FAIL'}")  # fmt: skip
    for r in report.get("reads", []):
        lines.append(f"{r['layer']} bytes read per rank {r['rank_bytes']} of {r['layer_bytes']}")
    lines.append("PASS" if report["passed"] else "FAIL")
    return lines


__all__: Sequence[str] = (
    "FusedModel", "SliceReader", "describe_fused", "format_report", "load_rank",
    "load_split_layer", "verify_gpu", "verify_tp",
)  # fmt: skip
