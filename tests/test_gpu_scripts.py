"""scripts/sanitizer_errors.py: UCX's memory-domain probe under compute-sanitizer is told apart
from any other error (the GPU machine's logs have this shape)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sanitizer_errors.py"

UCX = """========= Program hit CUDA_ERROR_INVALID_CONTEXT (error 201) due to "invalid device context" \
on CUDA API call to cuCtxSetFlags.
=========     Saved host backtrace up to driver entry point at error
=========         Host Frame: uct_cuda_copy_md_open in cuda_copy_md.c:982 [0xcddc] in libuct_cuda.so.0
=========         Host Frame: uct_md_open in uct_md.c:61 [0x145fa] in libuct.so.0
"""
OURS = """========= Invalid __global__ read of size 4 bytes
=========     at kv_gather_kernel+0x1c0 in kv_copy.cu:120
"""


def _run(tmp_path: Path, text: str) -> int:
    log = tmp_path / "s.log"
    log.write_text(text)
    return subprocess.run([sys.executable, str(SCRIPT), str(log)], capture_output=True, text=True).returncode


def test_only_ucx_probes_pass(tmp_path: Path) -> None:
    log = "========= COMPUTE-SANITIZER\n" + UCX * 2 + "2 passed in 3s\n========= ERROR SUMMARY: 2 errors\n"
    assert _run(tmp_path, log) == 0


def test_a_kernel_error_fails(tmp_path: Path) -> None:
    assert _run(tmp_path, UCX + OURS + "2 passed in 3s\n========= ERROR SUMMARY: 2 errors\n") == 1


def test_failed_tests_fail(tmp_path: Path) -> None:
    assert _run(tmp_path, "1 failed, 1 passed in 3s\n========= ERROR SUMMARY: 0 errors\n") == 1


def test_no_summary(tmp_path: Path) -> None:
    assert _run(tmp_path, "killed\n") == 2
