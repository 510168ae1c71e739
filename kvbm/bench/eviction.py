"""Prefix-hit ratio of each eviction policy on the Mooncake conversation trace at 5/10/25%
capacity (``--full``: 1/2/5/10/25%), next to LRU and a clairvoyant (Belady) replay measured in the
same run. The trace ships in the package
(:func:`kvbm.data.mooncake_conversation`; ``KVBM_TRACE`` overrides it)."""

from __future__ import annotations

from pathlib import Path

from kvbm import eviction_policies
from kvbm.bench import Context, Row


def find_trace() -> Path:
    """The trace to replay: ``KVBM_TRACE`` or the bundled Mooncake conversation trace."""
    from kvbm.data import mooncake_conversation

    return mooncake_conversation()


def run(ctx: Context) -> list[Row]:
    from kvbm.replay import CLAIRVOYANT, load_trace, replay, replay_clairvoyant

    path = find_trace()
    trace = load_trace(path)
    rows: list[Row] = []
    caps = [0.05, 0.10, 0.25] if ctx.quick else [0.01, 0.02, 0.05, 0.10, 0.25]
    for cap in ctx.progress(caps, "eviction replay"):
        lru = replay(trace, cap, "lru").prefix_hit_ratio
        for pol in [*eviction_policies(), CLAIRVOYANT]:
            r = (replay_clairvoyant(trace, cap) if pol == CLAIRVOYANT else replay(trace, cap, pol)).prefix_hit_ratio
            rows.append(Row("eviction", f"{pol} @ {cap:.0%} capacity", r, "prefix hit ratio",
                            lru, "LRU", r / lru if lru else None, params={"policy": pol, "capacity": cap}))
    return rows
