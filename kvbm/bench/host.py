"""Host tier store/load bandwidth vs a plain numpy copy of the same bytes (the limit here)."""

from __future__ import annotations

import os

import numpy as np

from kvbm import BlockManager, KvbmConfig
from kvbm.bench import Context, Row, median_time


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for block_bytes in ctx.progress([64 << 10, 2 << 20], "host tier"):
        n = max(8, (256 << 20) // block_bytes) if not ctx.quick else max(8, (64 << 20) // block_bytes)
        data = np.random.default_rng(0).integers(0, 256, (n, block_bytes), dtype=np.uint8)
        out = np.empty_like(data)
        m = BlockManager(KvbmConfig(block_bytes=block_bytes, host_capacity_bytes=block_bytes * n, host_pinned=None))
        hashes = [os.urandom(16) for _ in range(n)]
        total = n * block_bytes

        def store() -> None:
            m.evict(n)
            m.store(hashes, data)

        t_store = median_time(store, repeat=5)
        t_load = median_time(lambda: m.load(hashes, out), repeat=5)
        assert np.array_equal(out, data)
        t_copy = median_time(lambda: np.copyto(out, data), repeat=5)
        limit = total / t_copy / 1e9
        kib = block_bytes >> 10
        rows.append(Row("host", f"store {kib} KiB blocks", total / t_store / 1e9, "GB/s", limit, "numpy copy",
                        (total / t_store / 1e9) / limit))
        rows.append(Row("host", f"load {kib} KiB blocks", total / t_load / 1e9, "GB/s", limit, "numpy copy",
                        (total / t_load / 1e9) / limit))
        m.close()
    return rows
