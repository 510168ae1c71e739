#!/usr/bin/env bash
# Install redis-server (Debian package) for the Redis remote-tier tests, when it is missing.
# Tests start their own server on 127.0.0.1 with a free port and a temp dir; none is left running.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends redis-server
# The package may start a system service; the tests do not use it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
  $SUDO systemctl stop redis-server || true
fi
redis-server --version
