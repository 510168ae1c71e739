"""BlockManager with the disk tier: host evictions demoted to disk, lookups that continue on
disk, loads that onboard disk -> host -> caller in one call, restarts, write-through."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kvbm import BlockManager, KvbmConfig, Tier
from kvbm.errors import BlockNotFoundError, ConfigError
from kvbm.tiers.disk import hash_key, slab_path

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
    with manager(tmp_path) as m:
        for i in range(10):  # one at a time: the host tier (4 blocks) evicts the oldest
            m.store(hs[i : i + 1], data[i : i + 1], parent=hs[i - 1] if i else None)
        m.disk.flush()
        r = m.lookup(hs)
        assert r.num_hits == 10
        assert [r.tier_of(i) for i in range(10)] == [Tier.DISK] * 6 + [Tier.HOST] * 4
        assert m.contains(hs[0]) == Tier.DISK
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
            f.seek((slot % spp) * BB + 100)
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
