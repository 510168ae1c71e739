"""Scale of kvbm router's block index: events/s on one core and memory at >= 1M blocks, the native
index side by side with the pure-Python index it replaced.

Run: ``python benchmarks/bench_router_index.py [--blocks 1000000] [--repeat 3] [--out FILE]``

Events are what a vLLM instance publishes: one ``BlockStored`` per request chunk (4 blocks of 16
tokens, chained by ``parent_block_hash``; 8 chunks = one 32-block prompt), msgpack-encoded as
``KVEventBatch`` es of 64 events, batches spread round-robin over the instances. Measured per
implementation, each in a fresh child process (so memory is its own): decoding alone; decode +
apply into a fresh index (RSS growth while filling = bytes per block); then ``BlockRemoved``
batches (one removal per 16 stores, each from the instance that stored it); lookups of sampled
32-block prompts over all instances (``chain_keys`` + ``overlap``); one ``clear`` of an instance;
and apply alone (batches decoded untimed, in chunks, into a second fresh index). The baseline
is ``kvbm/router/index.py`` as of ``--baseline-commit`` (the last pure-Python index), read from
git into a temporary file, fed the same events. ``--repeat`` runs alternate the two; the report
gives each figure's median and native / Python ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvbm.events import BlockRemoved, BlockStored, decode_batch, encode_batch

BS = 16
PER_EVENT = 4
PER_SEQ = 8  # events per 32-block prompt
PER_BATCH = 64
BASELINE_COMMIT = "7e9714f"  # the pure-Python index (Note [Router block keys], plain dicts)
REPO = Path(__file__).resolve().parent.parent


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _load(impl: str, commit: str) -> Any:
    if impl == "native":
        from kvbm.router import index

        return index
    src = subprocess.run(["git", "show", f"{commit}:kvbm/router/index.py"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    path = Path(tempfile.mkdtemp()) / "python_router_index.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("python_router_index", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _workload(blocks: int, instances: int, n_prompts: int) -> tuple[list[bytes], list[int], list[tuple[int, bytes]],
                                                                     list[list[int]]]:
    """Encoded store batches, the slot of each, (slot, encoded removal batch)es, sampled prompts."""
    rng = np.random.default_rng(0)
    n_events = blocks // PER_EVENT
    toks = rng.integers(0, 50_000, size=(n_events, PER_EVENT * BS), dtype=np.int64)
    n_seq = n_events // PER_SEQ
    sampled = set(rng.choice(n_seq, size=min(n_prompts, n_seq), replace=False).tolist())
    prompts: dict[int, list[int]] = {}
    batches: list[bytes] = []
    slots: list[int] = []
    removes: list[tuple[int, bytes]] = []
    pending: dict[int, list[BlockRemoved]] = {}
    evs: list[BlockStored] = []
    for e in range(n_events):
        t = toks[e].tolist()
        seq, first = e // PER_SEQ, e % PER_SEQ == 0
        if seq in sampled:
            prompts.setdefault(seq, []).extend(t)
        h = e * PER_EVENT
        hashes = list(range(h, h + PER_EVENT))
        evs.append(BlockStored(block_hashes=hashes, parent_block_hash=None if first else h - 1, token_ids=t,
                               block_size=BS, lora_id=None, medium="GPU", lora_name=None))
        slot = len(batches) % instances
        if e % 16 == 0:
            rem = pending.setdefault(slot, [])
            rem.append(BlockRemoved(block_hashes=hashes[:1], medium="GPU"))
            if len(rem) == PER_BATCH:
                removes.append((slot, encode_batch(rem, ts=0.0)))
                pending[slot] = []
        if len(evs) == PER_BATCH:
            batches.append(encode_batch(evs, ts=0.0))
            slots.append(slot)
            evs = []
    if evs:
        batches.append(encode_batch(evs, ts=0.0))
        slots.append(len(batches) % instances)
    return batches, slots, removes, [prompts[s] for s in sorted(prompts)]


def run_one(impl: str, blocks: int, instances: int, commit: str) -> dict[str, Any]:
    mod = _load(impl, commit)
    batches, slots, removes, prompts = _workload(blocks, instances, 2000)
    n_events = sum(len(decode_batch(b).events) for b in batches)
    all_slots = list(range(instances))
    res: dict[str, Any] = {"impl": impl}

    t = time.perf_counter()
    for b in batches:
        decode_batch(b)
    res["decode_only_events_per_s"] = n_events / (time.perf_counter() - t)

    idx = mod.BlockIndex(max_blocks=2 * blocks)
    rss0 = _rss_bytes()
    t = time.perf_counter()
    for slot, b in zip(slots, batches):
        idx.apply(slot, decode_batch(b).events)
    res["store_events_per_s"] = n_events / (time.perf_counter() - t)
    grown = _rss_bytes() - rss0
    res["blocks_indexed"] = len(idx)
    res["bytes_per_block"] = grown / max(len(idx), 1)
    if hasattr(idx, "memory_bytes"):
        res["table_bytes_per_block"] = idx.memory_bytes() / max(len(idx), 1)

    n_rem = sum(len(decode_batch(b).events) for _, b in removes)
    before = idx.stats.removed
    t = time.perf_counter()
    for slot, b in removes:
        idx.apply(slot, decode_batch(b).events)
    res["remove_events_per_s"] = n_rem / (time.perf_counter() - t)
    res["removals_resolved"] = (idx.stats.removed - before) / max(n_rem, 1)

    t = time.perf_counter()
    hit = 0
    for p in prompts:
        over = idx.overlap(mod.chain_keys(p, BS), all_slots)
        hit += max(len(v) for v in over.values())
    res["lookup_32_block_prompts_per_s"] = len(prompts) / (time.perf_counter() - t)
    res["lookup_mean_prefix_blocks"] = hit / len(prompts)

    t = time.perf_counter()
    idx.clear(0, (mod.GPU,))
    res["clear_one_instance_ms"] = 1e3 * (time.perf_counter() - t)
    del idx

    idx = mod.BlockIndex(max_blocks=2 * blocks)
    apply_s = 0.0
    for i in range(0, len(batches), 64):
        chunk = [decode_batch(b).events for b in batches[i:i + 64]]
        t = time.perf_counter()
        for slot, evs in zip(slots[i:i + 64], chunk):
            idx.apply(slot, evs)
        apply_s += time.perf_counter() - t
    res["apply_only_events_per_s"] = n_events / apply_s
    res["store_events"] = n_events
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    ap.add_argument("--impls", default="native,python")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.blocks, a.instances, a.baseline_commit)))
        return
    impls = a.impls.split(",")
    runs: dict[str, list[dict[str, Any]]] = {i: [] for i in impls}
    for r in range(a.repeat):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            out = subprocess.run([sys.executable, __file__, "--child", impl, "--blocks", str(a.blocks), "--instances",
                                  str(a.instances), "--baseline-commit", a.baseline_commit],
                                 capture_output=True, text=True, check=True).stdout
            runs[impl].append(json.loads(out.strip().splitlines()[-1]))
            print(f"run {r + 1}/{a.repeat} {impl}: {runs[impl][-1]}", file=sys.stderr)
    median = {i: {k: statistics.median(x[k] for x in rs) for k, v in rs[0].items() if isinstance(v, (int, float))}
              for i, rs in runs.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    res: dict[str, Any] = {
        "command": f"python benchmarks/bench_router_index.py --blocks {a.blocks} --instances {a.instances} "
                   f"--repeat {a.repeat}",
        "commit": commit, "baseline": f"kvbm/router/index.py at {a.baseline_commit} (pure Python)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or 'x86-64'}, {os.cpu_count()} cores, dev box shared with other "
                   "engineers (noisy; one Python thread per run)",
        "blocks": a.blocks, "blocks_per_event": PER_EVENT, "block_size": BS, "median": median,
    }
    if "native" in median and "python" in median:
        res["native_over_python"] = {k: median["native"][k] / median["python"][k] for k in median["python"]
                                     if k.endswith("_per_s") and median["python"][k]}
        res["native_over_python"]["bytes_per_block"] = median["native"]["bytes_per_block"] / median["python"][
            "bytes_per_block"]
    res["runs"] = runs
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
