"""Prometheus exporter over real counters and a real HTTP scrape on loopback."""

from __future__ import annotations

import os
import socket
import urllib.request

import numpy as np
import pytest

from kvbm import BlockManager, KvbmConfig

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_text_and_http_scrape() -> None:
    port = free_port()
    m = BlockManager(KvbmConfig(block_bytes=1024, host_capacity_bytes=1024 * 4, metrics_port=port))
    try:
        hs = [os.urandom(16) for _ in range(6)]
        m.store(hs[:3], np.zeros((3, 1024), np.uint8))
        m.store(hs[3:], np.zeros((3, 1024), np.uint8))
        m.lookup(hs)
        from kvbm.metrics import render

        text = render(m).decode()
        assert 'kvbm_stores_total{tier="host"} 6.0' in text
        assert 'kvbm_evictions_total{tier="host"} 2.0' in text
        assert 'kvbm_capacity_blocks{tier="host"} 4.0' in text
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kvbm_hits_total{tier="host"}' in body
    finally:
        m.close()
