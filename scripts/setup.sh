#!/usr/bin/env bash
# Create .venv with gdnfuse, the CPU build of torch 2.13.0 (for verify and the tests; no CUDA
# download) and the test extras. Needs Python 3.11 or newer. pip's own output goes to a log
# that is shown only if pip fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for cand in python3.11 python3.12 python3.13 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PY=$(command -v "$cand"); break
  fi
done
[ -n "$PY" ] || { echo "setup: Python 3.11 or newer is required (found none on PATH)" >&2; exit 1; }
LOG=$(mktemp -t gdnfuse-setup.XXXXXX.log)
trap 'rm -f "$LOG"' EXIT
pip_q() {
  .venv/bin/python -m pip install -q "$@" >"$LOG" 2>&1 || {
    echo "setup: pip install $* failed:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
}
echo "setup: creating .venv with $("$PY" --version)"
"$PY" -m venv .venv
pip_q --upgrade pip
echo "setup: installing torch 2.13.0, CPU build (.venv ends near 2.2 GB)"
pip_q "torch==2.13.0"
echo "setup: installing gdnfuse (editable) with its test extras"
pip_q -e ".[test]"
echo "setup: done; activate with: source .venv/bin/activate"
