#!/usr/bin/env bash
# Build kvbm._native with AddressSanitizer + UBSan (no CUDA) into a standalone package copy at
# $1 (default build/asan-pkg), for running the native tests under the sanitizers.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/asan-pkg}
rm -rf "$out" && mkdir -p "$out"
cp -r kvbm "$out/kvbm"
find "$out/kvbm" -name '_native*.so' -delete
KVBM_SANITIZE=1 KVBM_CUDA=OFF KVBM_UCX=OFF KVBM_BUILD_TYPE=RelWithDebInfo \
  python setup.py -q build_ext --build-temp build/asan-tmp --build-lib "$out" >/dev/null
ls "$out"/kvbm/_native*.so >/dev/null
