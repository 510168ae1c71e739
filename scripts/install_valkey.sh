#!/usr/bin/env bash
# Install valkey-server (Debian package) for the Valkey / cluster remote-tier tests, when it is missing.
# Debian 12 (bookworm) ships it in bookworm-backports (enabled here if needed); Debian 13 in main.
# Tests start their own servers on 127.0.0.1 with free ports and temp dirs; none is left running.
set -euo pipefail
if command -v valkey-server >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
if [ -z "$(apt-cache policy valkey-server 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v none)" ]; then
  . /etc/os-release
  if [ "${VERSION_CODENAME:-}" = "bookworm" ]; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/kvbm-backports.list >/dev/null
    $SUDO apt-get update -q
  fi
fi
if ! $SUDO apt-get install -y -q --no-install-recommends valkey-server 2>/dev/null; then
  $SUDO apt-get install -y -q --no-install-recommends -t "${VERSION_CODENAME:-bookworm}-backports" valkey-server || {
    echo "valkey-server is not installable here: the Valkey tests will skip with that reason" >&2
    exit 0
  }
fi
# The package may start a system service; the tests do not use it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet valkey-server 2>/dev/null; then
  $SUDO systemctl stop valkey-server || true
fi
valkey-server --version
