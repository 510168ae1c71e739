"""RedisTier against a real Valkey server (Debian package ``valkey-server``, scripts/install_valkey.sh)
and a real 3-master cluster (Redis and Valkey) that loses a node mid-run and gets it back."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install 'kvblockmgr[redis]')")

from redis_server import RedisCluster, RedisServer  # noqa: E402

from kvbm.tiers import open_remote_tier  # noqa: E402
from kvbm.tiers.redis_tier import RedisTier  # noqa: E402

BB = 10000
SERVERS = {"redis": "redis-server", "valkey": "valkey-server"}


def _binary(kind: str) -> str:
    path = shutil.which(SERVERS[kind])
    if path is None:
        pytest.skip(f"{SERVERS[kind]} is not installed (scripts/install_{kind}.sh installs it)")
    return path


def _data(h: bytes) -> np.ndarray:
    """The content oracle: a block's bytes follow from its hash."""
    return np.frombuffer(hashlib.shake_128(h).digest(BB), np.uint8)


def _hashes(n: int, tag: int) -> list[bytes]:
    return [hashlib.blake2b(f"{tag}:{i}".encode(), digest_size=16).digest() for i in range(n)]


@pytest.fixture
def valkey():
    srv = RedisServer()
    srv.binary = _binary("valkey")
    srv.start()
    yield srv
    srv.close()


def test_valkey_server_roundtrip_chunks_and_threads(valkey: RedisServer) -> None:
    info = redis.Redis(port=valkey.port).info("server")
    assert "valkey_version" in info or info.get("server_name") == "valkey"
    t = open_remote_tier(f"valkey://127.0.0.1:{valkey.port}/0", block_bytes=BB, namespace="v", chunk_bytes=4096)
    assert isinstance(t, RedisTier)
    errors: list[BaseException] = []

    def worker(tag: int) -> None:
        try:
            hs = _hashes(50, tag)
            assert t.put(hs, np.stack([_data(h) for h in hs])).all()
            assert t.lookup_prefix(hs) == 50
            out = np.zeros((50, BB), np.uint8)
            assert t.get(hs, out).all()
            for h, row in zip(hs, out, strict=True):
                assert np.array_equal(row, _data(h))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors[0]
    assert redis.Redis(port=valkey.port).dbsize() == 4 * 50 * 3  # 3 chunks per block
    t.close()


def test_valkey_stopped_mid_run_degrades_and_recovers(valkey: RedisServer) -> None:
    t = RedisTier(valkey.url, block_bytes=BB, namespace="s", timeout_s=1.0, retry_interval_s=0.3)
    hs = _hashes(8, 1)
    data = np.stack([_data(h) for h in hs])
    assert t.put(hs, data).all()
    valkey.stop()
    for _ in range(5):
        assert t.lookup_prefix(hs) == 0
        assert not t.get(hs, np.zeros_like(data)).any()
    valkey.start()
    deadline = time.monotonic() + 10
    while not t.put(hs, data).all():
        assert time.monotonic() < deadline, "the tier did not recover after valkey came back"
        time.sleep(0.1)
    out = np.zeros_like(data)
    assert t.get(hs, out).all()
    np.testing.assert_array_equal(out, data)
    t.close()


def _cluster_ok(port: int) -> bool:
    r = subprocess.run([shutil.which("redis-cli") or "valkey-cli", "-p", str(port), "cluster", "info"],
                       capture_output=True, text=True)
    return "cluster_state:ok" in r.stdout


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_cluster_node_killed_mid_run_degrades_to_misses_and_recovers(kind: str) -> None:
    binary = _binary(kind)
    cluster = RedisCluster()
    for n in cluster.nodes:
        n.binary = binary
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.close()
        pytest.skip(str(e))
    try:
        t = RedisTier(cluster.url, block_bytes=BB, namespace="k", chunk_bytes=4096, timeout_s=1.0,
                      retry_interval_s=0.3)
        hs = _hashes(120, 7)
        data = np.stack([_data(h) for h in hs])
        assert t.put(hs, data).all()
        stop = threading.Event()
        errors: list[BaseException] = []
        wrong: list[int] = []
        served: list[int] = []

        def reader() -> None:
            out = np.zeros_like(data)
            while not stop.is_set():
                try:
                    t.lookup_prefix(hs)
                    ok = t.get(hs, out)
                    for i in np.flatnonzero(ok):
                        if not np.array_equal(out[i], data[i]):
                            wrong.append(int(i))
                    served.append(int(ok.sum()))
                except BaseException as e:  # noqa: BLE001 - the test's point: none may escape
                    errors.append(e)
                    return

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for th in readers:
            th.start()
        time.sleep(0.3)
        victim = cluster.nodes[1]
        victim.proc.kill()  # SIGKILL one master mid-run
        victim.proc.wait(10)
        victim.proc = None
        time.sleep(3.0)  # past --cluster-node-timeout: the cluster marks the node failed
        down = t.get(hs, np.zeros_like(data))
        assert not down.all()  # the dead master's blocks (or all, once the cluster is down) miss
        victim.start()  # same port and directory (nodes.conf): it rejoins with its slots, no data
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(n.port) for n in cluster.nodes):
            assert time.monotonic() < deadline, "the cluster did not recover"
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while not t.put(hs, data).all():
            assert time.monotonic() < deadline, "the tier did not recover after the node came back"
            time.sleep(0.2)
        stop.set()
        for th in readers:
            th.join(30)
        assert not errors, repr(errors[0])
        assert not wrong, f"wrong bytes served for blocks {wrong[:5]}"
        assert max(served) == len(hs)  # before the kill everything was served
        out = np.zeros_like(data)
        assert t.get(hs, out).all()
        np.testing.assert_array_equal(out, data)
        assert t.lookup_prefix(hs) == len(hs)
        assert t.stats()["errors"] >= 1 and t.stats()["available"]
        t.close()
    finally:
        cluster.close()
