#!/usr/bin/env bash
# Where `gdnfuse verify --device cuda` spends its time (issue 22.10), on a lent GPU machine:
# a 27B-shaped checkpoint with 3 GDN layers, converted at --tp 2; verify on CPU and on CUDA
# (wall time of each, per-check seconds from the JSON report), Python's import time of the
# CLI, and a cProfile of the CUDA run's main process. Usage: bash scripts/bench_verify_gpu.sh OUTDIR
set -euo pipefail
out=${1:?output directory}
work=${WORK:-/tmp/gdnfuse-gpu-bench}
mkdir -p "$out" "$work"
gdn() { python3 -m gdnfuse.cli "$@"; }
secs() { local t0=$EPOCHREALTIME; "$@" >/dev/null; python3 -c "print(round($EPOCHREALTIME - $t0, 2))"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/machine.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/machine.txt"
[ -d "$work/src" ] || gdn synth "$work/src" --preset qwen3.5-27b --layers 4 --vocab 4096
[ -d "$work/out" ] || gdn convert "$work/src" --out "$work/out" --tp 2 --quiet
echo "import of the CLI (s): $(secs python3 -c 'import gdnfuse.cli')" | tee "$out/timings.txt"
echo "import torch (s): $(secs python3 -c 'import torch')" | tee -a "$out/timings.txt"
python3 -X importtime -c 'import gdnfuse.verify.numeric, gdnfuse.reference.gpu' 2> "$out/importtime.txt" || true
python3 -X importtime -c 'import fla.ops.gated_delta_rule' 2> "$out/importtime-fla.txt" || true
echo "import fla's ops (s): $(secs python3 -c 'import fla.ops.gated_delta_rule, fla.modules.norm.fused_norm_gate, fla.modules.causal_conv1d')" | tee -a "$out/timings.txt"
export TRITON_CACHE_DIR=$work/triton-cache
rm -rf "$TRITON_CACHE_DIR"
s=$(secs gdn verify "$work/out" --against "$work/src" --device cpu --report "$out/verify-cpu.json")
echo "verify --device cpu (s): $s" | tee -a "$out/timings.txt"
s=$(secs gdn verify "$work/out" --against "$work/src" --device cuda --report "$out/verify-cuda-cold.json")
echo "verify --device cuda, empty Triton cache (s): $s" | tee -a "$out/timings.txt"
s=$(secs gdn verify "$work/out" --against "$work/src" --device cuda --report "$out/verify-cuda.json")
echo "verify --device cuda, Triton cache filled (s): $s" | tee -a "$out/timings.txt"
s=$(secs gdn verify "$work/out" --against "$work/src" --device cuda --layers 0 --report "$out/verify-cuda-layer0.json")
echo "verify --device cuda --layers 0 (s): $s" | tee -a "$out/timings.txt"
python3 -m cProfile -o "$work/cuda.prof" -m gdnfuse.cli verify "$work/out" --against "$work/src" --device cuda --quiet > /dev/null || true
python3 -c "import pstats; pstats.Stats('$work/cuda.prof').sort_stats('cumulative').print_stats(30)" > "$out/profile-cuda.txt"
python3 - "$out" <<'PY'
import json, sys
for dev in ("cpu", "cuda-cold", "cuda"):
    r = json.load(open(f"{sys.argv[1]}/verify-{dev}.json"))
    print(dev, "ok" if r["ok"] else "FAILED", [(c["name"], c["seconds"]) for c in r["checks"] if c["seconds"] > 0.5])
PY
