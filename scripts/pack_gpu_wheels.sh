#!/usr/bin/env bash
# Downloads the pure / cp312 wheels the GPU machine lacks (it has no package index) into OUTDIR
# (default .whl/); scripts/gpu_all.sh installs them into /tmp/site there. ~10 MiB.
set -euo pipefail
out=$(realpath -m "${1:-.whl}"); mkdir -p "$out"
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" \
  "lmdb>=1.4" "redis>=5" "prometheus_client>=0.17" "hypothesis>=6" sortedcontainers attrs \
  "import-linter>=2.1" grimp click typing_extensions rich markdown-it-py mdurl pygments \
  "msgspec>=0.18" "pyzmq>=25" "aiohttp>=3.9" aiohappyeyeballs aiosignal frozenlist multidict yarl propcache idna
du -sh "$out"
