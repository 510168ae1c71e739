"""Disk tier slab growth: write throughput and space used, preallocated vs grown on demand vs sparse.

Run: ``python benchmarks/bench_disk_growth.py [--dir DIR] [--mib 512] [--slot-kib 256] [--rounds 3]``

The vLLM connector no longer preallocates its slab files (issue 17): they are fallocate()d in
chunks as written (``DiskStore(grow_bytes=...)``). This measures what that costs, side by side in
one run, alternating the modes each round in fresh directories: fresh slots written by 4 IO
threads (O_DIRECT where the file system takes it, no sync), the slab preallocated in full at open
(the old way, not timed), grown in chunks (``--grow-mib``; the connector uses 64), or left sparse
(every write extends the file).
Reported: median MB/s per mode, its ratio to preallocated, and the bytes allocated afterwards for a
capacity 4x what was written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np

from kvbm import _native
from kvbm.tiers.disk import RECORD_HEADER

MODES: dict[str, dict] = {}


def one(root: str, mode: str, slot: int, n: int) -> tuple[float, int]:
    d = tempfile.mkdtemp(dir=root)
    try:
        cap = 4 * n  # the capacity is 4x what is written: what preallocation would reserve
        st = _native.DiskStore(d, slot, cap, cap, 4, True, False, **MODES[mode])
        raw = np.empty(slot + 4096, np.uint8)  # 4096-aligned source: transferred in place
        off = (-raw.ctypes.data) % 4096
        src = raw[off:off + slot]
        src[:] = np.random.default_rng(1).integers(0, 256, slot, dtype=np.uint8)
        keys = [i.to_bytes(16, "little") for i in range(n)]
        t0 = time.perf_counter()
        hs = []
        for i in range(0, n, 32):
            sl = list(range(i, min(i + 32, n)))
            hs.append(st.write(sl, [src] * len(sl), [slot] * len(sl), 0, keys[i:i + 32]))
        for h in hs:
            h.wait()
            assert h.results()[0].tolist() == [0] * len(h.results()[0]), h.results()[3][:1]
        dt = time.perf_counter() - t0
        st.close()
        alloc = sum(os.stat(os.path.join(d, f)).st_blocks * 512 for f in os.listdir(d))
        return n * slot / dt / 1e6, alloc
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--slot-kib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--grow-mib", default="16,64", help="comma-separated growth chunks to measure")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    MODES["preallocated"] = dict(preallocate=True)
    for g in a.grow_mib.split(","):
        MODES[f"grow_{g}MiB"] = dict(preallocate=False, grow_bytes=int(g) << 20)
    MODES["sparse"] = dict(preallocate=False)
    root = a.dir or tempfile.mkdtemp()
    slot = a.slot_kib << 10
    n = (a.mib << 20) // slot
    res: dict[str, list[tuple[float, int]]] = {m: [] for m in MODES}
    for r in range(a.rounds):
        for m in (list(MODES) if r % 2 == 0 else list(reversed(MODES))):
            res[m].append(one(root, m, slot, n))
    base = statistics.median(x for x, _ in res["preallocated"])
    out = {"machine": platform.node(), "cpu_count": os.cpu_count(), "dir": root, "written_bytes": n * slot,
           "record_bytes": n * (slot + RECORD_HEADER), "slot_bytes": slot, "rounds": a.rounds, "modes": {}}
    print(f"{n} fresh slots of {a.slot_kib} KiB ({a.mib} MiB) written by 4 IO threads in {root}, "
          f"capacity 4x that; {a.rounds} alternating rounds")
    print(f"{'mode':<14}{'MB/s (median)':>15}{'vs preallocated':>17}{'allocated MiB':>15}")
    for m, xs in res.items():
        mb = statistics.median(x for x, _ in xs)
        alloc = statistics.median(y for _, y in xs)
        out["modes"][m] = {"mb_s": [x for x, _ in xs], "median_mb_s": mb, "ratio": mb / base, "allocated": alloc}
        print(f"{m:<14}{mb:>15.0f}{mb / base:>17.2f}{alloc / (1 << 20):>15.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
