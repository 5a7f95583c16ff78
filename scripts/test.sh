#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite on CPU, real engines included.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/gdnfuse ] || bash scripts/setup.sh
# vLLM, sglang and mlx-lm in .venv-engines, transformers 4.x in .venv-tf4 (each is run for real)
if ! { [ -x .venv-tf4/bin/python ] && .venv-engines/bin/python -c "import vllm, sglang, mlx_lm" \
       2>/dev/null; }; then
  bash scripts/setup-engines.sh
fi
# The reflink tests loop-mount real XFS and btrfs filesystems (root; Debian's packages).
if ! command -v mkfs.xfs >/dev/null || ! command -v mkfs.btrfs >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing xfsprogs and btrfs-progs for the reflink tests"
    apt-get update -qq >/dev/null && apt-get install -y -qq xfsprogs btrfs-progs >/dev/null
  fi
fi
.venv/bin/ruff check gdnfuse tests scripts
.venv/bin/python -m mypy  # the files and settings are in pyproject.toml
# The engine tests must run here, not skip: they judge what users run.
export GDNFUSE_REQUIRE_ENGINES=1 GDNFUSE_ENGINE_PYTHON="$PWD/.venv-engines/bin/python"
.venv/bin/python -m pytest tests "$@"
