"""Hub benchmark: download-then-convert vs ``convert --overlap``, against the fake Hub.

    python scripts/bench_hub.py [--workdir DIR] [--mb-s 100] [--repeat 3] [--out FILE]

Serves a synthetic Qwen3.5-shaped checkpoint (Qwen3.5-0.8B widths, 8 layers, 32k vocab:
~330 MB in ~40 MB shards, random bytes) from tests/hub_server.py on loopback, its bodies paced
to ``--mb-s`` MB/s in total (one shared link, as a real download shares one), and times
``gdnfuse convert ORG/NAME --out ... -q`` with and without ``--overlap`` as subprocesses,
alternating, each with a fresh HF_HOME and a fresh output. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from gdnfuse.synthetic import PRESETS, write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hub_server import FakeHub  # noqa: E402

REPO = "bench/qwen3.5-small"
SHAPE = replace(PRESETS["qwen3.5-0.8b"], layers=8, vocab=32768)


def run_once(hub: FakeHub, work: Path, overlap: bool) -> float:
    home, out = work / "hf", work / "out"
    for p in (home, out):
        shutil.rmtree(p, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")  # fmt: skip
    cmd = [sys.executable, "-m", "gdnfuse.cli", "convert", REPO, "--out", str(out), "-q",
           *(["--overlap"] if overlap else [])]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--mb-s", type=float, default=100.0, help="fake link bandwidth, MB/s")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gdnfuse-bench-hub-"))
    src = write_checkpoint(work / "src", SHAPE, shard_bytes=40 << 20, fast=True)
    size = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
    shards = len(list(src.glob("*.safetensors")))
    times: dict[bool, list[float]] = {False: [], True: []}
    with FakeHub() as hub:
        hub.add_commit(REPO, src)
        hub.bandwidth = args.mb_s * 1e6
        for i in range(args.repeat):
            for overlap in (False, True) if i % 2 == 0 else (True, False):
                times[overlap].append(run_once(hub, work, overlap))
                print(f"run {i + 1} {'--overlap' if overlap else 'plain    '}: "
                      f"{times[overlap][-1]:.2f} s", file=sys.stderr)  # fmt: skip
    link = size / (args.mb_s * 1e6)
    plain, ovl = statistics.median(times[False]), statistics.median(times[True])
    lines = [
        f"Checkpoint: {size / 1e6:.0f} MB in {shards} shards; fake Hub link {args.mb_s:g} MB/s "
        f"(transfer alone {link:.2f} s); {args.repeat} runs each, alternating, fresh cache.",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}.",
        "",
        "| mode | median s | min s | max s | runs |",
        "|---|---|---|---|---|",
    ]
    for name, t in (("download, then convert", times[False]), ("--overlap", times[True])):
        lines.append(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in t)} |")  # fmt: skip
    lines += ["", f"--overlap / plain (medians): {ovl / plain:.3f}; saved "
              f"{plain - ovl:.2f} s ({(1 - ovl / plain) * 100:.0f}%)."]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
