"""Chain-lookup ns/block at several index sizes, old build vs new build, in one run.

Each (build, size) point runs in its own subprocess (both builds are the module ``kvbm._native``,
so they cannot share a process); points alternate old/new so the shared box's load hits both
alike. The old build is a directory holding a ``kvbm`` package with the old ``_native*.so``
(``--old``); the new one is this checkout. Each point fills an index of N random 16-byte keys
(host tier of N slots, the given policy) and times lookups of random full-hit chains of 8192
blocks (kvbm.bench.index.measure).

Run:  python benchmarks/index_scale_ab.py --old /tmp/kvbm_old [--sizes 10000,1000000,10000000]
          [--policy lru] [--rounds 2] [--write-results benchmarks/results/index_scale.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys
from kvbm.bench.index import measure
n, policy = int(sys.argv[1]), sys.argv[2]
print(json.dumps(measure(n, policy=policy)))
"""


def point(pythonpath: str, n: int, policy: str) -> dict:
    """One measurement in a fresh interpreter importing kvbm from ``pythonpath``."""
    env = dict(os.environ, PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n), policy], env=env, check=True,
                         capture_output=True, text=True, timeout=1200)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="directory holding the old build's kvbm package")
    ap.add_argument("--sizes", default="10000,1000000,10000000")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--rounds", type=int, default=2, help="old/new pairs per size (median reported)")
    ap.add_argument("--write-results", default=None, metavar="FILE.md")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    builds = {"old": args.old, "new": str(ROOT)}
    res: dict[str, dict[int, list[dict]]] = {b: {n: [] for n in sizes} for b in builds}
    for n in sizes:
        for _ in range(args.rounds):
            for b, path in builds.items():
                m = point(path, n, args.policy)
                res[b][n].append(m)
                print(f"{b:3} {n:>11,} blocks: {m['ns_per_block']:7.1f} ns/block, "
                      f"{m['bytes_per_block']:6.1f} B/block", file=sys.stderr, flush=True)
    def med(b: str, n: int, key: str) -> float:
        return statistics.median(m[key] for m in res[b][n])

    from kvbm.bench.provenance import cpu_model, git_commit

    load = os.getloadavg()[0]
    lines = [
        f"# Index scale: chain lookup, old vs new build (policy `{args.policy}`)",
        "",
        f"- Command: `python benchmarks/index_scale_ab.py --old OLD --sizes {args.sizes} --policy {args.policy} "
        f"--rounds {args.rounds}`",
        f"- New commit: `{git_commit()}`; old: `{os.environ.get('KVBM_OLD_COMMIT', 'see --old')}`",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores visible; load average (1 min) at the end {load:.2f}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        "- Each point: fresh process, N random keys stored (as chains of 65,536), median of 9x4 lookups of "
        "8192-block full-hit chains; median over rounds; old and new alternate per round.",
        "- *random*: a chain of blocks drawn at random from the whole index (worst case); *stored chain*: a "
        "stretch of a chain as it was stored (a repeated prefix); *floor*: one random 8-byte read per block "
        "from an array as large as the index (numpy gather, the CPU's own memory-level parallelism), same process.",
        "",
        "| blocks | random: old | new | new/old | old vs 10k | new vs 10k | stored chain: old | new | new vs 10k "
        "| floor ns/line | B/block old / new |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n0 = sizes[0]
    for n in sizes:
        o, w = med("old", n, "ns_per_block"), med("new", n, "ns_per_block")
        oc, wc = med("old", n, "ns_per_block_stored_chain"), med("new", n, "ns_per_block_stored_chain")
        lines.append(
            f"| {n:,} | {o:.1f} | {w:.1f} | {w / o:.2f}x | {o / med('old', n0, 'ns_per_block'):.2f}x | "
            f"{w / med('new', n0, 'ns_per_block'):.2f}x | {oc:.1f} | {wc:.1f} | "
            f"{wc / med('new', n0, 'ns_per_block_stored_chain'):.2f}x | {med('new', n, 'gather_ns_per_line'):.1f} | "
            f"{res['old'][n][0]['bytes_per_block']:.1f} / {res['new'][n][0]['bytes_per_block']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        Path(args.write_results).write_text(text)
        Path(args.write_results).with_suffix(".json").write_text(json.dumps(
            {"policy": args.policy, "sizes": sizes, "load_average_1min": load,
             "raw": {b: {str(n): v for n, v in d.items()} for b, d in res.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
