"""Prefix-hit ratio of each eviction policy on the Mooncake conversation trace at 5/10/25%
capacity, next to LRU measured in the same run. The trace is found through KVBM_TRACE, or
../shared/data/traces/ from the current directory or from the source checkout."""

from __future__ import annotations

import os
from pathlib import Path

from kvbm import eviction_policies
from kvbm.bench import Context, Row

_NAME = "mooncake_conversation.jsonl"


def find_trace() -> Path | None:
    if os.environ.get("KVBM_TRACE"):
        return Path(os.environ["KVBM_TRACE"])
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *Path.cwd().parents[:2], *here.parents[:5]):
        p = base / "shared" / "data" / "traces" / _NAME
        if p.is_file():
            return p
    return None


def run(ctx: Context) -> list[Row]:
    from kvbm.replay import load_trace, replay

    path = find_trace()
    if path is None:
        return ctx.skip("eviction", f"trace {_NAME} not found (set KVBM_TRACE)")
    trace = load_trace(path)
    rows: list[Row] = []
    for cap in ctx.progress([0.05, 0.10, 0.25], "eviction replay"):
        lru = replay(trace, cap, "lru").prefix_hit_ratio
        for pol in eviction_policies():
            r = replay(trace, cap, pol).prefix_hit_ratio
            rows.append(Row("eviction", f"{pol} @ {cap:.0%} capacity", r, "prefix hit ratio",
                            lru, "LRU", r / lru if lru else None))
    return rows
