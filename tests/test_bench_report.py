"""``kvbm bench --report DIR``: a Markdown report with PNG plots of what the run measured (issue 16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PNG = b"\x89PNG\r\n\x1a\n"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbm", "bench", "--no-progress", *args], capture_output=True,
                          text=True, timeout=600, cwd="/")


def test_report_has_the_rows_and_the_plots(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    p = _bench("--suite", "eviction", "--suite", "host", "--report", str(out))
    assert p.returncode == 0, p.stderr
    report = (out / "report.md").read_text()
    for case in ("clairvoyant @ 5% capacity", "lru @ 25% capacity", "store 64 KiB blocks", "load 2048 KiB blocks"):
        assert case in report and case in p.stdout  # the table on stdout is the same run's
    assert "![Eviction](eviction.png)" in report and "![Tier bandwidth](bandwidth.png)" in report
    for png in ("eviction.png", "bandwidth.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert not (out / "index.png").exists()  # no index rows in this run: no index plot
    assert "report.md" in p.stderr


def test_report_into_a_file_is_one_line_error(tmp_path: Path) -> None:
    f = tmp_path / "a_file"
    f.write_text("x")
    p = _bench("--suite", "eviction", "--report", str(f))
    assert p.returncode != 0
    assert "--report" in p.stderr and "Traceback" not in p.stderr
