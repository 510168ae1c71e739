#!/usr/bin/env bash
# GPU checks of the transfer engine on the GPU machine (no package index there): unpack the UCX
# stack packed by ../shared/tools/pack_ucx_for_device.sh, build kvbm in place, run the transfer
# tests (GPU ones included: cuda_ipc between two processes on one GPU, GPU -> remote host), the
# GPU transfer benchmark and the KV handoff script on one GPU.
# Usage (repo root of a copy of this tree, with UCXDIR holding ucx_stack.tgz and a pybind11 wheel):
#   UCXDIR=../.ucx OUT=/some/dir bash scripts/gpu_transfer_check.sh
set -uo pipefail
UCXDIR=${UCXDIR:-../.ucx}
OUT=${OUT:-/tmp/kvbm_gpu_out}
mkdir -p "$OUT" /opt/ucx /tmp/pb
tar xzf "$UCXDIR/ucx_stack.tgz" -C /opt/ucx
python3 -m pip install -q --no-index --no-deps --target /tmp/pb "$UCXDIR"/pybind11-*.whl 2>/dev/null \
  || echo "pybind11 wheel not installed (using the one present, if any)"
export PYTHONPATH=/opt/ucx:/tmp/pb:$PWD:${PYTHONPATH:-}
export UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s)
if ! KVBM_UCX=ON KVBM_UCX_ROOT=/opt/ucx/libucx KVBM_CUDA=${KVBM_CUDA:-ON} CMAKE_BUILD_PARALLEL_LEVEL=16 \
     python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
  echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import kvbm; print(kvbm.build_info())" || exit 1
status=0
timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_transfer.py tests/test_transfer_cuda_ipc_gpu.py -rs 2>&1 | tee "$OUT/tests.log" | tail -25 || status=1
timeout 150 python3 benchmarks/bench_transfer_gpu.py --reps 10 --out "$OUT/transfer_gpu" 2>&1 | grep -v "^\[" | tail -12 || status=1
timeout 200 python3 benchmarks/two_gpu_handoff.py --src-device 0 --dst-device 0 --reps 10 \
  --out "$OUT/two_gpu_handoff_1gpu" 2>&1 | tail -8 || status=1
exit $status
