"""Host tier store/load bandwidth vs a plain numpy copy of the same bytes (the limit here).
Each rep times ours and the copy back to back; the ratio is the median of per-rep ratios (robust
to the drift of a shared machine)."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from kvbm import BlockManager, KvbmConfig
from kvbm.bench import Context, Row


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    reps = 9 if ctx.quick else 15
    for block_bytes in ctx.progress([64 << 10, 2 << 20], "host tier"):
        n = max(8, ((128 if ctx.quick else 512) << 20) // block_bytes)
        data = np.random.default_rng(0).integers(0, 256, (n, block_bytes), dtype=np.uint8)
        out = np.empty_like(data)
        m = BlockManager(KvbmConfig(block_bytes=block_bytes, host_capacity_bytes=block_bytes * n))
        hashes = [os.urandom(16) for _ in range(n)]
        total = n * block_bytes

        def store(m=m, n=n, hashes=hashes, data=data) -> None:
            m.store(hashes, data)

        def load(m=m, hashes=hashes, out=out) -> None:
            m.load(hashes, out)

        def copy(out=out, data=data) -> None:
            np.copyto(out, data)

        store(), load(), copy()  # warm-up: pages faulted in
        s_t, l_t, c_t = [], [], []
        for _ in range(reps):
            m.evict(n)
            s_t.append(_t(store))
            l_t.append(_t(load))
            c_t.append(_t(copy))
        assert np.array_equal(out, data)
        kib = block_bytes >> 10
        limit = total / statistics.median(c_t) / 1e9
        for name, ts in (("store", s_t), ("load", l_t)):
            ratio = statistics.median(c / t for c, t in zip(c_t, ts))
            rows.append(Row("host", f"{name} {kib} KiB blocks", total / statistics.median(ts) / 1e9, "GB/s",
                            limit, "numpy copy", ratio, params={"op": name, "block_kib": kib}))
        m.close()
    return rows
