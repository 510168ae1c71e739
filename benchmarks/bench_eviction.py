"""Eviction policies on the Mooncake conversation trace: prefix-hit ratio and replay time.

Every policy in ``kvbm.eviction_policies()`` replays the trace through the real block index
(:func:`kvbm.replay.replay`) with the tier sized at 5%, 10% and 25% of the trace's distinct
blocks; the infinite cache (100%) is measured the same way as the ceiling. Replay time is the
median CPU time (``time.process_time``) of ``--repeat`` runs interleaved across policies (the hit
figures must not change between runs), including the trace's key gathering; it is reported as
ns per prompt block and as a ratio to LRU at the same capacity (the machine is shared and
noisy: read ratios, not seconds). The trace's README gives the reference figures (LRU, Belady).

It also runs the offline bounds of ``eviction_ttl_bound.py`` and ``eviction_feature_bound.py``
(skip with ``--no-bound``).

Run:  python benchmarks/bench_eviction.py [--trace PATH] [--repeat 5] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import kvbm
from kvbm.bench.provenance import git_commit
from kvbm.data import mooncake_conversation
from kvbm.replay import load_trace, replay

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = mooncake_conversation()  # bundled in kvbm/data/ (KVBM_TRACE overrides)
CAPACITIES = [0.05, 0.10, 0.25]
# From the trace's reference figures (kvbm/data/README.md history; not measured here).
README_REFERENCE = {
    0.05: {"lru": 0.195, "belady": 0.366},
    0.10: {"lru": 0.278, "belady": 0.366},
    0.25: {"lru": 0.353, "belady": 0.366},
}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus_visible": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "kvbm": kvbm.__version__,
        "load_average_1min": os.getloadavg()[0],
    }


def run(trace_path: Path, repeat: int, with_bound: bool) -> dict:
    t0 = time.perf_counter()
    trace = load_trace(trace_path)
    parse_s = time.perf_counter() - t0
    policies = kvbm.eviction_policies()
    rows = []
    for cap in [*CAPACITIES, 1.0]:
        pols = policies if cap < 1.0 else policies[:1]
        results: dict[str, list] = {p: [] for p in pols}
        cpu: dict[str, list[float]] = {p: [] for p in pols}
        for _ in range(repeat):  # interleaved, so load changes hit every policy alike
            for pol in pols:
                c0 = time.process_time()
                results[pol].append(replay(trace, cap, pol))
                cpu[pol].append(time.process_time() - c0)
        for pol in pols:
            hits = {r.hit_blocks for r in results[pol]}
            assert len(hits) == 1, f"{pol} at {cap}: hit counts differ between runs: {hits}"
            secs = cpu[pol]
            r = results[pol][0]
            rows.append(
                {
                    "policy": pol if cap < 1.0 else "infinite cache",
                    "capacity_fraction": cap,
                    "capacity_blocks": r.capacity_blocks,
                    "prefix_hit_ratio": r.prefix_hit_ratio,
                    "hit_blocks": r.hit_blocks,
                    "evictions": r.evictions,
                    "replay_seconds_median": statistics.median(secs),
                    "replay_seconds_min": min(secs),
                    "replay_seconds_max": max(secs),
                    "ns_per_block": statistics.median(secs) / r.blocks * 1e9,
                    "wall_seconds_median": statistics.median(x.seconds for x in results[pol]),
                }
            )
    for row in rows:
        cap = row["capacity_fraction"]
        lru = next((x for x in rows if x["policy"] == "lru" and x["capacity_fraction"] == cap), None)
        row["ratio_vs_lru"] = row["prefix_hit_ratio"] / lru["prefix_hit_ratio"] if lru else None
        row["time_vs_lru"] = row["replay_seconds_median"] / lru["replay_seconds_median"] if lru else None
    bound_rows = []
    if with_bound:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import eviction_ttl_bound as tb

        iv, inserts, blocks = tb.intervals(trace_path)
        for cap in CAPACITIES:
            c = round(cap * inserts)
            single, _ = tb.bound(iv, {0: 0, 1: 0, 2: 0, 3: 0}, inserts, blocks, c)
            per_class, mult = tb.bound(iv, {0: 0, 1: 1, 2: 2, 3: 3}, inserts, blocks, c)
            bound_rows.append(
                {"capacity_fraction": cap, "one_class": single, "per_reuse_class": per_class, "multipliers": mult}
            )
    feature_rows = []
    if with_bound:
        import eviction_feature_bound as fb

        reqs = [r.tolist() for r in trace.requests]
        for fs in fb.SETS:
            gaps, stored = fb.intervals(reqs, fs)
            feature_rows.append(
                {
                    "features": fs,
                    "classes": len(gaps),
                    "bounds": {
                        str(cap): fb.bound(gaps, stored, cap * trace.distinct_blocks, trace.num_blocks)
                        for cap in CAPACITIES
                    },
                }
            )
    return {
        "ttl_bound": bound_rows,
        "feature_bound": feature_rows,
        "trace": str(trace_path),
        "requests": len(trace.requests),
        "blocks": trace.num_blocks,
        "distinct_blocks": trace.distinct_blocks,
        "parse_seconds": parse_s,
        "repeat": repeat,
        "rows": rows,
        "readme_reference": {str(k): v for k, v in README_REFERENCE.items()},
    }


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [
        "# Eviction policies on the Mooncake conversation trace",
        "",
        f"- Date: {res['date']}",
        f"- Git commit: `{res['git_commit']}`",
        f"- Machine: {m['cpu']}, {m['cpus_visible']} CPUs visible (2-core x86-64 dev box, shared), "
        f"1-min load average {m['load_average_1min']:.1f} at the start; Python {m['python']}, numpy {m['numpy']}",
        f"- Command: `{res['command']}`",
        f"- Trace: `{Path(res['trace']).name}`: {res['requests']} requests, {res['blocks']} prompt blocks, "
        f"{res['distinct_blocks']} distinct blocks (512 tokens each)",
        "- Semantics: `kvbm.replay` (module doc): per request, the hit is the leading run of cached blocks "
        "(one `lookup`), then the request's missing blocks are stored as a chain (`prepare_store` + "
        "`complete_store`) into one tier sized as a fraction of the distinct blocks, through the real "
        "`BlockIndex` and policy code.",
        f"- Replay time: CPU time (`time.process_time`), median of {res['repeat']} runs interleaved across "
        "policies, replay only, including the per-request key gathering in Python (parsing the trace once took "
        f"{res['parse_seconds']:.2f} s); hit figures are identical across runs.",
        "",
        "## Prefix-hit ratio",
        "",
        "| capacity | policy | prefix-hit ratio | vs LRU (same run) | README: LRU | README: Belady | evictions |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        cap = row["capacity_fraction"]
        ref = README_REFERENCE.get(cap, {})
        vs = f"{row['ratio_vs_lru']:.3f}x" if row["ratio_vs_lru"] else "-"
        out.append(
            f"| {cap:.0%} ({row['capacity_blocks']} blocks) | {row['policy']} | {row['prefix_hit_ratio']:.4f} | {vs} | "
            f"{ref.get('lru', '-')} | {ref.get('belady', '-')} | {row['evictions']} |"
        )
    out += [
        "",
        "## Replay time",
        "",
        "| capacity | policy | median CPU s | min-max s | ns / prompt block | time vs LRU (same run) |",
        "|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        vs = f"{row['time_vs_lru']:.2f}x" if row["time_vs_lru"] else "-"
        out.append(
            f"| {row['capacity_fraction']:.0%} | {row['policy']} | {row['replay_seconds_median']:.3f} | "
            f"{row['replay_seconds_min']:.3f}-{row['replay_seconds_max']:.3f} | {row['ns_per_block']:.0f} | {vs} |"
        )
    if res["ttl_bound"]:
        out += [
            "",
            "## Offline bound for re-use-count / idle-time policies (`benchmarks/eviction_ttl_bound.py`)",
            "",
            "Best time-to-live per re-use class (0 / 1 / 2-7 / 8+ earlier uses), computed from the trace's "
            "re-use gaps; one class is the LRU-like sanity check. Optimistic: it ignores prefix coupling and "
            "counts occupancy on average.",
            "",
            "| capacity | one class (~LRU) | best TTL per re-use class | its TTL multipliers |",
            "|---|---|---|---|",
        ]
        for b in res["ttl_bound"]:
            mult = " : ".join(f"{m:g}" for m in b["multipliers"])
            out.append(
                f"| {b['capacity_fraction']:.0%} | {b['one_class']:.4f} | {b['per_reuse_class']:.4f} | {mult} |"
            )
    if res.get("feature_bound"):
        out += [
            "",
            "## Offline upper bound by feature set (`benchmarks/eviction_feature_bound.py`)",
            "",
            "Best time-to-live per class of block (Lagrangian dual: an upper bound for policies that give "
            "each class one TTL, or mix two); each set adds to the one before; `oracle` is re-use count, "
            "position and whether the block will be used again. Optimistic: fitted to the trace itself, "
            "occupancy counted on average, prefix coupling ignored.",
            "",
            "| features | classes | " + " | ".join(f"{c:.0%}" for c in CAPACITIES) + " |",
            "|---|---|" + "---|" * len(CAPACITIES),
        ]
        for f in res["feature_bound"]:
            vals = " | ".join(f"{f['bounds'][str(c)]:.4f}" for c in CAPACITIES)
            out.append(f"| {f['features']} | {f['classes']} | {vals} |")
    out += ["", res.get("notes", ""), ""]
    return "\n".join(out)


NOTES = """## Notes

