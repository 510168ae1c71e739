"""Scale of kvbm router's block index: events/s applied on one core, and memory at >= 1M blocks.

Run: ``python benchmarks/bench_router_index.py [--blocks 1000000] [--out benchmarks/results/router_index.json]``

Events are what a vLLM instance publishes: one ``BlockStored`` per request chunk (here 4 blocks of
16 tokens, chained by ``parent_block_hash``), msgpack-encoded as ``KVEventBatch`` es of 64 events;
the timed loop decodes each batch and applies it (re-hashing every block's tokens into router
keys), the router's whole per-event work. Then ``BlockRemoved`` batches, and lookups of 32-block
prompts against the full index. Memory is the process's RSS growth (``resource``) while filling.
Measured side by side in one run: decoding alone vs decode + apply, so the index's share shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import time
from pathlib import Path

from kvbm.events import BlockRemoved, BlockStored, decode_batch, encode_batch
from kvbm.router.index import BlockIndex, chain_keys

BS = 16
PER_EVENT = 4
PER_BATCH = 64


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rng = random.Random(0)
    n_events = a.blocks // PER_EVENT
    # Pre-encode every batch (the publisher's work, not timed).
    batches: list[bytes] = []
    prompts: list[list[int]] = []
    removes: list[bytes] = []
    evs: list[BlockStored] = []
    rem: list[BlockRemoved] = []
    h = 0
    for e in range(n_events):
        first = e % 8 == 0  # sequences of 8 events = 32 blocks share a chain
        toks = [rng.randrange(50_000) for _ in range(PER_EVENT * BS)]
        if first:
            prompts.append([])
        prompts[-1].extend(toks)
        hashes = list(range(h, h + PER_EVENT))
        evs.append(BlockStored(block_hashes=hashes, parent_block_hash=None if first else h - 1, token_ids=toks,
                               block_size=BS, lora_id=None, medium="GPU", lora_name=None))
        if e % 16 == 0:
            rem.append(BlockRemoved(block_hashes=hashes[:1], medium="GPU"))
        h += PER_EVENT
        if len(evs) == PER_BATCH:
            batches.append(encode_batch(evs, ts=0.0))
            evs = []
        if len(rem) == PER_BATCH:
            removes.append(encode_batch(rem, ts=0.0))
            rem = []
    if evs:
        batches.append(encode_batch(evs, ts=0.0))
    slots = [i % a.instances for i in range(len(batches))]

    t = time.perf_counter()
    for b in batches:
        decode_batch(b)
    decode_s = time.perf_counter() - t

    idx = BlockIndex(max_blocks=2 * a.blocks)
    rss0 = _rss_mib()
    t = time.perf_counter()
    for slot, b in zip(slots, batches):
        idx.apply(slot, decode_batch(b).events)
    apply_s = time.perf_counter() - t
    rss1 = _rss_mib()
    blocks = len(idx)

    t = time.perf_counter()
    for i, b in enumerate(removes):
        idx.apply(slots[i * 16 % len(slots)], decode_batch(b).events)
    remove_s = time.perf_counter() - t
    n_remove_events = sum(len(decode_batch(b).events) for b in removes)

    sample = [prompts[rng.randrange(len(prompts))] for _ in range(2000)]
    t = time.perf_counter()
    hit = 0
    for p in sample:
        over = idx.overlap(chain_keys(p, BS), list(range(a.instances)))
        hit += max(len(v) for v in over.values())
    lookup_s = time.perf_counter() - t

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    res = {
        "command": f"python benchmarks/bench_router_index.py --blocks {a.blocks} --instances {a.instances}",
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or 'x86-64'}, "
        f"{os.cpu_count()} cores, dev box shared with other helpers (one Python thread)",
        "blocks_indexed": blocks, "store_events": n_events, "blocks_per_event": PER_EVENT, "block_size": BS,
        "store_events_per_s": n_events / apply_s, "store_blocks_per_s": blocks / apply_s,
        "decode_only_events_per_s": n_events / decode_s,
        "index_share_of_apply": 1 - decode_s / apply_s,
        "remove_events_per_s": n_remove_events / remove_s,
        "lookup_32_block_prompts_per_s": len(sample) / lookup_s, "lookup_mean_prefix_blocks": hit / len(sample),
        "rss_growth_mib": rss1 - rss0, "bytes_per_block": (rss1 - rss0) * (1 << 20) / max(blocks, 1),
    }
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
