"""An offline bound for eviction policies that rank blocks by re-use count and idle time.

For each block access, the interval until the block's next access (or the end of the trace) is
filed under the block's re-use count at the start of the interval (0, 1, 2-7, 8+ earlier uses).
A "time-to-live" policy keeps a block of class c for at most TTL_c inserts of new blocks after
its last use; it hits an access iff the gap is <= TTL_c, and it occupies min(gap, TTL_c) on
average over the trace. Choosing the best TTL per class under "average occupancy <= capacity"
(TTL_c = t * m_c, multipliers m_c searched on a grid, t the largest that fits) bounds,
approximately, what any policy that sees only re-use counts and idle times can do. It ignores
prefix coupling (a hit needs its ancestors) and counts occupancy on average rather than at every
instant; with a single class it lands close to LRU, the sanity check printed first.

Run:  python benchmarks/eviction_ttl_bound.py [--trace PATH]
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np

from kvbm.data import mooncake_conversation
from kvbm.replay import load_trace

DEFAULT_TRACE = mooncake_conversation()  # bundled in kvbm/data/ (KVBM_TRACE overrides)


def reuse_class(n: int) -> int:
    return 0 if n == 0 else 1 if n == 1 else 2 if n < 8 else 3


def intervals(path: Path) -> tuple[dict[int, np.ndarray], int, int]:
    tr = load_trace(path)
    last: dict[int, int] = {}
    uses: dict[int, int] = defaultdict(int)
    iv: dict[int, list[int]] = defaultdict(list)
    inserts = 0
    never = 1 << 40
    for rows in tr.requests:
        for b in rows.tolist():
            if b in last:
                iv[reuse_class(uses[b])].append(inserts - last[b])
                uses[b] += 1
            else:
                inserts += 1
            last[b] = inserts
    for b in last:
        iv[reuse_class(uses[b])].append(never)
    return {c: np.sort(np.array(v, dtype=np.int64)) for c, v in iv.items()}, inserts, tr.num_blocks


def bound(
    iv: dict[int, np.ndarray], classes: dict[int, int], inserts: int, blocks: int, cap: float
) -> tuple[float, tuple[float, ...]]:
    """Best hit ratio over TTL_c = t * m_c (m_c from a grid of multipliers, t as large as fits)."""
    grouped: dict[int, list[np.ndarray]] = defaultdict(list)
    for c, v in iv.items():
        grouped[classes[c]].append(v)
    curves = []
    for g in sorted(grouped):
        v = np.sort(np.concatenate(grouped[g]))
        curves.append((v, np.concatenate([[0], np.cumsum(v)])))

    def evaluate(mult: tuple[float, ...], t: float) -> tuple[float, float]:
        h = o = 0.0
        for (v, cs), m in zip(curves, mult):
            ttl = t * m
            i = int(np.searchsorted(v, ttl, side="right"))
            h += i
            o += (cs[i] + (len(v) - i) * ttl) / inserts
        return h, o

    steps = [0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 16]
    best, best_mult = 0.0, (1.0,)
    for rest in itertools.product(steps, repeat=len(curves) - 1):
        mult = (1.0, *rest)
        lo, hi = 0.0, 1e8
        for _ in range(60):  # occupancy grows with t: the largest t that fits
            mid = (lo + hi) / 2
            if evaluate(mult, mid)[1] <= cap:
                lo = mid
            else:
                hi = mid
        h = evaluate(mult, lo)[0]
        if h > best:
            best, best_mult = h, mult
    return best / blocks, best_mult


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    args = ap.parse_args()
    iv, inserts, blocks = intervals(Path(args.trace))
    distinct = inserts
    one = {0: 0, 1: 0, 2: 0, 3: 0}
    four = {0: 0, 1: 1, 2: 2, 3: 3}
    print("| capacity | one class (~LRU) | best TTL per re-use class (0 / 1 / 2-7 / 8+) | its TTL multipliers |")
    print("|---|---|---|---|")
    for frac in (0.05, 0.10, 0.25):
        cap = round(frac * distinct)
        single, _ = bound(iv, one, inserts, blocks, cap)
        per_class, mult = bound(iv, four, inserts, blocks, cap)
        print(f"| {frac:.0%} | {single:.4f} | {per_class:.4f} | {' : '.join(f'{m:g}' for m in mult)} |")


if __name__ == "__main__":
    main()
