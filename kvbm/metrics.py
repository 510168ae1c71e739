"""Prometheus export of kvbm's per-tier counters (optional dependency ``prometheus_client``).

A custom collector reads :meth:`BlockManager.stats` at scrape time, so nothing is counted
twice and the hot paths never touch Prometheus objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kvbm.errors import ConfigError

if TYPE_CHECKING:
    from kvbm.manager import BlockManager

_COUNTERS = {
    "lookups": "Block lookups that reached this tier",
    "hits": "Blocks served from this tier",
    "misses": "Block lookups this tier could not serve",
    "stores": "Blocks stored in this tier",
    "store_failures": "Block stores that failed",
    "loads": "Blocks loaded from this tier",
    "evictions": "Blocks evicted from this tier by its policy",
    "removals": "Blocks removed from this tier on request",
    "bytes_stored": "Bytes stored in this tier",
    "bytes_loaded": "Bytes loaded from this tier",
    "checksum_failures": "Blocks that failed checksum verification in this tier",
}
_GAUGES = {
    "capacity_blocks": "Blocks this tier can hold",
    "used_blocks": "Blocks held (ready or being stored)",
    "pinned_blocks": "Blocks pinned by loads in flight",
    "capacity_bytes": "Bytes this tier can hold",
    "used_bytes": "Bytes held",
    "write_queue_blocks": "Blocks queued or in flight to be written to this tier",
}


def _require_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            "metrics_port is set but prometheus_client is not installed: pip install 'kvblockmgr[metrics]'"
        ) from None
    return prometheus_client


#: Every metric family the exporters write, as Prometheus sample names (counters get ``_total``).
METRIC_NAMES = (*(f"kvbm_{n}_total" for n in _COUNTERS), *(f"kvbm_{n}" for n in _GAUGES),
                "kvbm_index_blocks", "kvbm_index_memory_bytes")


class _Stats:
    def __init__(self, stats: dict[str, Any]) -> None:
        self._stats = stats

    def stats(self) -> dict[str, Any]:
        return self._stats


class KvbmCollector:
    """A prometheus_client collector over one BlockManager's stats (or anything with a
    ``stats()`` of the same shape: ``{tier: {counter: value}}``, optionally ``"index"``)."""

    def __init__(self, manager: BlockManager | Any, prefix: str = "kvbm") -> None:
        self._manager = manager
        self._prefix = prefix

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._manager.stats()
        tiers = {k: v for k, v in stats.items() if k != "index" and isinstance(v, dict)}
        for name, doc in _COUNTERS.items():
            fam = CounterMetricFamily(f"{self._prefix}_{name}", doc, labels=["tier"])
            for tier, d in tiers.items():
                if name in d:
                    fam.add_metric([tier], float(d[name]))
            yield fam
        for name, doc in _GAUGES.items():
            fam = GaugeMetricFamily(f"{self._prefix}_{name}", doc, labels=["tier"])
            for tier, d in tiers.items():
                if name in d:
                    fam.add_metric([tier], float(d[name]))
            yield fam
        if "index" in stats:
            yield GaugeMetricFamily(f"{self._prefix}_index_blocks", "Blocks in the index",
                                    value=stats["index"]["blocks"])
            yield GaugeMetricFamily(f"{self._prefix}_index_memory_bytes", "Bytes of index metadata",
                                    value=stats["index"]["memory_bytes"])


def make_registry(manager: BlockManager) -> Any:
    """A fresh CollectorRegistry holding only this manager's metrics."""
    prom = _require_prometheus()
    reg = prom.CollectorRegistry(auto_describe=False)
    reg.register(KvbmCollector(manager))
    return reg


def render(manager: BlockManager) -> bytes:
    """The manager's metrics in the Prometheus text exposition format."""
    prom = _require_prometheus()
    return prom.generate_latest(make_registry(manager))


def render_stats(stats: dict[str, Any]) -> bytes:
    """Per-tier stats (``{tier: {counter: value}}``) in the exposition format of :func:`render`."""
    prom = _require_prometheus()
    reg = prom.CollectorRegistry(auto_describe=False)
    reg.register(KvbmCollector(_Stats(stats)))
    return prom.generate_latest(reg)


def start_metrics_server(manager: BlockManager, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` for this manager on ``addr:port`` (loopback by default).

    Returns the server; call ``.shutdown()`` to stop it.
    """
    prom = _require_prometheus()
    server, _thread = prom.start_http_server(port, addr=addr, registry=make_registry(manager))
    return server
