"""Count compute-sanitizer errors in a log, telling UCX's own apart from kvbm's.

UCX's CUDA memory domain calls ``cuCtxSetFlags`` at open (``uct_cuda_copy_md_open``) before any
context is current; compute-sanitizer reports that as CUDA_ERROR_INVALID_CONTEXT. It is UCX's
probe, not a kvbm error. Every other reported error counts.
Usage: python3 scripts/sanitizer_errors.py LOG   (exit 0: no kvbm error and the tests passed; 1: not so;
2: no summary)
"""

from __future__ import annotations

import re
import sys


def classify(text: str) -> tuple[int, int, int | None]:
    """(kvbm errors, UCX md-open errors, the sanitizer's own total or None)."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        m = re.search(r"========= (Program hit|Invalid|Error|Race|Uninitialized|Leaked)", line)
        if m:
            blocks.append([line])
        elif blocks and "=========     " in line:
            blocks[-1].append(line)
    ucx = sum(1 for b in blocks if "cuCtxSetFlags" in b[0] and any("uct_cuda_copy_md_open" in x for x in b))
    total = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return len(blocks) - ucx, ucx, int(total[-1]) if total else None


def main() -> int:
    with open(sys.argv[1], errors="replace") as f:
        text = f.read()
    kvbm, ucx, total = classify(text)
    if re.search(r"\b\d+ (failed|errors?)\b(?! summary)", text.split("ERROR SUMMARY")[0]):
        print("compute-sanitizer: the tests under it failed")
        return 1
    print(f"compute-sanitizer: {total} error(s) reported: {ucx} UCX memory-domain probe(s) (cuCtxSetFlags at "
          f"uct_cuda_copy_md_open), {kvbm} other")
    if total is None:
        return 2
    return 0 if kvbm == 0 and ucx == total else 1


if __name__ == "__main__":
    sys.exit(main())
