#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/gdnfuse ] || bash scripts/setup.sh
.venv/bin/ruff check gdnfuse tests scripts
.venv/bin/python -m pytest tests "$@"
