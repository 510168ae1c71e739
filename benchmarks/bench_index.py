"""Index scale: metadata bytes per block and chain-lookup time at 10k, 1M (and 10M with
KVBM_BENCH_FULL=1) blocks. Target: 10M blocks in <= 1 GiB; lookup at 10M <= 1.2x that at 10k.

Run: pytest benchmarks/bench_index.py --benchmark-only
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvbm import _native

HOST = 1
SIZES = [10_000, 1_000_000] + ([10_000_000] if os.environ.get("KVBM_BENCH_FULL") == "1" else [])
CHAIN = 8192


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}blocks")
def filled(request):
    n = request.param
    rng = np.random.default_rng(0)
    ix = _native.BlockIndex(n)
    ix.configure_tier(HOST, n, 1, "lru")
    keys = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    for i in range(0, n, 1 << 16):
        ix.prepare_store(HOST, keys[i : i + (1 << 16)])
        ix.complete_store(HOST, keys[i : i + (1 << 16)])
    return n, ix, keys, rng


def test_lookup_chain(benchmark, filled) -> None:
    n, ix, keys, rng = filled
    chains = [keys[rng.integers(0, n, CHAIN)] for _ in range(16)]
    out = np.zeros(CHAIN, np.uint8)
    it = iter(range(1 << 30))

    def run() -> int:
        return ix.lookup_into(chains[next(it) % len(chains)], out)

    hits = benchmark.pedantic(run, rounds=30, iterations=4, warmup_rounds=2)
    assert hits == CHAIN
    benchmark.extra_info["blocks"] = n
    benchmark.extra_info["bytes_per_block"] = ix.memory_bytes / n
    benchmark.extra_info["ns_per_block_median"] = benchmark.stats.stats.median / CHAIN * 1e9
