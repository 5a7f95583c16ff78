#!/usr/bin/env bash
# `gdnfuse verify --device cuda --tp N` end to end on a GPU machine (the device tool's, for one).
# Usage: bash scripts/gpu_verify_cli.sh N OUTDIR   (N GPUs; reports land in OUTDIR)
set -uo pipefail
n=${1:-1}; out=${2:-/tmp/gdnfuse-gpu}; work=$(mktemp -d)
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 - "$work/src" <<'PY'
import sys
from gdnfuse.synthetic import ModelShape, write_checkpoint
shape = ModelShape(hidden=512, layers=4, nk=16, nv=48, intermediate=1024, heads=4, kv_heads=2,
                   head_dim=64, vocab=1024)  # real GDN heads (dk = dv = 128, r = 3)
write_checkpoint(sys.argv[1], shape, dtype="BF16", shard_bytes=20 << 20, fast=True)
PY
status=0
for layout in qwen3-next tp-blocked; do
  python3 -m gdnfuse.cli convert "$work/src" --out "$work/$layout" --tp "$n" --layout "$layout" --quiet
  python3 -m gdnfuse.cli verify "$work/$layout" --against "$work/src" --device cuda --tp "$n" \
    --json "$out/verify-$layout-tp$n.json" > "$out/verify-$layout-tp$n.txt" 2>&1
  rc=$?; echo "verify $layout --device cuda --tp $n: exit $rc"; [ $rc -eq 0 ] || status=1
done
# Planted fault: qwen3-next bytes recorded as tp-blocked (the layouts differ: nk/tp > 1).
python3 - "$work/qwen3-next/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["gdnfuse"]["layout"] = "tp-blocked"
json.dump(c, open(sys.argv[1], "w"))
PY
python3 -m gdnfuse.cli verify "$work/qwen3-next" --against "$work/src" --device cuda --tp "$n" \
  --no-numeric > /dev/null 2>&1; echo "planted wrong record, structure+exact: exit $?"
python3 -c "
from gdnfuse.verify import check_gpu
from pathlib import Path
r = check_gpu(Path('$work/qwen3-next'), '$work/src', $n, 'cuda')
print('planted wrong record, GPU check caught:', not any(x.ok for x in r))
for x in r: print(' ', x.name, x.ok, x.detail[:200])
"
rm -rf "$work"
exit $status
