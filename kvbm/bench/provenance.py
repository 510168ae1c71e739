"""Where a benchmark result comes from: the git commit of the tree and the CPU that produced it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def git_commit(short: bool = False) -> str:
    """``$KVBM_COMMIT`` if set (trees copied without their git metadata, e.g. to the GPU machine),
    else ``git rev-parse HEAD`` of the checkout kvbm runs from, with ``-dirty`` when tracked files
    changed; "unknown" outside a git checkout."""
    env = os.environ.get("KVBM_COMMIT")
    if env:
        return env[:12] if short else env
    try:
        head = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", *(["--short"] if short else []), "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
