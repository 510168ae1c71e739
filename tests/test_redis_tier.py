"""RedisTier against a real redis-server on 127.0.0.1 (skipped with the reason when the binary is missing)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install 'kvblockmgr[redis]')")

from redis_server import RedisServer  # noqa: E402

from kvbm.errors import ConfigError, InvalidArgumentError  # noqa: E402
from kvbm.tiers import open_remote_tier  # noqa: E402
from kvbm.tiers.redis_tier import RedisTier  # noqa: E402


def _start(**kw) -> RedisServer:
    srv = RedisServer(**kw)
    try:
        return srv.start()
    except RuntimeError as e:
        srv.close()
        pytest.skip(str(e))


@pytest.fixture
def server():
    srv = _start()
    yield srv
    srv.close()


def hashes(n: int, seed: int = 0) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)] if seed == 0 else [bytes([seed]) * 15 + bytes([i]) for i in range(n)]


def blocks(n: int, size: int) -> np.ndarray:
    return np.random.default_rng().integers(0, 256, (n, size), np.uint8)


def test_roundtrip_and_prefix(server):
    with RedisTier(server.url, block_bytes=1000, namespace="tenant") as t:
        hs, data = hashes(20), blocks(20, 1000)
        assert t.put(hs, data).all()
        assert t.lookup_prefix(hs) == 20
        out = np.zeros_like(data)
        assert t.get(hs, out).all()
        np.testing.assert_array_equal(out, data)
        # prefix stops at the first absent block
        other = hashes(1)
        assert t.lookup_prefix(hs[:5] + other + hs[5:]) == 5
        ok = t.get(hs[:2] + other, np.zeros((3, 1000), np.uint8))
        assert ok.tolist() == [True, True, False]
        s = t.stats()
        assert s["stored"] == 20 and s["get_hits"] == 22 and s["get_misses"] == 1 and s["errors"] == 0


def test_open_remote_tier_by_url(server):
    t = open_remote_tier(server.url, block_bytes=64, namespace=b"n" * 16)
    assert isinstance(t, RedisTier)
    t.close()
    with pytest.raises(ConfigError, match="unknown scheme"):
        open_remote_tier("ftp://127.0.0.1/", block_bytes=64, namespace="x")


def test_chunked_blocks(server):
    size = 3 * 4096 + 100
    with RedisTier(server.url, block_bytes=size, namespace="c", chunk_bytes=4096) as t:
        assert t.num_chunks == 4
        hs, data = hashes(8), blocks(8, size)
        assert t.put(hs, data).all()
        raw = redis.Redis.from_url(server.url)
        assert raw.strlen(t._key(hs[0])) == 56 + 4096
        assert raw.strlen(t._key(hs[0], 3)) == 100
        out = np.zeros_like(data)
        assert t.get(hs, out).all()
        np.testing.assert_array_equal(out, data)
        # a middle chunk evicted: that block alone is a miss (not a checksum failure)
        raw.delete(t._key(hs[5], 2))
        out[:] = 0
        ok = t.get(hs, out)
        assert ok.tolist() == [True] * 5 + [False] + [True] * 2
        np.testing.assert_array_equal(out[ok], data[ok])
        # the last chunk gone: lookups stop there
        raw.delete(t._key(hs[3], 3))
        assert t.lookup_prefix(hs) == 3
        assert t.stats()["checksum_failures"] == 0


def test_corrupted_bytes_are_a_counted_miss(server):
    with RedisTier(server.url, block_bytes=5000, namespace="x", chunk_bytes=4096) as t:
        hs, data = hashes(3), blocks(3, 5000)
        assert t.put(hs, data).all()
        raw = redis.Redis.from_url(server.url)
        raw.setrange(t._key(hs[1], 1), 7, b"\xff" if data[1, 4096 + 7] != 0xFF else b"\x00")  # flip tail byte
        raw.set(t._key(hs[2]), raw.get(t._key(hs[2]))[:-1])  # truncated head chunk
        out = np.zeros_like(data)
        assert t.get(hs, out).tolist() == [True, False, False]
        assert t.stats()["checksum_failures"] == 2
        np.testing.assert_array_equal(out[0], data[0])


def test_namespaces_are_isolated(server):
    a = RedisTier(server.url, block_bytes=256, namespace="tenant-a")
    b = RedisTier(server.url, block_bytes=256, namespace="tenant-b")
    hs, data = hashes(4), blocks(4, 256)
    assert a.put(hs, data).all()
    assert b.lookup_prefix(hs) == 0
    assert not b.get(hs, np.zeros_like(data)).any()
    # even if a's record is copied under b's key, the header's namespace fingerprint refuses it
    raw = redis.Redis.from_url(server.url)
    raw.set(b._key(hs[0]), raw.get(a._key(hs[0])))
    assert b.lookup_prefix(hs) == 1
    assert b.get(hs[:1], np.zeros((1, 256), np.uint8)).tolist() == [False]
    assert b.stats()["checksum_failures"] == 1
    # a record stored under another hash's key is refused too
    raw.set(a._key(hs[1]), raw.get(a._key(hs[2])))
    assert a.get(hs[1:3], np.zeros((2, 256), np.uint8)).tolist() == [False, True]
    a.close()
    b.close()


def test_bad_arguments(server):
    with RedisTier(server.url, block_bytes=128, namespace="x") as t:
        with pytest.raises(InvalidArgumentError, match=r"hashes\[1\]"):
            t.lookup_prefix([b"a" * 16, b"short"])
        with pytest.raises(InvalidArgumentError, match="3 blocks of 128"):
            t.put(hashes(3), np.zeros((3, 127), np.uint8))
        with pytest.raises(InvalidArgumentError, match="read-only"):
            t.get(hashes(1), bytes(128))
    with pytest.raises(ConfigError, match="block_bytes"):
        RedisTier(server.url, block_bytes=0, namespace="x")
    with pytest.raises(InvalidArgumentError, match="namespace"):
        RedisTier(server.url, block_bytes=8, namespace=b"short")


def test_redis_stopped_mid_run_degrades_and_recovers():
    srv = _start()
    try:
        t = RedisTier(srv.url, block_bytes=4096, namespace="e", timeout_s=1.0, retry_interval_s=0.3)
        hs, data = hashes(16), blocks(16, 4096)
        assert t.put(hs[:8], data[:8]).all()
        srv.stop()
        t0 = time.monotonic()
        for _ in range(20):  # the engine goes on: misses, no exceptions
            assert t.lookup_prefix(hs) == 0
            assert not t.get(hs[:8], np.zeros((8, 4096), np.uint8)).any()
            assert not t.put(hs[8:], data[8:]).any()
        assert time.monotonic() - t0 < 10
        s = t.stats()
        assert s["errors"] >= 1 and not s["available"] and "Connection" in s["last_error"]
        assert s["skipped_unavailable"] >= 1  # the breaker kept most calls off the dead server
        srv.start()  # same port; the data is gone (no persistence)
        deadline = time.monotonic() + 10
        while not t.put(hs[8:], data[8:]).all():
            assert time.monotonic() < deadline, "the tier did not recover after redis came back"
            time.sleep(0.1)
        out = np.zeros((8, 4096), np.uint8)
        assert t.get(hs[8:], out).all()
        np.testing.assert_array_equal(out, data[8:])
        assert t.lookup_prefix(hs) == 0  # the first 8 died with the server
        assert t.stats()["available"]
        t.close()
    finally:
        srv.close()


def test_full_server_noeviction_counts_store_failures():
    srv = _start(maxmemory="3mb", policy="noeviction")
    try:
        with RedisTier(srv.url, block_bytes=64 << 10, namespace="f") as t:
            hs, data = hashes(100), blocks(100, 64 << 10)
            ok = t.put(hs, data)
            assert 0 < ok.sum() < 100
            s = t.stats()
            assert s["store_failures"] == 100 - ok.sum() and s["available"]
            out = np.zeros((int(ok.sum()), 64 << 10), np.uint8)
            stored = [h for h, k in zip(hs, ok) if k]
            assert t.get(stored, out).all()
            np.testing.assert_array_equal(out, data[ok])
    finally:
        srv.close()


def test_allkeys_lru_evicts_without_wrong_data():
    srv = _start(maxmemory="4mb", policy="allkeys-lru")
    try:
        with RedisTier(srv.url, block_bytes=20000, namespace="l", chunk_bytes=8192) as t:
            hs, data = hashes(600), blocks(600, 20000)
            for i in range(0, 600, 50):
                assert t.put(hs[i:i + 50], data[i:i + 50]).all()
            out = np.zeros_like(data)
            ok = t.get(hs, out)
            assert 0 < ok.sum() < 600  # some evicted, some kept
            np.testing.assert_array_equal(out[ok], data[ok])
            assert t.stats()["checksum_failures"] == 0
    finally:
        srv.close()


def test_threads_share_one_tier(server):
    t = RedisTier(server.url, block_bytes=2048, namespace="t")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for _ in range(20):
                hs, data = hashes(10), blocks(10, 2048)
                assert t.put(hs, data).all()
                out = np.zeros_like(data)
                assert t.get(hs, out).all()
                np.testing.assert_array_equal(out, data)
        except BaseException as e:
            errors.append(e)

    th = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for x in th:
        x.start()
    for x in th:
        x.join(60)
    assert not errors
    assert t.stats()["stored"] == 800
    t.close()


def test_redis_cluster_three_masters():
    from redis_server import RedisCluster

    cluster = RedisCluster()
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.close()
        pytest.skip(str(e))
    try:
        with RedisTier(cluster.url, block_bytes=10000, namespace="cl", chunk_bytes=4096) as t:
            assert t.cluster
            hs, data = hashes(300), blocks(300, 10000)
            assert t.put(hs, data).all()
            assert t.lookup_prefix(hs) == 300
            out = np.zeros_like(data)
            assert t.get(hs, out).all()
            np.testing.assert_array_equal(out, data)
            # the blocks really are spread over the three masters
            counts = [redis.Redis(port=n.port).dbsize() for n in cluster.nodes]
            assert sum(counts) == 300 * 3 and min(counts) > 0
            assert t.stats()["errors"] == 0
    finally:
        cluster.close()


def test_redis_frozen_mid_run_times_out_to_misses_and_recovers():
    """SIGSTOP: the server accepts nothing and answers nothing; each call is bounded by timeout_s."""
    import signal

    from redis_server import stop_process

    srv = _start()
    try:
        t = RedisTier(srv.url, block_bytes=4096, namespace="z", timeout_s=0.5, retry_interval_s=0.3)
        hs, data = hashes(4), blocks(4, 4096)
        assert t.put(hs, data).all()
        stop_process(srv.proc.pid)
        try:
            t0 = time.monotonic()
            assert t.lookup_prefix(hs) == 0
            assert time.monotonic() - t0 < 3  # one timeout (plus one retry), not a hang
            t0 = time.monotonic()
            for _ in range(10):  # the breaker keeps the rest off the frozen server
                assert not t.get(hs, np.zeros_like(data)).any()
            assert time.monotonic() - t0 < 3
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        out = np.zeros_like(data)
        while not t.get(hs, out).all():
            assert time.monotonic() < deadline, "did not recover after SIGCONT"
            time.sleep(0.1)
        np.testing.assert_array_equal(out, data)
        t.close()
    finally:
        srv.close()
