#!/usr/bin/env bash
# Create .venv with gdnfuse, the CPU build of torch 2.13.0 (for verify and the tests; no CUDA
# download) and the test extras. Needs Python 3.11 or newer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for cand in python3.11 python3.12 python3.13 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PY=$(command -v "$cand"); break
  fi
done
[ -n "$PY" ] || { echo "setup: Python 3.11 or newer is required (found none on PATH)" >&2; exit 1; }
echo "setup: creating .venv with $("$PY" --version)"
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
echo "setup: installing torch 2.13.0, CPU build (.venv ends near 2.2 GB)"
.venv/bin/python -m pip install -q "torch==2.13.0"
echo "setup: installing gdnfuse (editable) with its test extras"
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup: done; activate with: source .venv/bin/activate"
