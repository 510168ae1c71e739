"""Index scale: metadata bytes per block and chain-lookup time as the index grows."""

from __future__ import annotations

import numpy as np

from kvbm import _native
from kvbm.bench import Context, Row, median_time

HOST = 1


def measure(n_blocks: int, chain: int = 8192, seed: int = 0) -> dict[str, float]:
    """Fill an index with n_blocks random 16-byte keys (host tier of n_blocks slots), then time
    lookups of random full-hit chains of `chain` blocks. Returns ns per looked-up block and
    index bytes per block."""
    rng = np.random.default_rng(seed)
    ix = _native.BlockIndex(n_blocks)
    ix.configure_tier(HOST, n_blocks, 1, "lru")
    keys = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
    batch = 1 << 16
    for i in range(0, n_blocks, batch):
        part = keys[i : i + batch]
        ix.prepare_store(HOST, part)
        ix.complete_store(HOST, part)
    mem = ix.memory_bytes
    out = np.zeros(chain, np.uint8)
    chains = [keys[rng.integers(0, n_blocks, min(chain, n_blocks))] for _ in range(8)]
    state = {"i": 0}

    def one() -> None:
        c = chains[state["i"] % len(chains)]
        state["i"] += 1
        hit = ix.lookup_into(c, out)
        assert hit == len(c)

    t = median_time(one, repeat=9, number=4)
    return {"ns_per_block": t / len(chains[0]) * 1e9, "bytes_per_block": mem / n_blocks, "blocks": n_blocks}


def run(ctx: Context) -> list[Row]:
    sizes = [10_000, 1_000_000] if ctx.quick else [10_000, 1_000_000, 10_000_000]
    rows: list[Row] = []
    base = None
    for n in ctx.progress(sizes, "index scale"):
        m = measure(n)
        if base is None:
            base = m["ns_per_block"]
        rows.append(Row("index", f"lookup, {n:,} blocks", m["ns_per_block"], "ns/block",
                        base, "10k blocks", m["ns_per_block"] / base))
        rows.append(Row("index", f"metadata, {n:,} blocks", m["bytes_per_block"], "bytes/block"))
    return rows
