"""An offline bound for eviction policies that see more than re-use counts: per-class TTLs.

Like ``eviction_ttl_bound.py``, every access of a block opens an interval that ends at the
block's next access (a hit if the block is still cached) or at the end of the trace. Each
interval is filed under a *class* computed from what an online policy could know at that access;
a policy that keeps a block of class c for TTL_c newly stored blocks after its last access hits
the intervals no longer than TTL_c and occupies min(gap, TTL_c) slots on average. The best TTL
per class under "average occupancy <= capacity" is bounded from above by the Lagrangian dual (for
a price per slot, each class takes the TTL that maximizes hits minus price x occupancy; the
price is bisected until the cache is full). It is optimistic: TTLs are fitted to the trace
itself, a class may mix two TTLs, occupancy is counted on average, and prefix coupling is
ignored. A richer feature set can only raise it.

Feature sets (each adds to the previous):
  count     re-use count so far, evictions notwithstanding (0 / 1 / 2-7 / 8+)
  position  + last, second-to-last or other block of its request
  hit       + whether its request hit more than the chain's first block
  length    + the request's length in blocks (<=4, <=10, <=20, <=40, more)
  gap       + log2 of the block's previous re-use gap
  start     + distance from the chain's start (<=2, <=8, more)
  oracle    re-use count, position and whether the block will be used again (a sanity check:
            knowing the future, the bound must reach the infinite cache)

Run:  python benchmarks/eviction_feature_bound.py [--trace PATH] [--sets count,hit,...]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from kvbm.data import mooncake_conversation
from kvbm.replay import load_trace

DEFAULT_TRACE = mooncake_conversation()  # bundled in kvbm/data/ (KVBM_TRACE overrides)
SETS = ["count", "position", "hit", "length", "gap", "start", "oracle"]
CAPACITIES = [0.05, 0.10, 0.25]
_NEVER = 1 << 40


def _reuse(n: int) -> int:
    return 0 if n == 0 else 1 if n == 1 else 2 if n < 8 else 3


def _length(n: int) -> int:
    return 0 if n <= 4 else 1 if n <= 10 else 2 if n <= 20 else 3 if n <= 40 else 4


def intervals(requests: list[list[int]], feature_set: str) -> tuple[dict[tuple, np.ndarray], int]:
    """Gap of every access interval (in newly stored blocks), grouped by class; and the number
    of distinct blocks stored."""
    depth = SETS.index(feature_set) if feature_set != "oracle" else -1
    remaining: dict[int, int] = defaultdict(int)
    if depth < 0:
        for r in requests:
            for b in r:
                remaining[b] += 1
    last: dict[int, int] = {}
    uses: dict[int, int] = defaultdict(int)
    prev_gap: dict[int, int] = {}
    cls: dict[int, tuple] = {}
    gaps: dict[tuple, list[int]] = defaultdict(list)
    stored = 0
    for r in requests:
        n = len(r)
        h = 0
        while h < n and r[h] in last:
            h += 1
        for i, b in enumerate(r):
            if b in last:
                g = stored - last[b]
                gaps[cls[b]].append(g)
                uses[b] += 1
                prev_gap[b] = g
            else:
                stored += 1
            last[b] = stored
            pos = 0 if i == n - 1 else 1 if i == n - 2 else 2
            if depth < 0:
                remaining[b] -= 1
                cls[b] = (_reuse(uses[b]), pos, remaining[b] > 0)
                continue
            c: tuple = (_reuse(uses[b]),)
            if depth >= 1:
                c += (pos,)
            if depth >= 2:
                c += (h > 1,)
            if depth >= 3:
                c += (_length(n),)
            if depth >= 4:
                c += (-1 if b not in prev_gap else int(np.log2(prev_gap[b] + 1)),)
            if depth >= 5:
                c += (0 if i <= 2 else 1 if i <= 8 else 2,)
            cls[b] = c
    for b in last:
        gaps[cls[b]].append(_NEVER)
    return {c: np.sort(np.array(v, dtype=np.int64)) for c, v in gaps.items()}, stored


def bound(gaps: dict[tuple, np.ndarray], stored: int, slots: float, blocks: int) -> float:
    """Upper bound on the prefix-hit ratio with one TTL per class and average occupancy <= slots.

    The Lagrangian dual: for a price p per slot, D(p) = sum over classes of the best
    (hits - p x occupancy) + p x slots bounds every allocation that fits; D is convex in p and
    its minimum (where the occupancy at the best TTLs crosses ``slots``) is the bound. It equals
    the best allocation that may mix two TTLs within a class (a policy may randomize)."""
    curves = []
    for v in gaps.values():
        m = len(v)
        ttl = np.concatenate([[0], v]).astype(np.float64)  # keep the first j gaps: TTL = v[j-1]
        cum = np.concatenate([[0], np.cumsum(np.minimum(v, _NEVER))]).astype(np.float64)
        j = np.arange(m + 1)
        occ = (cum + (m - j) * ttl) / stored
        ok = ttl < _NEVER  # a TTL of "forever" is never worth its occupancy here
        curves.append((j.astype(np.float64), occ, ok))

    def best(price: float) -> tuple[float, float]:
        value = occupancy = 0.0
        for j, occ, ok in curves:
            score = np.where(ok, j - price * occ, -np.inf)
            k = int(np.argmax(score))
            value += score[k]
            occupancy += occ[k]
        return value, occupancy

    lo, hi = 1e-9, 1e9
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        if best(mid)[1] > slots:
            lo = mid
        else:
            hi = mid
    dual = min(best(p)[0] + p * slots for p in (lo, hi))
    return dual / blocks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated feature sets: " + ", ".join(SETS))
    args = ap.parse_args(argv)
    sets = args.sets.split(",")
    for s in sets:
        if s not in SETS:
            ap.error(f"--sets: unknown feature set {s!r}; known: {', '.join(SETS)}")
    tr = load_trace(args.trace)
    requests = [r.tolist() for r in tr.requests]
    print("| features | classes | " + " | ".join(f"{c:.0%}" for c in CAPACITIES) + " |")
    print("|---|---|" + "---|" * len(CAPACITIES))
    for s in sets:
        gaps, stored = intervals(requests, s)
        vals = [bound(gaps, stored, c * tr.distinct_blocks, tr.num_blocks) for c in CAPACITIES]
        print(f"| {s} | {len(gaps)} | " + " | ".join(f"{v:.4f}" for v in vals) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
