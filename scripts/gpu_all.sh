#!/usr/bin/env bash
# Everything kvbm runs on the GPU machine, in two device calls (each must stay under 10 min):
#   bash scripts/gpu_all.sh build        # build (CUDA+UCX) only
#   bash scripts/gpu_all.sh build-test   # build (CUDA+UCX), full test suite incl. GPU tests,
#                                         # compute-sanitizer memcheck, CUDA data path benchmark
#   bash scripts/gpu_all.sh bench         # transfer engine on GPU, 1-GPU KV handoff, index at 10M,
#                                         # disk tier vs raw O_DIRECT on this machine's disk,
#                                         # vLLM-layout worker path
#   bash scripts/gpu_all.sh vllm-bench    # kvbm vs vLLM's own offloading in real vLLM 0.26 (after the unpack
#                                         # calls below): benchmarks/bench_vllm_gpu.py -> $OUT/vllm_gpu_bench.md
#   bash scripts/gpu_all.sh host-transfer # host->host transfer engine vs ucx_perftest and NIXL on this
#                                         # machine's idle cores (needs nixl.tgz + ucx_perftest in $UCXDIR)
#   bash scripts/gpu_all.sh vllm          # build (CUDA+UCX), then kvbm's connector inside real vLLM 0.26.0
#                                         # (tests/test_vllm_real_gpu.py) -> $OUT/vllm_gpu.json + logs
# vLLM on the GPU machine: ../shared/tools/pack_vllm_for_device.sh makes the bundles (under .vb/, with
# the vllm tarball split so that each call's carry stays under 64 MiB); earlier back-to-back calls
# (a warm machine keeps /opt and /tmp) unpack vLLM into /opt/v and its Python deps into /tmp/site:
#   carry .vb/v1: mkdir -p /opt/vb && cp .vb/v1/vllm.tar.xz.part00 /opt/vb/
#   carry .vb/v3: cat /opt/vb/vllm.tar.xz.part00 .vb/v3/vllm.tar.xz.part01 > /opt/vb/vllm.tar.xz; mkdir -p /opt/v
#                 python3 -c "import tarfile; tarfile.open('/opt/vb/vllm.tar.xz').extractall('/opt/v')"
#                 python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.vb/v3/fa3.so.xz'),
#                   open('/opt/v/vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so','wb'))"; mkdir -p /opt/vwhl; cp .vb/v3/*.whl /opt/vwhl/
#   carry .vb/v2: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .vb/v2/*.whl /opt/vwhl/*.whl
#   carry the tree (+ .vb/v4, the wheels that did not fit): VB_EXTRA=../.vb/v4 bash scripts/gpu_all.sh vllm
#   (KVBM_VLLM_K=<pytest -k> KVBM_VLLM_GPU_ONLY=<engine prefix> KVBM_VLLM_SKIP_PD=1: a subset)
# When the bundles need no split (tree + bundle under 64 MiB): call 1 carries .vb/v1 and untars it into
# /opt/v, call 2 carries .vb/v3, call 3 carries .vb/v2 and installs, then runs this script.
# GPU_MARK=1 with build-test runs the GPU-marked tests only (the CPU tests run in CI at the same commit).
# The UCX stack comes as ../.ucx/ucx_stack.tgz (../shared/tools/pack_ucx_for_device.sh), carried
# with the tree. Logs and results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/kvbm_gpu_out}
UCXDIR=${UCXDIR:-.ucx}
mkdir -p "$OUT" /opt/ucx
export PYTHONUNBUFFERED=1 UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n NCCL_NVLS_ENABLE=0
[ -f /opt/ucx/.unpacked ] || { tar xzf "$UCXDIR/ucx_stack.tgz" -C /opt/ucx && touch /opt/ucx/.unpacked; }
# Pure/abi wheels the GPU machine lacks (lmdb, redis, prometheus_client, hypothesis, ...), carried as .whl/
if [ -d .whl ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
export PYTHONPATH=/opt/ucx:$PWD:${PYTHONPATH:-}:/tmp/site PATH=/tmp/site/bin:$PATH  # lint-imports from .whl
status=0
step() { echo "=== $* ($(date -u +%T))"; }

build() {
  step device
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
  step build
  KVBM_UCX=ON KVBM_UCX_ROOT=/opt/ucx/libucx KVBM_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  python3 -c "import kvbm; print(kvbm.build_info())" | tee -a "$OUT/device.txt" || exit 1
}

case "${1:-build-test}" in
build)
  build
  ;;
