"""BlockManager with the disk tier: host evictions demoted to disk, lookups that continue on
disk, loads that onboard disk -> host -> caller in one call, restarts, write-through."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kvbm import BlockManager, KvbmConfig, Tier
from kvbm.errors import BlockNotFoundError, ConfigError
from kvbm.tiers.disk import RECORD_HEADER, hash_key, slab_path

BB = 8192


def hashes(n: int, salt: int = 0) -> list[bytes]:
    return [hash_key((salt << 64) | (i + 1)) for i in range(n)]


def blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, BB), dtype=np.uint8)


def manager(tmp_path: Path, host_blocks: int = 4, disk_blocks: int = 64, **kw) -> BlockManager:
    cfg = KvbmConfig(
        block_bytes=BB, host_capacity_bytes=BB * host_blocks, host_pinned=False, disk_path=str(tmp_path),
        disk_capacity_bytes=BB * disk_blocks, disk_durability="none", **kw,
    )  # fmt: skip
    return BlockManager(cfg)


def test_write_behind_lookup_and_onboard(tmp_path: Path) -> None:
    hs, data = hashes(10), blocks(10)
    with manager(tmp_path, eviction_policy="lru") as m:
        for i in range(10):  # one at a time: the host tier (4 blocks, LRU) evicts the oldest
            m.store(hs[i : i + 1], data[i : i + 1], parent=hs[i - 1] if i else None)
        m.disk.flush()
        r = m.lookup(hs)
        assert r.num_hits == 10
        tiers = [r.tier_of(i) for i in range(10)]
        assert tiers.count(Tier.DISK) == 6 and tiers.count(Tier.HOST) == 4  # which 6: the policy's choice
        assert m.contains(hs[tiers.index(Tier.DISK)]) == Tier.DISK
        out = np.zeros((10, BB), np.uint8)
        m.load(hs, out)  # disk -> host -> out in one call
        assert np.array_equal(out, data)
        st = m.stats()
        assert st["disk"]["stores"] >= 6 and st["disk"]["hits"] >= 6
        assert st["disk"]["checksum_failures"] == 0


def test_disk_survives_restart(tmp_path: Path) -> None:
    hs, data = hashes(12, salt=1), blocks(12, seed=1)
    with manager(tmp_path) as m:
        for i in range(12):
            m.store(hs[i : i + 1], data[i : i + 1])
        m.evict(4)  # demote the rest too
    with manager(tmp_path) as m:
        assert m.lookup(hs).num_hits == 12
        out = np.zeros((12, BB), np.uint8)
        m.load(hs, out)
        assert np.array_equal(out, data)


def test_write_through(tmp_path: Path) -> None:
    hs, data = hashes(3, salt=2), blocks(3, seed=2)
    with manager(tmp_path, disk_write_policy="write_through") as m:
        assert m.store(hs, data) == 3
        assert len(m.disk) == 3
        o = np.empty(BB, np.uint8)
        assert m.disk.get([hs[1]], [o]) == [True] and np.array_equal(o, data[1])


def test_corrupt_disk_block_is_a_counted_miss(tmp_path: Path) -> None:
    hs, data = hashes(8, salt=3), blocks(8, seed=3)
    with manager(tmp_path) as m:
        for i in range(8):
            m.store(hs[i : i + 1], data[i : i + 1])
        m.disk.flush()
        slot = m.disk.catalog.slot_of(hs[0])
        spp = m.disk.catalog.geometry.slots_per_slab
        with open(slab_path(str(tmp_path), slot // spp), "r+b") as f:
            f.seek(m.disk.catalog.geometry.slot_offset(slot)[1] + RECORD_HEADER + 100)  # in the data
            f.write(b"\x00\xff\x00\xff")
            f.flush()
            os.fsync(f.fileno())
        with pytest.raises(BlockNotFoundError):
            m.load(hs[:1], np.zeros((1, BB), np.uint8))
        assert m.stats()["disk"]["checksum_failures"] == 1
        assert m.contains(hs[0]) is None
        out = np.zeros((1, BB), np.uint8)
        m.load(hs[1:2], out)  # other blocks unaffected
        assert np.array_equal(out[0], data[1])


def test_disk_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disk_capacity_bytes"):
        KvbmConfig(block_bytes=BB, disk_path=str(tmp_path))
    with pytest.raises(ConfigError, match="hold no block"):
        KvbmConfig(block_bytes=BB, disk_path=str(tmp_path), disk_capacity_bytes=BB - 1)
    with pytest.raises(ConfigError, match="does not exist"):
        BlockManager(KvbmConfig(block_bytes=BB, host_pinned=False, disk_path=str(tmp_path / "nope"),
                                disk_capacity_bytes=BB * 4))  # fmt: skip


def test_disk_stats_reach_prometheus(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus_client not installed")
    from kvbm.metrics import render

    hs, data = hashes(6, salt=4), blocks(6, seed=4)
    with manager(tmp_path) as m:
        for i in range(6):
            m.store(hs[i : i + 1], data[i : i + 1])
        m.disk.flush()
        assert m.stats()["disk"]["stores"] == 2  # two host evictions demoted
        m.load(hs[:1], np.zeros((1, BB), np.uint8))  # onboarding evicts (and demotes) one more
        m.disk.flush()
        st = m.stats()["disk"]
        assert st["stores"] == 3 and st["hits"] == 1 and st["bytes_stored"] == 3 * BB
        text = render(m).decode()
        assert 'kvbm_stores_total{tier="disk"} 3.0' in text
        assert 'kvbm_hits_total{tier="disk"} 1.0' in text
        assert f'kvbm_capacity_bytes{{tier="disk"}} {float(64 * BB)}' in text


def test_promote_async(tmp_path: Path) -> None:
    hs, data = hashes(8, salt=5), blocks(8, seed=5)
    with manager(tmp_path, host_blocks=8) as m:
        m.store(hs, data)
        m.evict(8)  # all demoted to disk
        m.disk.flush()
        assert m.lookup(hs).num_hits == 8 and m.contains(hs[0]) == Tier.DISK
        h = m.promote_async(hs[:4])
        assert h.wait(timeout=30) == 4 and h.poll()
        assert [m.contains(x) for x in hs[:5]] == [Tier.HOST] * 4 + [Tier.DISK]
        assert m.promote_async(hs[:4]).wait() == 0  # already in the host tier
        out = np.zeros((4, BB), np.uint8)
        m.load(hs[:4], out)
        assert np.array_equal(out, data[:4])


def test_engine_path_disk_to_host_to_engine_in_one_call(tmp_path: Path) -> None:
    import kvbm
    from kvbm.kv_layout import KvLayout

    layers, nblocks, heads, bs, head = 2, 10, 2, 16, 64
    rng = np.random.default_rng(11)
    src = [rng.integers(0, 1 << 16, (nblocks, heads, bs, 2 * head), dtype=np.uint16) for _ in range(layers)]
    layout = KvLayout.from_tensors(src, kind="vllm", dtype="float16")
    hs = kvbm.block_hashes(np.arange(6 * bs), bs, kvbm.Namespace("m", "fp16", "NHD", bs))
    cfg = KvbmConfig(
        block_bytes=layout.block_bytes, host_capacity_bytes=layout.block_bytes * 8, host_pinned=False,
        disk_path=str(tmp_path), disk_capacity_bytes=layout.block_bytes * 32, disk_durability="none",
    )  # fmt: skip
    src_ids = [3, 1, 4, 0, 9, 2]
    with BlockManager(cfg) as m:
        assert m.offload(layout, src_ids, hs).wait(10)
        m.evict(6)  # the host tier lets them go: demoted to disk
        m.disk.flush()
        assert [m.contains(h) for h in hs] == [Tier.DISK] * 6
    with BlockManager(cfg) as m:  # a restart: only the disk tier has them
        dst = [np.zeros_like(x) for x in src]
        dst_layout = KvLayout.from_tensors(dst, kind="vllm", dtype="float16")
        dst_ids = [5, 6, 7, 8, 0, 1]
        assert m.onboard(dst_layout, dst_ids, hs).wait(10)  # disk -> host -> engine blocks
        for layer in range(layers):
            assert np.array_equal(dst[layer][dst_ids], src[layer][src_ids])
        assert m.stats()["host"]["pinned_blocks"] == 0
        assert m.stats()["disk"]["hits"] == 6
        m.index.validate()


@pytest.mark.parametrize("policy", ["write_behind", "write_through"])
def test_engine_offload_reaches_disk(tmp_path: Path, policy: str) -> None:
    import kvbm
    from kvbm.kv_layout import KvLayout

    layers, nblocks, heads, bs, head = 2, 12, 2, 16, 64
    rng = np.random.default_rng(12)
    src = [rng.integers(0, 1 << 16, (nblocks, heads, bs, 2 * head), dtype=np.uint16) for _ in range(layers)]
    layout = KvLayout.from_tensors(src, kind="vllm", dtype="float16")
    hs = kvbm.block_hashes(np.arange(10 * bs), bs, kvbm.Namespace("m", "fp16", "NHD", bs))
    cfg = KvbmConfig(
        block_bytes=layout.block_bytes, host_capacity_bytes=layout.block_bytes * 4, host_pinned=False,
        disk_path=str(tmp_path), disk_capacity_bytes=layout.block_bytes * 32, disk_durability="none",
        disk_write_policy=policy,
    )  # fmt: skip
    with BlockManager(cfg) as m:
        for i in range(10):  # one block per offload: the 4-slot host tier evicts as it goes
            assert m.offload(layout, [i], hs[i : i + 1], parent=hs[i - 1] if i else None).wait(10)
        m.disk.flush()
        on_disk = [h for h in hs if m.disk.contains(h)]
        assert len(on_disk) == (10 if policy == "write_through" else 6)
        assert m.lookup(hs).num_hits == 10
        dst = [np.zeros_like(x) for x in src]
        dst_layout = KvLayout.from_tensors(dst, kind="vllm", dtype="float16")
        assert m.onboard(dst_layout, [11, 10], hs[:2]).wait(10)  # from disk
        for layer in range(layers):
            assert np.array_equal(dst[layer][[11, 10]], src[layer][[0, 1]])
