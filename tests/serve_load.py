"""A load client for a remote tier (kvbm serve or Redis; run as a process): mixed ops, every byte checked.

Blocks come from a pool shared by all clients; a block's bytes are a function of its hash, so any
client can check any block it reads. With a server large enough to never evict, a block whose
put succeeded must be readable afterwards by everyone ("lost" counts the ones that were not).
Prints one JSON line: counts and per-op latencies (microseconds).

    python tests/serve_load.py --url kvbm://127.0.0.1:PORT --client 3 --ops 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np


def block_hash(i: int) -> bytes:
    return hashlib.sha256(b"serve-load-%d" % i).digest()[:16]


def block_data(h: bytes, size: int) -> np.ndarray:
    return np.random.default_rng(int.from_bytes(h[:8], "little")).integers(0, 256, size, np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--client", type=int, default=0)
    p.add_argument("--ops", type=int, default=1000)
    p.add_argument("--pool", type=int, default=2000)
    p.add_argument("--block-bytes", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--namespace", default="load", help="tenant name (the block size is appended)")
    p.add_argument("--seconds", type=float, default=120.0, help="stop early after this long")
    p.add_argument("--data-path", default="auto", help="kvbm serve data path: auto, tcp or ucx")
    p.add_argument("--start-at", type=float, default=0.0, help="wait until this time.time() before the first op")
    a = p.parse_args(argv)
    from kvbm.tiers import open_remote_tier

    token = os.environ.get("KVBM_SERVE_TOKEN")
    rng = np.random.default_rng(1000 + a.client)
    hashes = [block_hash(i) for i in range(a.pool)]
    data = {i: block_data(h, a.block_bytes) for i, h in enumerate(hashes)}
    extra = {"connections": 1, "data_path": a.data_path} if a.url.startswith("kvbm:") else {}
    t = open_remote_tier(a.url, block_bytes=a.block_bytes, namespace=f"{a.namespace}-{a.block_bytes}", token=token,
                         timeout_s=10, **extra)
    put_kw = {"chain": False} if a.url.startswith("kvbm:") else {}
    stored: set[int] = set()
    res = {"client": a.client, "ops": 0, "errors": 0, "wrong": 0, "lost": 0, "put_blocks": 0, "get_blocks": 0,
           "lat_us": {"put": [], "get": [], "lookup": []}}
    if a.start_at:
        time.sleep(max(0.0, min(60.0, a.start_at - time.time())))
    deadline = time.monotonic() + a.seconds
    res["t_start"] = time.time()
    for _ in range(a.ops):
        if time.monotonic() > deadline:
            break
        k = int(rng.integers(1, a.max_batch + 1))
        idx = [int(x) for x in rng.choice(a.pool, k, replace=False)]
        hs = [hashes[i] for i in idx]
        r = rng.random()
        t0 = time.perf_counter()
        if r < 0.4:
            ok = t.put(hs, np.stack([data[i] for i in idx]), **put_kw)
            dt = time.perf_counter() - t0
            res["lat_us"]["put"].append(dt * 1e6)
            res["put_blocks"] += k
            res["errors"] += int((~ok).sum())
            stored.update(i for i, o in zip(idx, ok) if o)
        elif r < 0.8:
            out = np.zeros((k, a.block_bytes), np.uint8)
            ok = t.get(hs, out)
            dt = time.perf_counter() - t0
            res["lat_us"]["get"].append(dt * 1e6)
            res["get_blocks"] += k
            for j, i in enumerate(idx):
                if ok[j] and not np.array_equal(out[j], data[i]):
                    res["wrong"] += 1
                if not ok[j] and i in stored:
                    res["lost"] += 1
        else:
            t.lookup_prefix(hs)
            res["lat_us"]["lookup"].append((time.perf_counter() - t0) * 1e6)
        res["ops"] += 1
    res["t_end"] = time.time()
    res["using_ucx"] = bool(getattr(t, "using_ucx", False))
    s = t.stats()
    res["errors"] += s["errors"] + s["checksum_failures"]
    res["stored"] = sorted(stored)
    t.close()
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