build-test)
  build
  step "tests (all, GPU included)"
  timeout 420 python3 -m pytest -q -rfEs -p no:cacheprovider tests/ --maxfail=10 --ignore=tests/test_vllm_connector.py \
    ${GPU_MARK:+-m gpu} \
    >"$OUT/tests.log" 2>&1 || status=1
  grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -15
  step "compute-sanitizer memcheck (kernel tests)"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider tests/test_kv_copy_gpu.py \
    -k "(separate_k_v and (bfloat16 or e4m3)) or unaligned or mla or arena or large_batch or hnd or single_block" \
    >"$OUT/sanitizer.log" 2>&1; rc=$?
  tail -4 "$OUT/sanitizer.log"; echo "compute-sanitizer exit code: $rc"; [ $rc -eq 0 ] || status=1
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider tests/test_vllm_worker_gpu.py tests/test_pd_gpu.py -k "layer_range or byte_exact" \
    >"$OUT/sanitizer_worker.log" 2>&1; rc=$?
  tail -4 "$OUT/sanitizer_worker.log"; echo "compute-sanitizer (connector worker) exit code: $rc"
  # UCX's memory-domain probe (cuCtxSetFlags at open) is reported too: only other errors count
  python3 scripts/sanitizer_errors.py "$OUT/sanitizer_worker.log" || status=1
  [ "${SKIP_BENCH:-0}" = 1 ] && { step "done status=$status"; exit $status; }
  step "CUDA data path benchmark"
  timeout 200 python3 benchmarks/bench_cuda_datapath.py --out "$OUT" >"$OUT/bench_cuda.log" 2>&1 || status=1
  grep -E "^\| (offload|onboard|both|matmul|naive|contig)" "$OUT/cuda_datapath.md" 2>/dev/null | head -30
  ;;
bench)
  python3 -c "import kvbm; print(kvbm.build_info())" || exit 1
  step "transfer engine on GPU"
  timeout 120 python3 benchmarks/bench_transfer_gpu.py --reps 10 --out "$OUT/transfer_gpu" 2>&1 | grep -v "^\[" | tail -10 || status=1
  step "KV handoff through the transfer engine, one GPU (issue 7's code path)"
  timeout 100 python3 benchmarks/two_gpu_handoff.py --src-device 0 --dst-device 0 --reps 10 \
    --out "$OUT/two_gpu_handoff_1gpu" 2>&1 | tail -8 || status=1
  step "index scale incl. 10M blocks"
  timeout 150 python3 -m kvbm bench --suite index --suite hashing --suite host --full --json --no-progress \
    >"$OUT/kvbm_bench_full.json" 2>"$OUT/kvbm_bench_full.err" || status=1
  python3 - "$OUT/kvbm_bench_full.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    print(f"{r['suite']:8} {r['case']:36} {r['value']:10.4g} {r['unit']:12} {r['ratio'] or ''}")
PY
  step "disk tier vs raw O_DIRECT on this machine's disk"
  mkdir -p /var/tmp/kvbm-disk-bench
  timeout 150 python3 benchmarks/bench_disk.py --dir /var/tmp/kvbm-disk-bench --json "$OUT/disk_gpu_machine.json" \
    --md "$OUT/disk_gpu_machine.md" 2>&1 | tail -15 || status=1
  if [ -f benchmarks/bench_vllm_worker_gpu.py ]; then
    step "vLLM-layout worker save/load path on CUDA"
    timeout 120 python3 benchmarks/bench_vllm_worker_gpu.py --out "$OUT/vllm_worker_gpu" 2>&1 | tail -12 || status=1
  fi
  if [ -f benchmarks/bench_vllm_layerwise_gpu.py ]; then
    step "vLLM connector worker: layer-wise vs whole-block copies around a forward"
    timeout 150 python3 benchmarks/bench_vllm_layerwise_gpu.py --out "$OUT/vllm_layerwise_gpu" 2>&1 | tail -14 || status=1
  fi
  ;;
