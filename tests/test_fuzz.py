"""Hypothesis fuzz suite over the Python API and the configuration (issue 12).

Each area runs in its own child process (tests/fuzz_worker.py) so that a segfault fails the
test and names the case (the child logs each case before running it) instead of killing
pytest. Two children run at a time. A case passes when it returns or raises a KvbmError; the
suite asserts 0 crashes and 0 other exceptions, and prints how many cases ran per area.
``KVBM_FUZZ_SCALE`` multiplies the case counts (e.g. 10 for a longer local run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

WORKER = Path(__file__).with_name("fuzz_worker.py")
SCALE = float(os.environ.get("KVBM_FUZZ_SCALE", "1"))
AREAS = {"api": 700, "api_disk": 150, "config": 500, "yaml": 250, "env": 300, "hashing": 250, "trace": 200}


def _run(area: str, n: int, log: Path) -> tuple[str, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    p = subprocess.run([sys.executable, "-X", "faulthandler", str(WORKER), area, str(n), str(log)],
                       capture_output=True, text=True, timeout=300, env=env)
    return area, p


def test_fuzz_api_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = {a: max(10, int(n * SCALE)) for a, n in AREAS.items()}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda a: _run(a, jobs[a], tmp_path / f"{a}.log"), jobs))
    counts, failures = {}, []
    for area, p in results:
        last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
        if p.returncode == 0 and last.startswith(f"FUZZ {area} "):
            counts[area] = last
            continue
        log = tmp_path / f"{area}.log"
        case = log.read_text(errors="replace").splitlines()[-1] if log.exists() and log.stat().st_size else "?"
        kind = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
        failures.append(f"{area}: {kind}; last case: {case[:1000]}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with capsys.disabled():  # the counts show in the CI log even though the test passes
        print("\nfuzz cases per area: " + "; ".join(line.removeprefix("FUZZ ") for line in counts.values()))
    assert not failures, "\n\n".join(failures)
