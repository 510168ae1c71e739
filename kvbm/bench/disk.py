"""Disk tier store/load of 1 MiB and 4 MiB blocks (checksums on) vs a raw O_DIRECT sequential
write/read of the same bytes on the same file system, measured back to back (quick sizes; the
full run is benchmarks/bench_disk.py). The directory is $KVBM_BENCH_DIR or a temp dir in /var/tmp."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from kvbm.bench import Context, Row


def run(ctx: Context) -> list[Row]:
    from kvbm.bench import disk_tool

    base = os.environ.get("KVBM_BENCH_DIR") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kvbm-bench-", dir=base) as d:
        out = Path(d) / "disk.json"
        total = "256" if ctx.quick else "1024"
        reps = "2" if ctx.quick else "5"
        for _ in ctx.progress([0], "disk tier"):
            with contextlib.redirect_stdout(sys.stderr):  # keep `kvbm bench --json` clean
                disk_tool.main(["--dir", str(Path(d) / "fs"), "--json", str(out), "--total-mib", total,
                                "--reps", reps, "--durability", "none", "--catalog-entries", "0"])
        res = json.loads(out.read_text())
    for r in res["results"]:
        mib = r["block_bytes"] >> 20
        rows.append(Row("disk", f"store {mib} MiB blocks (crc on)", r["tier_store_GBps"], "GB/s",
                        r["raw_write_GBps"], "raw O_DIRECT write", r["store_vs_raw"],
                        params={"op": "store", "block_kib": mib << 10}))
        rows.append(Row("disk", f"load {mib} MiB blocks (crc verified)", r["tier_load_GBps"], "GB/s",
                        r["raw_read_GBps"], "raw O_DIRECT read", r["load_vs_raw"],
                        note=f"{r['mismatched_blocks']} mismatched blocks",
                        params={"op": "load", "block_kib": mib << 10}))
    return rows
