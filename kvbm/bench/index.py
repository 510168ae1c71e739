"""Index scale: metadata bytes per block and chain-lookup time as the index grows."""

from __future__ import annotations

import numpy as np

from kvbm import _native
from kvbm.bench import Context, Row, median_time

HOST = 1


def measure(n_blocks: int, chain: int = 8192, seed: int = 0, policy: str = "lru") -> dict[str, float]:
    """Fill an index with n_blocks random 16-byte keys (host tier of n_blocks slots, stored as
    chains of 65,536), then time lookups of full-hit chains of ``chain`` blocks: ``ns_per_block``
    for chains of blocks drawn at random from the whole index (the worst case: every block's
    entry and policy record are somewhere else), ``ns_per_block_stored_chain`` for a stretch of
    a chain as it was stored (what a repeated prefix looks like). ``gather_ns_per_line`` is the
    floor measured beside them: one random 8-byte read per block from an array as large as the
    index, with the CPU's own memory-level parallelism (numpy fancy indexing).
    ``bytes_per_block``: index metadata per block (``policy``: the host tier's eviction policy)."""
    rng = np.random.default_rng(seed)
    ix = _native.BlockIndex(n_blocks)
    ix.configure_tier(HOST, n_blocks, 1, policy)
    keys = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
    batch = 1 << 16
    for i in range(0, n_blocks, batch):
        part = keys[i : i + batch]
        ix.prepare_store(HOST, part)
        ix.complete_store(HOST, part)
    mem = ix.memory_bytes
    out = np.zeros(chain, np.uint8)
    k = min(chain, n_blocks)
    chains = [keys[rng.integers(0, n_blocks, k)] for _ in range(8)]
    starts = [int(s) for s in rng.integers(0, n_blocks - k + 1, 8)]
    stored = [np.ascontiguousarray(keys[s : s + k]) for s in starts]

    def timed(cs: list[np.ndarray]) -> float:
        state = {"i": 0}

        def one() -> None:
            c = cs[state["i"] % len(cs)]
            state["i"] += 1
            hit = ix.lookup_into(c, out)
            assert hit == len(c)

        return median_time(one, repeat=9, number=4) / k * 1e9

    ns = timed(chains)
    ns_chain = timed(stored)
    big = np.ones(max(1, mem // 8), np.int64)
    idx = [rng.integers(0, len(big), k) for _ in range(8)]
    state = {"i": 0}

    def gather() -> None:
        big[idx[state["i"] % len(idx)]].sum()
        state["i"] += 1

    floor = median_time(gather, repeat=9, number=4) / k * 1e9
    return {"ns_per_block": ns, "ns_per_block_stored_chain": ns_chain, "gather_ns_per_line": floor,
            "bytes_per_block": mem / n_blocks, "blocks": n_blocks}


def run(ctx: Context) -> list[Row]:
    sizes = [10_000, 1_000_000] if ctx.quick else [10_000, 1_000_000, 10_000_000]
    rows: list[Row] = []
    base = None
    base_chain = 0.0
    for n in ctx.progress(sizes, "index scale"):
        m = measure(n)
        if base is None:
            base = m["ns_per_block"]
        rows.append(Row("index", f"lookup, {n:,} blocks", m["ns_per_block"], "ns/block",
                        base, "10k blocks", m["ns_per_block"] / base, params={"blocks": n, "kind": "random chain"}))
        rows.append(Row("index", f"lookup of a stored chain, {n:,} blocks", m["ns_per_block_stored_chain"],
                        "ns/block", base_chain := base_chain or m["ns_per_block_stored_chain"], "10k blocks",
                        m["ns_per_block_stored_chain"] / base_chain, params={"blocks": n, "kind": "stored chain"}))
        rows.append(Row("index", f"random 8-byte read (floor), {n:,}-block-sized array", m["gather_ns_per_line"],
                        "ns/line", params={"blocks": n, "kind": "random read floor"}))
        rows.append(Row("index", f"metadata, {n:,} blocks", m["bytes_per_block"], "bytes/block", params={"blocks": n}))
    return rows
