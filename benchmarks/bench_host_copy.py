"""Host block copies: glibc memcpy vs kvbm's copy_bytes at each relative offset, side by side.

Run: ``python benchmarks/bench_host_copy.py [--block-kib 64] [--mib 128] [--rounds 5]``

Note [Host copies] (csrc/host_copy.h): memcpy's ``rep movsb`` path slows down on some CPUs when the
destination sits a few bytes past the source modulo 4096. This copies ``--mib`` of ``--block-kib``
blocks from a page-aligned source (an arena) into a destination shifted by each offset, with
memcpy, the SSE2 loop and ``auto`` (what the host tier uses), alternating in one process; then the
host tier itself (``kvbm bench --suite host``) against a numpy copy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from kvbm import _native
from kvbm.bench import Context, format_table
from kvbm.bench import host as host_suite
from kvbm.bench.provenance import cpu_model, git_commit

OFFSETS = [0, 1, 16, 31, 32, 64, 2048, 4080]
IMPLS = ["memcpy", "sse2", "auto"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-kib", type=int, default=64)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bb = a.block_kib << 10
    n = (a.mib << 20) // bb
    raw_s = np.random.default_rng(0).integers(0, 256, n * bb + 8192, dtype=np.uint8)
    src = raw_s[(-raw_s.ctypes.data) % 4096:][:n * bb]
    raw_d = np.zeros(n * bb + 3 * 4096, np.uint8)
    base = (-raw_d.ctypes.data) % 4096
    rows = [src[i * bb:(i + 1) * bb] for i in range(n)]
    res: dict[int, dict[str, list[float]]] = {o: {m: [] for m in IMPLS} for o in OFFSETS}
    for r in range(a.rounds):
        for off in OFFSETS:
            dst = raw_d[base + off:base + off + n * bb]
            drows = [dst[i * bb:(i + 1) * bb] for i in range(n)]
            for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
                t = time.perf_counter()
                for d, s in zip(drows, rows):
                    _native.copy_bytes(d, s, impl)
                res[off][impl].append(n * bb / (time.perf_counter() - t) / 1e9)
            assert np.array_equal(dst, src)
    print(f"{a.mib} MiB in {a.block_kib} KiB blocks from a page-aligned source, {a.rounds} alternating rounds; "
          f"{cpu_model()}, commit {git_commit(short=True)}")
    print(f"{'dst - src mod 4096':>20}" + "".join(f"{m + ' GB/s':>14}" for m in IMPLS) + f"{'auto/memcpy':>13}")
    table = {}
    for off in OFFSETS:
        med = {m: statistics.median(res[off][m]) for m in IMPLS}
        table[off] = med
        print(f"{off:>20}" + "".join(f"{med[m]:>14.2f}" for m in IMPLS) + f"{med['auto'] / med['memcpy']:>12.2f}x")
    rows_host = host_suite.run(Context(quick=True))
    print(format_table(rows_host))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"machine": platform.node(), "cpu": cpu_model(), "commit": git_commit(), "block_bytes": bb,
                       "copies": {str(k): v for k, v in table.items()}, "raw": {str(k): v for k, v in res.items()},
                       "host_tier": [r.as_dict() for r in rows_host]}, f, indent=1)


if __name__ == "__main__":
    main()
