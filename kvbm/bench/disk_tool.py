"""Disk tier benchmark: the tier's store/load against raw O_DIRECT IO of the same bytes on the
same file system, in one run; plus the catalog's reopen time with 1M entries.

    python benchmarks/bench_disk.py --dir /path/on/the/disk --json out.json [--md out.md]

Needs only numpy, lmdb and the kvbm extension. For each block size (1 MiB and 4 MiB by default):

* raw: ``kvbm._native.raw_direct_io`` writes ``--total`` bytes sequentially with O_DIRECT in
  block-sized requests at queue depth 1 from one thread, fdatasyncs at the end (and, for the
  ``batch`` rows, after every batch of blocks, like the tier), then reads them back the same way
  (the ``dd oflag=direct`` / ``iflag=direct`` baseline);
* tier: ``DiskTier.put_async`` of the same number of blocks of fresh random data in batches of
  ``--batch`` with ``--depth`` batches in flight (checksums on, durability "batch" by default:
  fdatasync and an LMDB sync before each catalog commit), then ``DiskTier.get_async`` of all of
  them the same way (CRC32C verified on every read); blocks are checked byte-exact afterwards
  (the last batches and a spot check across the run, outside the timed region).

Repetitions alternate raw and tier runs; medians are reported, with ratios tier/raw.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from kvbm import _native
from kvbm.bench.provenance import cpu_model, git_commit
from kvbm.tiers.disk import DiskCatalog, DiskTier, hash_key, slab_path

MiB = 1 << 20


def aligned(n: int, align: int = 4096) -> np.ndarray:
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + n]


def fs_of(path: str) -> str:
    best, fs = "", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fs = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    return fs


def machine() -> dict:
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0]}  # fmt: skip


def tier_run(d: Path, block: int, nblocks: int, batch: int, threads: int, pool: list[np.ndarray],
             outs: list[np.ndarray], rep: int, depth: int, durability: str) -> tuple[float, float, int]:  # fmt: skip
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    with DiskTier(d, slot_bytes=block, capacity_bytes=block * nblocks, durability=durability,
                  io_threads=threads, slab_bytes=1 << 30) as t:  # fmt: skip
        if not t.o_direct_active:
            print("warning: tier runs without O_DIRECT here", file=sys.stderr)
        keys = [hash_key((rep << 40) | (block << 20) | i) for i in range(nblocks)]
        starts = list(range(0, nblocks, batch))
        t0 = time.perf_counter()
        inflight: deque = deque()
        for i in starts:  # `depth` batches in flight: the next is queued while one finishes
            ks = keys[i : i + batch]
            inflight.append(t.put_async(ks, [pool[(i + j) % len(pool)] for j in range(len(ks))]))
            if len(inflight) >= depth and not all(inflight.popleft().wait()):
                raise RuntimeError(f"tier store failed: {t.stats()}")
        while inflight:
            if not all(inflight.popleft().wait()):
                raise RuntimeError(f"tier store failed: {t.stats()}")
        tw = time.perf_counter() - t0
        bad = 0
        t0 = time.perf_counter()
        for n, i in enumerate(starts):
            ks = keys[i : i + batch]
            obuf = outs[(n % depth) * batch : (n % depth) * batch + len(ks)]
            inflight.append(t.get_async(ks, obuf))
            if len(inflight) >= depth and not all(inflight.popleft().wait()):
                raise RuntimeError(f"tier load missed: {t.stats()}")
        while inflight:
            if not all(inflight.popleft().wait()):
                raise RuntimeError(f"tier load missed: {t.stats()}")
        tr = time.perf_counter() - t0
        # correctness, outside the timed region: the last batches still sit in `outs`
        last = starts[-min(depth, len(starts)) :]
        for n0, i in enumerate(starts):
            if i not in last:
                continue
            base = (n0 % depth) * batch
            for j in range(min(batch, nblocks - i)):
                bad += int(not np.array_equal(outs[base + j], pool[(i + j) % len(pool)]))
        o = np.empty(block, np.uint8)
        for i in range(0, nblocks, max(1, nblocks // 16)):  # spot check across the run
            assert t.get([keys[i]], [o]) == [True]
            bad += int(not np.array_equal(o, pool[i % len(pool)]))
    shutil.rmtree(d)
    return tw, tr, bad


def catalog_reopen(d: Path, entries: int) -> dict:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    slot = 4096
    cat = DiskCatalog(str(d), slot_bytes=slot, num_slots=entries, durability="none")
    t0 = time.perf_counter()
    batch = 10_000
    for i in range(0, entries, batch):
        ks = [hash_key((1 << 100) | j) for j in range(i, min(entries, i + batch))]
        slots = cat.reserve(ks)
        cat.commit(ks, slots, [slot] * len(ks), [j & 0xFFFFFFFF for j in range(len(ks))], [True] * len(ks), 0)
    insert_s = time.perf_counter() - t0
    geo = cat.geometry
    cat.close()
    # Slab files sized to hold every slot (sparse), so the reopen keeps every record.
    nslabs = (entries + geo.slots_per_slab - 1) // geo.slots_per_slab
    for s in range(nslabs):
        with open(slab_path(str(d), s), "ab") as f:
            f.truncate(geo.slots_per_slab * geo.slot_stride)
    t0 = time.perf_counter()
    t = DiskTier(d, slot_bytes=slot, capacity_bytes=slot * entries, durability="none")
    open_s = time.perf_counter() - t0
    n = len(t)
    rebuild = t.stats()["rebuild_seconds"]
    t.close()
    cat_bytes = sum(f.stat().st_size for f in (d / "catalog").iterdir())
    shutil.rmtree(d)
    if n != entries:
        raise RuntimeError(f"reopen found {n} of {entries} entries")
    return {"entries": entries, "insert_s": insert_s, "insert_batch": batch, "reopen_s": open_s,
            "rebuild_s": rebuild, "catalog_bytes": cat_bytes}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="a directory on the file system to measure")
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--md", help="also write a Markdown table here")
    ap.add_argument("--total-mib", type=int, default=1024, help="bytes moved per run (MiB)")
    ap.add_argument("--blocks-mib", default="1,4", help="block sizes in MiB, comma separated")
    ap.add_argument("--batch", type=int, default=16, help="blocks per put/get call")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2, help="put/get batches in flight")
    ap.add_argument("--durability", default="none,batch",
                    help="comma separated tier durabilities to measure (none, batch, always)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--catalog-entries", type=int, default=1_000_000)
    args = ap.parse_args(argv)

    root = Path(args.dir) / f"kvbm-bench-disk-{os.getpid()}"
    root.mkdir(parents=True)
    total = args.total_mib * MiB
    rng = np.random.default_rng(int(time.time()))
    results = []
    try:
        for bmib in [int(x) for x in args.blocks_mib.split(",")]:
            block = bmib * MiB
            nblocks = total // block
            pool = []
            for _ in range(min(nblocks, 32)):  # fresh random data, never zeros
                a = aligned(block)
                a[:] = rng.integers(0, 256, block, dtype=np.uint8)
                pool.append(a)
            outs = [aligned(block) for _ in range(args.batch * args.depth)]
            for durability in args.durability.split(","):
                raw_w, raw_r, tier_w, tier_r = [], [], [], []
                bad = 0
                raw_direct = True
                for rep in range(args.reps):
                    # the raw writes flush as often as the tier does: once at the end, or every batch
                    sync_every = 0 if durability == "none" else 1 if durability == "always" else args.batch
                    r = _native.raw_direct_io(str(root / "raw.bin"), nblocks * block, block, True, sync_every)
                    raw_direct = raw_direct and r["o_direct"]
                    raw_w.append(r["write_s"])
                    raw_r.append(r["read_s"])
                    tw, tr, b = tier_run(
                        root / "tier", block, nblocks, args.batch, args.io_threads, pool, outs, rep, args.depth,
                        durability,
                    )
                    tier_w.append(tw)
                    tier_r.append(tr)
                    bad += b
                nbytes = nblocks * block

                def gbps(seconds: float, nbytes: int = nbytes) -> float:
                    return nbytes / seconds / 1e9

                row = {
                    "block_bytes": block,
                    "durability": durability,
                    "raw_sync_every_blocks": sync_every,
                    "blocks": nblocks,
                    "bytes": nbytes,
                    "raw_o_direct": raw_direct,
                    "raw_write_GBps": gbps(statistics.median(raw_w)),
                    "raw_read_GBps": gbps(statistics.median(raw_r)),
                    "tier_store_GBps": gbps(statistics.median(tier_w)),
                    "tier_load_GBps": gbps(statistics.median(tier_r)),
                    "raw_write_s": raw_w, "raw_read_s": raw_r, "tier_store_s": tier_w, "tier_load_s": tier_r,
                    "mismatched_blocks": bad,
                }  # fmt: skip
                # Ratio of each rep's pair (raw and tier run back to back), then the median: robust to
                # the drift of a shared machine.
                row["store_vs_raw"] = statistics.median(r / t for r, t in zip(raw_w, tier_w, strict=True))
                row["load_vs_raw"] = statistics.median(r / t for r, t in zip(raw_r, tier_r, strict=True))
                row["store_vs_raw_per_rep"] = [r / t for r, t in zip(raw_w, tier_w, strict=True)]
                row["load_vs_raw_per_rep"] = [r / t for r, t in zip(raw_r, tier_r, strict=True)]
                results.append(row)
                print(
                    f"{bmib} MiB blocks, durability {durability}: raw write {row['raw_write_GBps']:.2f} GB/s, "
                    "tier store "
                    f"{row['tier_store_GBps']:.2f} GB/s ({row['store_vs_raw']:.0%}); raw read "
                    f"{row['raw_read_GBps']:.2f} GB/s, tier load {row['tier_load_GBps']:.2f} GB/s "
                    f"({row['load_vs_raw']:.0%}); mismatches {bad}",
                    flush=True,
                )
        cat = catalog_reopen(root / "catalog-bench", args.catalog_entries) if args.catalog_entries else None
        if cat:
            print(f"catalog: {cat['entries']} entries, reopen {cat['reopen_s']:.2f} s "
                  f"(rebuild {cat['rebuild_s']:.2f} s), insert {cat['insert_s']:.1f} s", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)

    out = {
        "benchmark": "disk tier vs raw O_DIRECT",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "file_system": fs_of(args.dir),
        "crc32c": _native.crc32c_impl() if hasattr(_native, "crc32c_impl") else "?",
        "settings": {
            "batch": args.batch,
            "io_threads": args.io_threads,
            "depth": args.depth,
            "reps": args.reps,
            "checksums": True,
        },
        "results": results,
        "catalog": cat,
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(to_markdown(out))
    return 0 if all(r["mismatched_blocks"] == 0 for r in results) else 1


def to_markdown(out: dict) -> str:
    m = out["machine"]
    lines = [
        "# Disk tier vs raw O_DIRECT",
        "",
        f"- command: `{out['command']}`",
        f"- git commit: `{out['git_commit']}`, date: {out['date']}",
        f"- machine: {m['host']}, {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}",
        f"- file system: {out['file_system']}",
        f"- CRC32C: {out['crc32c']}; settings: {out['settings']}",
        "",
        "Raw = one thread, queue depth 1, sequential O_DIRECT requests of one block, with the same flushes as "
        "the tier row: one fdatasync at the end of the writes (`none`), or also one every batch (`batch`). "
        "Tier = `DiskTier.put`/`get` in batches, checksums computed on store and verified on "
        "load, `depth` batches in flight; durability `none`: no flush (data on the device when a write returns; "
        "the one final fdatasync of the raw writes is in their time), `batch`: fdatasync of the slabs and an LMDB "
        "sync per batch before its catalog commit. GB/s: medians of the reps; ratios: median over reps of the "
        "ratio within each rep (raw and tier run back to back).",
        "",
        "| block | durability | bytes moved | raw write GB/s | tier store GB/s | store/raw | raw read GB/s "
        "| tier load GB/s | load/raw | mismatches |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        lines.append(
            f"| {r['block_bytes'] // MiB} MiB | {r['durability']} | {r['bytes'] / MiB:.0f} MiB | "
            f"{r['raw_write_GBps']:.2f} | "
            f"{r['tier_store_GBps']:.2f} | {r['store_vs_raw']:.0%} | {r['raw_read_GBps']:.2f} | "
            f"{r['tier_load_GBps']:.2f} | {r['load_vs_raw']:.0%} | {r['mismatched_blocks']} |"
        )
    c = out.get("catalog")
    if c:
        lines += [
            "",
            f"Catalog with {c['entries']:,} entries: reopen (LMDB scan + free-slot map + policy rebuild) "
            f"{c['reopen_s']:.2f} s (rebuild {c['rebuild_s']:.2f} s); inserting them in txns of "
            f"{c['insert_batch']:,} took {c['insert_s']:.1f} s; catalog size {c['catalog_bytes'] / MiB:.0f} MiB.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
