#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run the tests (GPU ones included), run
# compute-sanitizer memcheck over the kernel tests, run the data path benchmark. Logs and
# results go to $OUT (default /tmp/kvbm_gpu_out). Usage: bash scripts/gpu_check.sh [--no-bench]
set -uo pipefail
OUT=${OUT:-/tmp/kvbm_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() { echo "=== $* ($(date -u +%T))"; }

step "device"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
  $PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'; nvcc --version | tail -1; } \
  2>&1 | tee "$OUT/device.txt"

step "build (KVBM_CUDA=ON)"
if ! KVBM_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 $PY -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT/build.log" 2>&1; then
  echo "pip build failed, trying setup.py build_ext --inplace"; tail -30 "$OUT/build.log"
  KVBM_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
fi
$PY -c 'import kvbm._native as n; print("cuda_compiled", n.cuda_compiled(), "cuda_available", n.cuda_available())'

step "GPU tests"
$PY -m pytest -v -rfEs --tb=short -p no:cacheprovider tests/test_kv_copy_gpu.py >"$OUT/gpu_tests.log" 2>&1 || status=1
grep -E "FAILED|ERROR|Fatal|passed|failed" "$OUT/gpu_tests.log" | tail -25

step "other tests (a separate process)"
$PY -m pytest -q -rfEs --tb=short -p no:cacheprovider tests/ --ignore=tests/test_kv_copy_gpu.py \
  >"$OUT/cpu_tests.log" 2>&1 || status=1
tail -15 "$OUT/cpu_tests.log"

step "compute-sanitizer memcheck (kernel tests)"
compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
  $PY -m pytest -q -p no:cacheprovider tests/test_kv_copy_gpu.py \
  -k "(separate_k_v and (bfloat16 or e4m3)) or unaligned or mla or arena or large_batch or hnd or single_block" \
  >"$OUT/sanitizer.log" 2>&1
rc=$?
tail -8 "$OUT/sanitizer.log"; echo "compute-sanitizer exit code: $rc"
[ $rc -eq 0 ] || status=1

if [ "${1:-}" != "--no-bench" ]; then
  step "benchmark"
  $PY benchmarks/bench_cuda_datapath.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -v '^|' | tail -60 || status=1
  tail -70 "$OUT/cuda_datapath.md" 2>/dev/null
fi
step "done status=$status"
exit $status
