#!/usr/bin/env bash
# verify --device cuda on one GPU at 27B GDN shapes (issue 23, the part one GPU allows):
# qwen3-next and tp-blocked outputs with --layers selecting a subset, and two planted faults
# that must fail: a wrong layout record, and two value heads swapped in one fused tensor.
# Usage: bash scripts/gpu_verify_faults.sh OUTDIR   (prints one line per run: exit code, wall s)
set -uo pipefail
out=${1:?output directory}
work=${WORK:-/tmp/gdnfuse-gpu-faults}
mkdir -p "$out" "$work"
gdn() { python3 -m gdnfuse.cli "$@"; }
[ -d "$work/src" ] || gdn synth "$work/src" --preset qwen3.5-27b --layers 4 --vocab 4096 >/dev/null
[ -d "$work/q3n" ] || gdn convert "$work/src" --out "$work/q3n" --tp 2 --quiet 2>/dev/null
[ -d "$work/tpb" ] || gdn convert "$work/src" --out "$work/tpb" --tp 2 --layout tp-blocked --quiet 2>/dev/null
rm -rf "$work/lie" "$work/swap"
cp -r "$work/q3n" "$work/lie"
python3 - "$work/lie/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["gdnfuse"]["layout"] = "tp-blocked"; json.dump(c, open(sys.argv[1], "w"))
PY
cp -r "$work/q3n" "$work/swap"
python3 - "$work/swap" <<'PY'
# swap the first two value heads' rows of layer 0's in_proj_qkvz (qwen3-next rows: per key
# head Q, K, then r value heads of dv rows): bytes only, so any dtype works
import json, struct, sys
from pathlib import Path
root = Path(sys.argv[1]); name = "model.language_model.layers.0.linear_attn.in_proj_qkvz.weight"
shard = root / json.load(open(root / "model.safetensors.index.json"))["weight_map"][name]
with open(shard, "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]; info = json.loads(f.read(n))[name]
    rows, cols = info["shape"]; row = cols * 2; start = 8 + n + info["data_offsets"][0]
    v0 = start + 2 * 128 * row  # after Q_0 and K_0 (dk = 128)
    f.seek(v0); a = f.read(128 * row); b = f.read(128 * row)
    f.seek(v0); f.write(b + a)
PY
run() {
  local name=$1; shift; local t0=$EPOCHREALTIME
  gdn verify "$@" --against "$work/src" --device cuda --report "$out/$name.json" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc, $(python3 -c "print(round($EPOCHREALTIME - $t0, 1))") s" | tee -a "$out/summary.txt"
}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$work/triton-cache}
run qwen3-next-tp2-layers-0-1 "$work/q3n" --tp 2 --layers 0,1
run tp-blocked-tp2-layers-2 "$work/tpb" --tp 2 --layers 2
run planted-wrong-record "$work/lie" --tp 2 --layers 0
run planted-swapped-heads "$work/swap" --tp 2 --layers 0
grep -h "^FAIL" "$out"/planted-*.txt | cut -c1-300 | tee -a "$out/summary.txt"