- Target for the default policy (`prefix_ghost`) at 10%: >= 0.33. **Not reached**: it gives the
  figure above (LRU 0.278, `prefix_freq` 0.287, clairvoyant 0.366). `prefix_ghost` is
  `prefix_freq` plus a history of evicted blocks keyed by a fingerprint of the block hash, so a
  block that comes back is counted as re-used; with it the policy lands on the offline bound
  above for policies that rank blocks by re-use count and idle time (the bound counts re-uses
  of evicted blocks too). Three quarters of the distinct blocks are never re-used, and nothing
  the requests carry tells them apart early: whether a conversation gets another turn is 0.31
  for a first turn, 0.42-0.68 for later ones, and flat in prompt length, reply length and
  position in the trace. The upper bound by feature set above (best TTL per class of re-use
  count, position in the prompt, prefix hit, prompt length, previous re-use gap and distance
  from the chain start, up to 587 classes fitted to the trace itself) stays near 0.31 at 10%;
  told which blocks will be re-used (`oracle`), the same bound reaches the infinite cache. See
  the design note in
  `csrc/eviction_prefix.cpp` (also for what was tried and left out).
- Replay time covers the whole replay loop (Python, key gathering, one lookup and one store call
  per request), so the policies' own cost shows only as the difference in the "time vs LRU"
  column. All policies are O(1) per operation (amortized for the prefix policies' child lists).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--no-bound",
        action="store_true",
        help="skip the offline bounds (eviction_ttl_bound.py, eviction_feature_bound.py)",
    )
    ap.add_argument("--write-results", action="store_true", help="write benchmarks/results/eviction.{md,json}")
    args = ap.parse_args(argv)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    mach = machine()
    res = run(Path(args.trace), args.repeat, not args.no_bound)
    res.update(
        date=date,
        git_commit=git_commit(),
        machine=mach,
        command="python benchmarks/bench_eviction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        notes=NOTES,
    )
    md = markdown(res)
    print(md)
    if args.write_results:
        out = ROOT / "benchmarks/results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "eviction.md").write_text(md)
        (out / "eviction.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
