"""The connector's counters on vLLM's own ``/metrics`` (vLLM's connector stats hooks, 0.32+).

vLLM asks the scheduler-side connector for a :class:`KVConnectorStats` after every step
(``get_kv_connector_stats``), ships its ``data`` dict to the front-end process inside its scheduler
stats, rebuilds it there with ``build_kv_connector_stats`` (aggregated over a logging interval:
vLLM's periodic "KV Transfer metrics: ..." log line) and hands it to the
``KVConnectorPromMetrics`` made by ``build_prom_metrics`` (Prometheus, on vLLM's ``/metrics``).

The families are named as kvbm's own exporter names them (:mod:`kvbm.metrics`: ``kvbm_hits_total``,
``kvbm_stores_total``, ... with a ``tier`` label, plus vLLM's ``model_name``/``engine`` labels), so
one dashboard (``deploy/grafana/``) reads both. Counters travel as deltas since the last step;
gauges as current values; load latencies as samples (seconds from planning an asynchronous load to
the workers reporting it done).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

#: Counter families (``kvbm_<name>_total``) with their documentation.
COUNTERS = {
    "lookups": "Blocks looked up (that reached this tier)",
    "hits": "Blocks served from this tier",
    "stores": "Blocks stored in this tier",
    "store_failures": "Block stores that failed",
    "evictions": "Blocks evicted from this tier by its policy",
    "bytes_stored": "Bytes stored in this tier",
    "bytes_loaded": "Bytes loaded from this tier",
    "checksum_failures": "Blocks that failed checksum verification in this tier",
}
#: Gauge families (``kvbm_<name>``).
GAUGES = {
    "used_blocks": "Blocks held (ready or being stored)",
    "capacity_blocks": "Blocks this tier can hold",
    "write_queue_blocks": "Blocks queued or in flight to be written to this tier",
}
LOAD_SECONDS = "kvbm_load_seconds"
#: Every sample family this module puts on vLLM's /metrics.
METRIC_NAMES = (*(f"kvbm_{n}_total" for n in COUNTERS), *(f"kvbm_{n}" for n in GAUGES),
                f"{LOAD_SECONDS}_bucket", f"{LOAD_SECONDS}_count", f"{LOAD_SECONDS}_sum")
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class KvbmConnectorStats(KVConnectorStats):
    """``data``: ``{"counters": {"<name>|<tier>": delta}, "gauges": {...}, "load_seconds": [...]}``."""

    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data.setdefault("counters", {})
        self.data.setdefault("gauges", {})
        self.data.setdefault("load_seconds", [])

    def reset(self) -> None:
        self.data = {"counters": {}, "gauges": {}, "load_seconds": []}

    def aggregate(self, other: KVConnectorStats) -> KvbmConnectorStats:
        o = other.data
        c = self.data["counters"]
        for k, v in o.get("counters", {}).items():
            c[k] = c.get(k, 0) + v
        self.data["gauges"].update(o.get("gauges", {}))
        self.data["load_seconds"].extend(o.get("load_seconds", []))
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k.replace("|", "_"): v for k, v in self.data["counters"].items() if v}
        ls = self.data["load_seconds"]
        if ls:
            out["load_ms_mean"] = round(1e3 * sum(ls) / len(ls), 3)
        return out

    def is_empty(self) -> bool:
        d = self.data
        return not any(d["counters"].values()) and not d["load_seconds"] and not d["gauges"]


class StatsTracker:
    """Scheduler side: turns the scheduler's cumulative counters into per-step deltas."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._last_gauges: dict[str, float] = {}

    def take(self, counters: dict[str, float], gauges: dict[str, float],
             load_seconds: list[float]) -> KvbmConnectorStats | None:
        delta = {k: v - self._last.get(k, 0) for k, v in counters.items() if v != self._last.get(k, 0)}
        self._last = dict(counters)
        changed = {k: v for k, v in gauges.items() if self._last_gauges.get(k) != v}
        self._last_gauges = dict(gauges)
        if not delta and not changed and not load_seconds:
            return None
        return KvbmConnectorStats(data={"counters": delta, "gauges": changed, "load_seconds": list(load_seconds)})


class KvbmPromMetrics(KVConnectorPromMetrics):
    """kvbm's families on vLLM's Prometheus registry (vLLM's metric classes and labels)."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        ln = [*labelnames, "tier"]
        self._counters = {n: self._counter_cls(name=f"kvbm_{n}", documentation=f"kvbm: {d}", labelnames=ln)
                          for n, d in COUNTERS.items()}
        self._gauges = {n: self._gauge_cls(name=f"kvbm_{n}", documentation=f"kvbm: {d}", labelnames=ln)
                        for n, d in GAUGES.items()}
        self._load = self._histogram_cls(name=LOAD_SECONDS, labelnames=labelnames, buckets=_BUCKETS,
                                         documentation="kvbm: seconds from planning an asynchronous load to "
                                                       "its completion on every worker")
        tiers = ("host", "disk")
        for idx, lv in per_engine_labelvalues.items():  # every family present from the first scrape
            for fam in (*self._counters.values(), *self._gauges.values()):
                for t in tiers:
                    fam.labels(*lv, t)
            self._load.labels(*lv)
            del idx

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        lv = self.per_engine_labelvalues.get(engine_idx, self.per_engine_labelvalues.get(0, []))
        for key, v in transfer_stats_data.get("counters", {}).items():
            name, _, tier = key.partition("|")
            if name in self._counters and v > 0:
                self._counters[name].labels(*lv, tier).inc(v)
        for key, v in transfer_stats_data.get("gauges", {}).items():
            name, _, tier = key.partition("|")
            if name in self._gauges:
                self._gauges[name].labels(*lv, tier).set(v)
        h = self._load.labels(*lv)
        for s in transfer_stats_data.get("load_seconds", []):
            h.observe(s)
