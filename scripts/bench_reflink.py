"""Benchmark reflink-aware conversion on loop-mounted XFS (reflink=1), btrfs and ext4.

For each filesystem: make an image file, mkfs, loop-mount it (root), write a Qwen3.5-27B-
shaped and a MoE-shaped synthetic checkpoint laid out as safetensors writes them (names
sorted, offsets not block-aligned), then time, side by side and cold (page cache dropped,
final sync included): ``cp -r --reflink=never``, ``cp -r --reflink=always`` and ``gdnfuse
convert`` (and, with ``--old PATH``, an earlier gdnfuse checkout for the ext4 "unchanged"
comparison), recording the new blocks each allocated (used space after minus before, after
sync). One filesystem at a time, its image removed afterwards, to bound the disk used.

    python scripts/bench_reflink.py --workdir /work/bench-reflink --size-gb 10 --moe-gb 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gdnfuse.synthetic import PRESETS, tensor_shapes, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"],
        "ext4": ["mkfs.ext4", "-q", "-F"]}  # fmt: skip


def sh(*cmd: str | os.PathLike[str], **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def used(path: Path) -> int:
    """Used bytes once the filesystem has settled: XFS and btrfs free the blocks of deleted
    files in the background, so poll until two readings a second apart agree."""
    last = None
    for _ in range(30):
        os.sync()
        st = os.statvfs(path)
        now = (st.f_blocks - st.f_bfree) * st.f_frsize
        if now == last:
            return now
        last = now
        time.sleep(1.0)
    return last


def layers_for(preset: str, gb: float) -> int:
    """Decoder layers that bring a preset's checkpoint to about ``gb`` GB (bf16)."""
    def size(n: int) -> int:
        from dataclasses import replace

        m = replace(PRESETS[preset], layers=n)
        total = 0
        for _, shape in tensor_shapes(m):
            k = 1
            for d in shape:
                k *= d
            total += 2 * k
        return total

    n = 1
    while size(n + 1) <= gb * 1e9:
        n += 1
    return n


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    os.sync()
    return time.perf_counter() - start


def run_fs(kind: str, work: Path, image_gb: int, sources: dict[str, tuple[str, int]],
           old: Path | None, verify: bool = False) -> list[dict]:  # fmt: skip
    image, mnt = work / f"{kind}.img", work / kind
    mnt.mkdir(parents=True, exist_ok=True)
    image.unlink(missing_ok=True)
    sh("truncate", "-s", f"{image_gb}G", image)
    sh(*MKFS[kind], image)
    sh("mount", "-o", "loop", image, mnt)
    rows = []
    try:
        for label, (preset, layers) in sources.items():
            src = write_checkpoint(mnt / f"src-{label}", preset, layers=layers, fast=True,
                                   sort=True, shard_bytes=5_000_000_000)  # fmt: skip
            size = sum(p.stat().st_size for p in src.iterdir())
            gdnfuse = [sys.executable, "-m", "gdnfuse.cli", "convert", str(src), "--quiet"]
            cases = {
                "cp -r --reflink=never": ["cp", "-r", "--reflink=never", str(src)],
                "cp -r --reflink=always": ["cp", "-r", "--reflink=always", str(src)],
                "gdnfuse convert": gdnfuse,
            }
            if old is not None and kind == "ext4":
                cases["gdnfuse convert (previous version)"] = gdnfuse
            for name, cmd in cases.items():
                if kind == "ext4" and "always" in name:
                    continue  # ext4 cannot clone: cp refuses
                dst = mnt / f"out-{label}-{len(rows)}"
                env = None
                if "previous" in name:
                    env = {**os.environ, "PYTHONPATH": str(old)}
                before = used(mnt)
                args = [*cmd, "--out", str(dst)] if cmd is gdnfuse else [*cmd, str(dst)]
                seconds = timed(args, env)
                new = used(mnt) - before
                rows.append({"fs": kind, "source": label, "source_bytes": size, "how": name,
                             "seconds": round(seconds, 3), "new_bytes": new})  # fmt: skip
                if cmd is gdnfuse and verify:  # not timed: the output must be right, too
                    args = [sys.executable, "-m", "gdnfuse.cli", "verify", str(dst), "--against",
                            str(src), "--layers", "0", "--quiet"]  # fmt: skip
                    check = subprocess.run(args, capture_output=True, text=True, env=env)
                    rows[-1]["verify"] = check.stdout.strip().splitlines()[0]
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(dst)
            shutil.rmtree(src)
    finally:
        sh("umount", mnt)
        image.unlink()
    return rows


def table(rows: list[dict]) -> str:
    out = ["| fs | source | how | wall s | vs cp --reflink=never | new blocks | % of source "
           "| verify |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    base = {(r["fs"], r["source"]): r["seconds"] for r in rows if "never" in r["how"]}
    for r in rows:
        ratio = r["seconds"] / base[(r["fs"], r["source"])]
        checked = r.get("verify", "-")
        checked = "PASSED" if "PASSED" in checked else checked
        out.append(f"| {r['fs']} | {r['source']} ({r['source_bytes'] / 1e9:.2f} GB) | {r['how']} "
                   f"| {r['seconds']:.3f} | {ratio:.3f}x | {r['new_bytes'] / 1e6:.1f} MB | "
                   f"{100 * r['new_bytes'] / r['source_bytes']:.2f}% | "
                   f"{checked} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-reflink"))
    ap.add_argument("--size-gb", type=float, default=10.0, help="27B-shaped source size")
    ap.add_argument("--moe-gb", type=float, default=4.0, help="MoE-shaped source size")
    ap.add_argument("--fs", default="xfs,btrfs,ext4")
    ap.add_argument("--image-gb", type=int, default=40)
    ap.add_argument("--old", type=Path, help="checkout of an earlier gdnfuse (ext4 comparison)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--verify", action="store_true",
                    help="also run `gdnfuse verify --against` (layer 0 numerically) on each output")
    args = ap.parse_args()
    sources = {"27B-shaped": ("qwen3.5-27b", layers_for("qwen3.5-27b", args.size_gb))}
    if args.moe_gb > 0:
        sources["MoE-shaped"] = ("qwen3.5-35b-a3b", layers_for("qwen3.5-35b-a3b", args.moe_gb))
    print(f"# {platform.node()} {platform.platform()}, {os.cpu_count()} CPUs; sources: {sources}")
    rows = []
    for kind in args.fs.split(","):
        rows += run_fs(kind, args.workdir, args.image_gb, sources, args.old, args.verify)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
