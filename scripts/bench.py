"""Conversion benchmark: gdnfuse vs `cp -r` vs a naive torch script, side by side.

    python scripts/bench.py --workdir /path/on/target/disk [--sizes 2,10] [--repeat 3]

For each size it writes a synthetic checkpoint with Qwen3.5-27B shapes (real key names
and shapes, random bf16 bytes, 1 GB shards, an index), then runs, alternating and
repeated: `cp -r` (the floor on this disk), the naive baseline (scripts/naive_convert.py:
safetensors load_file, torch reshapes, save_file), `gdnfuse convert --copy` and
`gdnfuse convert --link`, and `gdnfuse verify --against`. Each run starts with a cold page
cache (sync; drop_caches, when permitted) and its time includes a final `sync`, so the
figures are disk time, not page-cache time. Peak RSS is the child's own (wait4).
It also times `gdnfuse inspect` and `convert --dry-run` on a header-only (sparse) MoE
checkpoint with ~200k tensors, and (--moe) converts a MoE checkpoint with ~92k tiny expert tensors.
Prints a markdown table; --out writes it to a file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from gdnfuse.synthetic import PRESETS, ModelShape, tensor_shapes, write_checkpoint

HERE = Path(__file__).resolve().parent
GDNFUSE = [sys.executable, "-m", "gdnfuse.cli"]


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    bytes_written: int


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], out: Path | None, work: Path) -> Run:
    """Run ``cmd`` with a cold cache; wall time includes a final sync.

    Peak RSS comes from ``/usr/bin/time``: a child forked straight from this (large) process
    would report this process's RSS, since Linux keeps the high-water mark across exec.
    """
    drop_caches()
    rss_file = work / "rss.txt"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd],
                          stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    rss_kb = int(rss_file.read_text().split()[-1])
    return Run(seconds, rss_kb / 1024, written_bytes(out) if out else 0)


def written_bytes(out: Path) -> int:
    """Bytes of files in ``out`` that are not hard links (i.e. actually written)."""
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.stat().st_nlink == 1)


def shape_for_size(gb: float) -> ModelShape:
    """Qwen3.5-27B shapes with as many layers as fit ``gb`` GB of bf16 (at least 2).

    The real vocabulary (embeddings + lm_head = 5 GB) is kept when it is at most half the
    size; below that it is shrunk to a quarter of the size, so small runs still have layers.
    """
    base = PRESETS["qwen3.5-27b"]
    target = gb * 1e9 / 2  # values
    fixed = _values(replace(base, layers=0))
    if fixed > target / 2:
        base = replace(base, vocab=int(target / 4 / (2 * base.hidden)))
        fixed = _values(replace(base, layers=0))
    per_layer = (_values(replace(base, layers=4)) - fixed) / 4
    return replace(base, layers=max(2, round((target - fixed) / per_layer)))


def _values(shape: ModelShape) -> int:
    return sum(_numel(s) for _, s in tensor_shapes(shape))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bench_size(name: str, src: Path, work: Path, repeat: int) -> dict[str, list[Run]]:
    methods = {
        "cp -r": lambda dst: ["cp", "-r", str(src), str(dst)],
        "naive (torch load/save)": lambda dst: [
            sys.executable, str(HERE / "naive_convert.py"), str(src), str(dst)],
        "gdnfuse --copy": lambda dst: [
            *GDNFUSE, "convert", str(src), "--out", str(dst), "--tp", "4", "--quiet"],
        "gdnfuse --link": lambda dst: [
            *GDNFUSE, "convert", str(src), "--out", str(dst), "--tp", "4", "--quiet", "--link"],
    }  # fmt: skip
    results: dict[str, list[Run]] = {m: [] for m in methods}
    results["gdnfuse verify --against"] = []
    for i in range(repeat):
        for method, make in methods.items():
            dst = work / "out"
            shutil.rmtree(dst, ignore_errors=True)
            run = timed(make(dst), dst, work)
            results[method].append(run)
            print(f"[{name} round {i + 1}] {method}: {run.seconds:.2f} s, "
                  f"{run.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
            if method == "gdnfuse --copy":
                verify = timed([*GDNFUSE, "verify", str(dst), "--against", str(src)], None, work)
                results["gdnfuse verify --against"].append(verify)
        shutil.rmtree(work / "out", ignore_errors=True)
    return results


def table(name: str, size: int, results: dict[str, list[Run]]) -> str:
    cp = statistics.median(r.seconds for r in results["cp -r"])
    naive = results["naive (torch load/save)"]
    naive_t = statistics.median(r.seconds for r in naive)
    naive_rss = max(r.peak_rss_mb for r in naive)
    lines = [
        f"### {name}: {size / 1e9:.2f} GB source",
        "",
        "| method | wall s (median) | runs | peak RSS MB (max) | GB written | time / cp | "
        "naive / this (time) | naive / this (RSS) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, runs in results.items():
        t = statistics.median(r.seconds for r in runs)
        rss = max(r.peak_rss_mb for r in runs)
        lines.append(
            f"| {method} | {t:.2f} | {', '.join(f'{r.seconds:.1f}' for r in runs)} | {rss:.0f} "
            f"| {runs[0].bytes_written / 1e9:.2f} | {t / cp:.2f}x | {naive_t / t:.1f}x "
            f"| {naive_rss / rss:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def bench_planning(work: Path) -> str:
    """inspect / dry-run on ~200k tensors (sparse files: only headers are real)."""
    shape = replace(PRESETS["qwen3.5-397b-a17b"], layers=130)
    src = work / "moe-200k-sparse"
    if not src.exists():
        write_checkpoint(src, shape, sparse=True, shard_bytes=5 << 30)
    n = sum(1 for _ in tensor_shapes(shape))
    rows = []
    for label, cmd in {
        "inspect --json": [*GDNFUSE, "inspect", str(src), "--json"],
        "convert --dry-run --json": [
            *GDNFUSE, "convert", str(src), "--out", str(work / "x"), "--dry-run", "--json"],
    }.items():  # fmt: skip
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs.append(time.perf_counter() - start)
        rows.append(f"| {label} | {n:,} | {statistics.median(runs):.2f} |")
    return (
        "### planning on a header-only MoE checkpoint (Qwen3.5-397B-A17B shapes, 130 layers)\n\n"
        "| command (whole process, warm cache) | tensors | wall s (median of 3) |\n"
        "| --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = subprocess.run(["df", "-hT", "."], capture_output=True, text=True).stdout.splitlines()
    return (
        f"{platform.node()}: {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
        f"{platform.platform()}, Python {platform.python_version()}; "
        f"filesystem: {fs[-1] if fs else '?'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--sizes", default="2,10", help="GB, comma separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--moe", action="store_true", help="also a ~50k-tensor MoE conversion")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out_file = args.out.resolve() if args.out else None  # before chdir
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    report = [f"Machine: {machine()}", f"Cold cache per run: {drop_caches()}", "",
              f"Command: `python scripts/bench.py {' '.join(sys.argv[1:])}`", ""]  # fmt: skip
    cases: list[tuple[str, ModelShape, int]] = [
        (f"Qwen3.5-27B shapes, {gb} GB", shape_for_size(float(gb)), 1 << 30)
        for gb in args.sizes.split(",")
    ]
    if args.moe:
        moe = ModelShape(hidden=1024, layers=60, nk=16, nv=32, experts=512,
                         moe_intermediate=8, vocab=32000)  # fmt: skip
        cases.append(("MoE, 512 experts x 60 layers (tiny experts)", moe, 1 << 30))
    for name, shape, shard in cases:
        src = work / "src"
        shutil.rmtree(src, ignore_errors=True)
        write_checkpoint(src, shape, fast=True, shard_bytes=shard)
        size = sum(p.stat().st_size for p in src.iterdir())
        tensors = sum(1 for _ in tensor_shapes(shape))
        print(f"{name}: {size / 1e9:.2f} GB, {tensors} tensors", file=sys.stderr)
        results = bench_size(name, src, work, args.repeat)
        report.append(table(f"{name} ({tensors:,} tensors, {shape.layers} layers)", size, results))
        shutil.rmtree(src)
    report.append(bench_planning(work))
    text = "\n".join(report)
    print(text)
    if out_file:
        out_file.write_text(text)


if __name__ == "__main__":
    main()