vllm)
  # vLLM 0.26.0 (CUDA 13, torch 2.11: the GPU machine's) from /opt/v; its deps in /tmp/site (see the header).
  export PYTHONPATH=/opt/v:$PYTHONPATH NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  [ -d /opt/v/vllm ] || { echo "vLLM is not unpacked in /opt/v: run the unpack calls of this script's header first"; exit 2; }
  if [ -n "${VB_EXTRA:-}" ] && [ -d "$VB_EXTRA" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$VB_EXTRA"/*.whl || exit 1
  fi
  build
  python3 -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)" | tee -a "$OUT/device.txt" || exit 1
  step "kvbm's connector inside real vLLM (tests/test_vllm_real_gpu.py)"
  rm -rf /tmp/vllm_gpu_logs
  KVBM_VLLM_GPU_REPORT="$OUT/vllm_gpu.json" KVBM_VLLM_GPU_LOGDIR=/tmp/vllm_gpu_logs \
    timeout $(( ${KVBM_VLLM_DEADLINE_S:-575} - SECONDS )) python3 -m pytest -v -rfEs -p no:cacheprovider \
    tests/test_vllm_real_gpu.py ${KVBM_VLLM_K:+-k "$KVBM_VLLM_K"} >"$OUT/vllm_gpu_tests.log" 2>&1 || status=1
  [ "${KVBM_VLLM_SKIP_PD:-0}" = 1 ] || {
  step "P/D between two real vLLM processes on the GPU (tests/test_vllm_pd_gpu.py)"
  KVBM_VLLM_PD_GPU_REPORT="$OUT/vllm_pd_gpu.json" KVBM_VLLM_GPU_LOGDIR=/tmp/vllm_gpu_logs \
    timeout $(( ${KVBM_VLLM_DEADLINE_S:-575} - SECONDS )) python3 -m pytest -v -rfEs -p no:cacheprovider \
    tests/test_vllm_pd_gpu.py >"$OUT/vllm_pd_gpu_tests.log" 2>&1 || status=1
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$OUT/vllm_pd_gpu_tests.log" | head -20
  [ -f "$OUT/vllm_pd_gpu.json" ] && cat "$OUT/vllm_pd_gpu.json" | head -60; }
  [ -d /tmp/vllm_gpu_logs ] && tar czf "$OUT/vllm_gpu_logs.tgz" -C /tmp vllm_gpu_logs
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$OUT/vllm_gpu_tests.log" | head -40
  [ -f "$OUT/vllm_gpu.json" ] && python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])), indent=1)[:6000])" "$OUT/vllm_gpu.json"
  ;;
vllm-bench)
  # kvbm vs vLLM's own offloading (CPU tier, + fs tier, + kvbm's disk tier under it) in real vLLM 0.26:
  # TTFT 8k/32k cold / host / disk after restart, decode ITL at 0% hits, multi-turn chat
  # (benchmarks/bench_vllm_gpu.py; BENCH_ARGS adds its options) -> $OUT/vllm_gpu_bench.{md,json}
  export PYTHONPATH=/opt/v:$PYTHONPATH NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  [ -d /opt/v/vllm ] || { echo "vLLM is not unpacked in /opt/v: run the unpack calls of this script's header first"; exit 2; }
  python3 -c "import kvbm; print(kvbm.build_info())" >/dev/null 2>&1 || build
  df -h /tmp /var/tmp | tee "$OUT/df.txt"; free -g | tee -a "$OUT/df.txt"
  step "kvbm vs vLLM native offloading in real vLLM (benchmarks/bench_vllm_gpu.py)"
  rm -rf /var/tmp/kvbm_vllm_bench/disk_* /var/tmp/kvbm_vllm_bench/mtdisk_*
  timeout $(( ${KVBM_VLLM_DEADLINE_S:-585} - SECONDS )) python3 benchmarks/bench_vllm_gpu.py --out "$OUT" \
    --work /var/tmp/kvbm_vllm_bench ${BENCH_ARGS:-} >"$OUT/vllm_gpu_bench.log" 2>&1 || status=1
  tail -c 9000 "$OUT/vllm_gpu_bench.log"
  mkdir -p "$OUT/engine_logs" && cp /var/tmp/kvbm_vllm_bench/*.log "$OUT/engine_logs/" 2>/dev/null
  ;;
host-transfer)
  # NIXL (trimmed wheel: core, UCX plugin and the libraries they need) and ucx_perftest are carried
  # beside the UCX stack; NIXL keeps its own bundled UCX in its own processes.
  if [ -f "$UCXDIR/nixl.tgz" ] && [ ! -f /opt/nixl/.unpacked ]; then
    mkdir -p /opt/nixl && tar xzf "$UCXDIR/nixl.tgz" -C /opt/nixl && touch /opt/nixl/.unpacked
  fi
  mkdir -p /opt/ucx/libucx/bin && cp "$UCXDIR/ucx_perftest" /opt/ucx/libucx/bin/ && chmod +x /opt/ucx/libucx/bin/ucx_perftest
  export PYTHONPATH=$PYTHONPATH:/opt/nixl
  step "host->host transfer engine vs ucx_perftest and NIXL"
  timeout 420 python3 benchmarks/bench_transfer.py --trials "${TRIALS:-3}" --machine-note "GPU machine host, idle" --out "$OUT/transfer_host" 2>&1 | tail -14 \
    || status=1
  ;;
esac
step "done status=$status"
exit $status
