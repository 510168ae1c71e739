"""The remote tier in the BlockManager's chain (GPU -> host -> disk -> remote), on real servers:
redis-server on 127.0.0.1 and an in-process ``kvbm serve`` (TCP data path)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from kvbm import BlockManager, KvbmConfig, Tier
from kvbm.errors import BlockNotFoundError, ConfigError
from kvbm.serve import ServeConfig, StoreServer

BB = 8192


def rand_hashes(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def rand_blocks(n: int) -> np.ndarray:
    return np.random.default_rng().integers(0, 256, (n, BB), np.uint8)


@pytest.fixture
def redis_url():
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'kvblockmgr[redis]')")
    from redis_server import RedisServer

    srv = RedisServer()
    try:
        srv.start()
    except RuntimeError as e:
        srv.close()
        pytest.skip(str(e))
    yield srv
    srv.close()


@pytest.fixture
def serve_url():
    with StoreServer(ServeConfig(capacity_bytes=16 << 20, max_block_bytes=BB, token="tok")) as srv:
        yield srv.url


@pytest.fixture
def serve_ucx_url():
    from kvbm.transfer import ucx_available

    ok, why = ucx_available()
    if not ok:
        pytest.skip(f"ucx data path: {why}")
    with StoreServer(ServeConfig(capacity_bytes=16 << 20, max_block_bytes=BB, token="tok", data_path="ucx")) as srv:
        yield srv.url


@pytest.fixture(params=["redis", "kvbm-serve", "kvbm-serve-ucx"])
def remote_url(request):
    if request.param == "redis":
        yield request.getfixturevalue("redis_url").url
    elif request.param == "kvbm-serve":
        yield request.getfixturevalue("serve_url")
    else:
        yield request.getfixturevalue("serve_ucx_url")


def manager(url: str, **kw) -> BlockManager:
    kw.setdefault("host_capacity_bytes", 64 * BB)
    return BlockManager(KvbmConfig(block_bytes=BB, remote_url=url, remote_token="tok", **kw))


def test_second_instance_finds_prefetches_and_loads_what_the_first_stored(remote_url):
    hs, data = rand_hashes(12), rand_blocks(12)
    with manager(remote_url) as a, manager(remote_url) as b:
        assert a.store(hs, data) == 12
        a.flush_remote(10)
        r = b.lookup(hs)
        assert r.num_hits == 12 and all(r.tier_of(i) == Tier.REMOTE for i in range(12))
        h = b.prefetch(hs[:8])
        assert h.wait(10) == 8 and h.done
        r = b.lookup(hs)
        assert [r.tier_of(i) for i in range(12)] == [Tier.HOST] * 8 + [Tier.REMOTE] * 4
        out = np.zeros_like(data)
        b.load(hs, out)  # the last 4 come on demand
        np.testing.assert_array_equal(out, data)
        assert b.stats()["remote"]["get_hits"] == 12
        assert b.prefetch(hs).wait(10) == 0  # all in host now


def test_namespaces_keep_managers_apart(remote_url):
    hs, data = rand_hashes(3), rand_blocks(3)
    with manager(remote_url, remote_namespace="a") as a, manager(remote_url, remote_namespace="b") as b:
        a.store(hs, data)
        a.flush_remote(10)
        assert b.lookup(hs).num_hits == 0
        with pytest.raises(BlockNotFoundError):
            b.load(hs, np.zeros_like(data))


def test_write_behind_sends_host_evictions(redis_url):
    hs, data = rand_hashes(20), rand_blocks(20)
    with manager(redis_url.url, host_capacity_bytes=8 * BB, remote_write_policy="write_behind",
                 eviction_policy="lru") as a:
        for i in range(0, 20, 4):
            a.store(hs[i:i + 4], data[i:i + 4])
        a.flush_remote(10)
        assert a.stats()["remote"]["stored"] == 12  # the 12 evicted, not the 8 still in host
        r = a.lookup(hs)
        assert r.num_hits == 20
        assert [r.tier_of(i) for i in range(20)] == [Tier.REMOTE] * 12 + [Tier.HOST] * 8
        out = np.zeros((4, BB), np.uint8)
        a.load(hs[:4], out)  # back from remote (evicting others, which go to remote in turn)
        np.testing.assert_array_equal(out, data[:4])


def test_read_only_policy_writes_nothing(redis_url):
    with manager(redis_url.url, remote_write_policy="read_only") as a:
        a.store(rand_hashes(4), rand_blocks(4))
        a.flush_remote(10)
        assert a.stats()["remote"]["puts"] == 0


def test_chain_host_disk_remote(redis_url, tmp_path):
    hs, data = rand_hashes(10), rand_blocks(10)
    cfg = dict(disk_path=str(tmp_path), disk_capacity_bytes=64 * BB, remote_write_policy="read_only")
    with manager(redis_url.url) as other, manager(redis_url.url, **cfg) as m:
        other.store(hs[6:], data[6:])  # only the remote tier has 6..9 for m
        other.flush_remote(10)
        m.store(hs[:3], data[:3])
        assert all(m.disk.put(hs[3:6], list(data[3:6])))
        r = m.lookup(hs)
        assert r.num_hits == 10
        assert [r.tier_of(i) for i in range(10)] == [Tier.HOST] * 3 + [Tier.DISK] * 3 + [Tier.REMOTE] * 4
        out = np.zeros_like(data)
        m.load(hs, out)
        np.testing.assert_array_equal(out, data)
        assert m.lookup(hs[6:]).tier_of(0) == Tier.HOST


def test_redis_stopped_mid_run_engine_goes_on_and_recovers(redis_url):
    hs, data = rand_hashes(16), rand_blocks(16)
    with manager(redis_url.url, remote_timeout_s=1.0) as a, manager(redis_url.url, remote_timeout_s=1.0) as b:
        a.store(hs[:8], data[:8])
        a.flush_remote(10)
        redis_url.stop()
        t0 = time.monotonic()
        assert a.store(hs[8:], data[8:]) == 8  # host store goes on; the remote put fails quietly
        a.flush_remote(10)
        assert a.lookup(hs).num_hits == 16  # host
        assert b.lookup(hs).num_hits == 0  # remote down: misses
        assert b.prefetch(hs).wait(10) == 0
        with pytest.raises(BlockNotFoundError):
            b.load(hs[:1], np.zeros((1, BB), np.uint8))
        out = np.zeros((16, BB), np.uint8)
        a.load(hs, out)
        np.testing.assert_array_equal(out, data)
        assert time.monotonic() - t0 < 15
        assert b.stats()["remote"]["errors"] >= 1 and not b.stats()["remote"]["available"]
        redis_url.start()  # comes back empty
        deadline = time.monotonic() + 15
        while True:  # the tier retries 1 s after its last failure; fresh blocks then get through
            more, mdata = rand_hashes(4), rand_blocks(4)
            a.store(more, mdata)
            a.flush_remote(10)
            if b.lookup(more).num_hits == 4:
                break
            assert time.monotonic() < deadline, "remote tier did not recover"
            time.sleep(0.2)
        out = np.zeros((4, BB), np.uint8)
        b.load(more, out)
        np.testing.assert_array_equal(out, mdata)


def test_prefetch_with_a_disk_tier_installs_on_wait(redis_url, tmp_path):
    hs, data = rand_hashes(6), rand_blocks(6)
    with manager(redis_url.url) as other, manager(redis_url.url, disk_path=str(tmp_path),
                                                  disk_capacity_bytes=64 * BB) as m:
        other.store(hs, data)
        other.flush_remote(10)
        h = m.prefetch(hs)
        assert h.wait(10) == 6 and h.wait(10) == 6  # installed once, on this thread
        r = m.lookup(hs)
        assert [r.tier_of(i) for i in range(6)] == [Tier.HOST] * 6
        out = np.zeros_like(data)
        m.load(hs, out)
        np.testing.assert_array_equal(out, data)


def test_remote_counters_are_exported_to_prometheus(redis_url):
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    from kvbm.metrics import render

    hs, data = rand_hashes(3), rand_blocks(3)
    with manager(redis_url.url) as a, manager(redis_url.url) as b:
        a.store(hs, data)
        a.flush_remote(10)
        b.load(hs, np.zeros_like(data))
        text = render(b).decode()
        assert 'kvbm_hits_total{tier="remote"}' in text or 'kvbm_hits{tier="remote"}' in text
        assert f'kvbm_bytes_loaded_total{{tier="remote"}} {float(3 * BB)}' in text


def test_engine_offload_on_one_instance_onboards_on_another(remote_url):
    """Engine path: offload (paged KV -> host) writes through to the remote tier; another
    instance onboards remote -> host -> its own paged KV in one call."""
    import kvbm
    from kvbm.kv_layout import KvLayout

    rng = np.random.default_rng(5)
    src = [rng.integers(0, 1 << 16, (8, 1, 16, 64), dtype=np.uint16) for _ in range(3)]  # 6 KiB blocks
    dst = [np.zeros_like(x) for x in src]
    layout = KvLayout.from_tensors(src, kind="vllm", dtype="float16")
    dst_layout = KvLayout.from_tensors(dst, kind="vllm", dtype="float16")
    hs = kvbm.block_hashes(np.arange(4 * 16), 16, kvbm.Namespace("m", "fp16", "NHD", 16))
    cfg = KvbmConfig(block_bytes=layout.block_bytes, host_capacity_bytes=16 * layout.block_bytes,
                     remote_url=remote_url, remote_token="tok")
    with BlockManager(cfg) as a, BlockManager(cfg) as b:
        assert a.offload(layout, [5, 1, 7, 2], hs).wait(10)
        a.flush_remote(10)
        assert [b.lookup(hs).tier_of(i) for i in range(4)] == [Tier.REMOTE] * 4
        assert b.onboard(dst_layout, [0, 3, 4, 6], hs).wait(10)
        for layer in range(3):
            np.testing.assert_array_equal(dst[layer][[0, 3, 4, 6]], src[layer][[5, 1, 7, 2]])
        assert b.stats()["host"]["pinned_blocks"] == 0


def test_remote_config_is_validated():
    with pytest.raises(ConfigError, match="remote_url"):
        KvbmConfig(remote_url="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="remote_write_policy"):
        KvbmConfig(remote_write_policy="sometimes")
    with pytest.raises(ConfigError, match="remote_timeout_s"):
        KvbmConfig.from_env({"KVBM_REMOTE_TIMEOUT_S": "-1"})
    assert KvbmConfig.from_env({"KVBM_REMOTE_TIMEOUT_S": "0.25"}).remote_timeout_s == 0.25
