"""The one namespace digest: the user's kvbm.Namespace, block_bytes and the tenant reach the disk
and remote tiers of a BlockManager (real disk directory, real in-process ``kvbm serve``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvbm import BlockManager, KvbmConfig, Namespace, Tier
from kvbm.errors import InvalidArgumentError
from kvbm.hashing import tier_namespace_digest
from kvbm.serve import ServeConfig, StoreServer

BB = 4096
NS_A = Namespace("model-a", "bfloat16", "nhd", 16)
NS_B = Namespace("model-b", "bfloat16", "nhd", 16)


def test_digest_binds_namespace_block_bytes_and_tenant() -> None:
    base = tier_namespace_digest(NS_A, BB, "t")
    assert len(base) == 16 and base == tier_namespace_digest(NS_A.digest, BB, "t")
    others = {
        tier_namespace_digest(NS_B, BB, "t"),
        tier_namespace_digest(NS_A, 2 * BB, "t"),
        tier_namespace_digest(NS_A, BB, "u"),
        tier_namespace_digest(None, BB, "t"),
    }
    assert base not in others and len(others) == 4
    for bad in (b"short", "model-a", 7):
        with pytest.raises(InvalidArgumentError, match="namespace"):
            tier_namespace_digest(bad, BB)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="block_bytes"):
        tier_namespace_digest(NS_A, 0)
    with pytest.raises(InvalidArgumentError, match="namespace"):
        BlockManager(KvbmConfig(block_bytes=BB, host_capacity_bytes=4 * BB), namespace="model-a")  # type: ignore[arg-type]


def _disk_cfg(path: str) -> KvbmConfig:
    return KvbmConfig(block_bytes=BB, host_capacity_bytes=4 * BB, disk_path=path, disk_capacity_bytes=64 * BB,
                      disk_o_direct=False)  # fmt: skip


def test_disk_blocks_are_found_only_under_their_namespace(tmp_path) -> None:
    hs = [os.urandom(16) for _ in range(8)]
    data = np.random.default_rng(1).integers(0, 256, (8, BB), np.uint8)
    with BlockManager(_disk_cfg(str(tmp_path)), namespace=NS_A) as m:
        m.store(hs[:4], data[:4])
        m.store(hs[4:], data[4:])  # the first 4 are demoted to disk
        m.evict(4)  # the rest too
        m.disk.flush()
    with BlockManager(_disk_cfg(str(tmp_path)), namespace=NS_B) as m:
        assert m.lookup(hs).num_hits == 0  # another namespace: a miss, nothing read
    with BlockManager(_disk_cfg(str(tmp_path)), namespace=NS_A) as m:
        r = m.lookup(hs)
        assert r.num_hits == 8 and all(r.tier_of(i) == Tier.DISK for i in range(8))
        out = np.empty_like(data)
        m.load(hs, out)
        np.testing.assert_array_equal(out, data)


def test_remote_blocks_are_shared_only_under_one_namespace() -> None:
    with StoreServer(ServeConfig(capacity_bytes=1 << 20, max_block_bytes=BB, token="tok")) as srv:
        cfg = KvbmConfig(block_bytes=BB, host_capacity_bytes=16 * BB, remote_url=srv.url, remote_token="tok")
        hs = [os.urandom(16) for _ in range(4)]
        data = np.random.default_rng(2).integers(0, 256, (4, BB), np.uint8)
        with BlockManager(cfg, namespace=NS_A) as a, BlockManager(cfg, namespace=NS_B) as b, \
                BlockManager(cfg, namespace=NS_A) as c:  # fmt: skip
            assert a.namespace_digest != b.namespace_digest and a.namespace_digest == c.namespace_digest
            a.store(hs, data)
            a.flush_remote(10)
            assert b.lookup(hs).num_hits == 0
            assert c.lookup(hs).num_hits == 4
            out = np.empty_like(data)
            c.load(hs, out)
            np.testing.assert_array_equal(out, data)
