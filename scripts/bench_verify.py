"""verify benchmark: `gdnfuse verify --against` vs `cp -r` of the source, side by side.

    python scripts/bench_verify.py --workdir /path/on/target/disk [--size 10] [--repeat 3]

Writes a synthetic checkpoint with Qwen3.5-27B shapes (real names and GDN shapes: hidden 5120,
16 key heads, 48 value heads, 128-wide heads; 1 GB shards), converts it twice (`--tp 4`
copied, and `--link`), then runs, alternating and repeated, each with a cold page cache and a
final `sync`: `cp -r SRC` (the target: verify must take no longer than copying the source
once), `gdnfuse verify OUT --against SRC` on the copied output (every byte of both sides read
and compared, plus the float64 forward of every GDN layer), the same on the linked output (its
hard-linked shards are the source's own files: identical by construction, not read), and
`verify --no-numeric`. Peak RSS is the child's own (`/usr/bin/time`). Prints a markdown table
with time / cp; --out writes it to a file.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench import GDNFUSE, Run, drop_caches, machine, shape_for_size, timed

from gdnfuse.synthetic import write_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--size", type=float, default=10.0, help="source size in GB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out_file = args.out.resolve() if args.out else None
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src, copied, linked = work / "src", work / "out-copy", work / "out-link"
    shape = shape_for_size(args.size)
    for d in (src, copied, linked, work / "cp"):
        shutil.rmtree(d, ignore_errors=True)
    write_checkpoint(src, shape, fast=True, shard_bytes=1 << 30)
    for out, extra in ((copied, []), (linked, ["--link"])):
        subprocess.run([*GDNFUSE, "convert", str(src), "--out", str(out), "--tp", "4",
                        "--quiet", *extra], check=True)  # fmt: skip
    size = sum(p.stat().st_size for p in src.iterdir())
    verify = [*GDNFUSE, "verify"]
    methods = {
        "cp -r SRC": ["cp", "-r", str(src), str(work / "cp")],
        "verify --against (copied output)": [*verify, str(copied), "--against", str(src)],
        "verify --against (--link output)": [*verify, str(linked), "--against", str(src)],
        "verify --against --no-numeric (copied)": [
            *verify, str(copied), "--against", str(src), "--no-numeric"],
    }  # fmt: skip
    results: dict[str, list[Run]] = {m: [] for m in methods}
    for i in range(args.repeat):
        for method, cmd in methods.items():
            shutil.rmtree(work / "cp", ignore_errors=True)
            run = timed(cmd, None, work)
            results[method].append(run)
            print(f"[round {i + 1}] {method}: {run.seconds:.2f} s, {run.peak_rss_mb:.0f} MB",
                  file=sys.stderr, flush=True)  # fmt: skip
    shutil.rmtree(work / "cp", ignore_errors=True)
    cp = statistics.median(r.seconds for r in results["cp -r SRC"])
    gdn = sum(1 for i in range(shape.layers) if (i + 1) % shape.interval)
    lines = [
        f"Machine: {machine()}",
        f"Cold cache per run: {drop_caches()}",
        "",
        f"Command: `python scripts/bench_verify.py {' '.join(sys.argv[1:])}`",
        "",
        f"### Qwen3.5-27B shapes: {size / 1e9:.2f} GB source, {shape.layers} layers "
        f"({gdn} GDN), converted with --tp 4",
        "",
        "| command | wall s (median) | runs | peak RSS MB (max) | time / cp |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, runs in results.items():
        t = statistics.median(r.seconds for r in runs)
        lines.append(
            f"| {method} | {t:.2f} | {', '.join(f'{r.seconds:.1f}' for r in runs)} | "
            f"{max(r.peak_rss_mb for r in runs):.0f} | {t / cp:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if out_file:
        out_file.write_text(text)


if __name__ == "__main__":
    main()
