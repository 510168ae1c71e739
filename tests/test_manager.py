"""BlockManager: the Python façade over the index and the host arena."""

from __future__ import annotations

import os

import numpy as np
import pytest

import kvbm
from kvbm import BlockManager, KvbmConfig, Tier
from kvbm.errors import BlockNotFoundError, CapacityError, ConfigError, InvalidArgumentError

BB = 4096


def mgr(blocks: int = 8, **kw) -> BlockManager:
    return BlockManager(KvbmConfig(block_bytes=BB, host_capacity_bytes=BB * blocks, **kw))


def rand_blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, BB), dtype=np.uint8)


def chain(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def test_round_trip_array_and_list_buffers() -> None:
    m = mgr()
    hs = chain(5)
    data = rand_blocks(5)
    assert m.store(hs, data) == 5
    assert m.store(hs, data) == 0  # already present
    out = np.full_like(data, 0xAB)  # poisoned
    m.load(hs, out)
    assert np.array_equal(out, data)
    rows = [bytearray(BB) for _ in range(2)]
    m.load(hs[3:], rows)
    assert bytes(rows[1]) == data[4].tobytes()
    res = m.lookup(hs + chain(1))
    assert res.num_hits == 5 and res.tier_of(0) is Tier.HOST and res.tier_of(5) is None
    assert m.contains(hs[2]) is Tier.HOST


def test_capacity_and_eviction_stats() -> None:
    m = mgr(blocks=4)
    for i in range(3):
        m.store(chain(2), rand_blocks(2, i))
    s = m.stats()["host"]
    assert s["used_blocks"] == 4 and s["capacity_blocks"] == 4
    assert s["evictions"] == 2 and s["stores"] == 6
    assert s["used_bytes"] <= s["capacity_bytes"]
    assert len(m.evict(10)) == 4
    assert m.stats()["host"]["used_blocks"] == 0


def test_bad_buffers_leave_no_partial_state() -> None:
    m = mgr()
    hs = chain(3)
    with pytest.raises(InvalidArgumentError, match="expected 12288"):
        m.store(hs, np.zeros((3, BB - 1), np.uint8))
    assert m.lookup(hs).num_hits == 0
    assert m.stats()["host"]["used_blocks"] == 0
    with pytest.raises(InvalidArgumentError, match="buffer"):
        m.store(hs, "not a buffer")
    with pytest.raises(InvalidArgumentError, match="3 buffers|buffers for"):
        m.store(hs, [bytes(BB)] * 2)
    m.store(hs, rand_blocks(3))
    with pytest.raises(InvalidArgumentError, match="writable"):
        m.load(hs, bytes(3 * BB))
    with pytest.raises(BlockNotFoundError):
        m.load(chain(1), np.zeros((1, BB), np.uint8))
    m.index.validate()


def test_pinned_blocks_survive_pressure() -> None:
    m = mgr(blocks=2)
    hs = chain(2)
    m.store(hs, rand_blocks(2))
    m.prepare_load(hs)
    with pytest.raises(CapacityError):
        m.store(chain(1), rand_blocks(1))
    m.complete_load(hs)
    m.store(chain(1), rand_blocks(1))


def test_bookkeeping_only_manager() -> None:
    m = BlockManager(KvbmConfig(block_bytes=BB, host_capacity_bytes=BB * 4), allocate_memory=False)
    assert m.host_arena is None
    plan = m.prepare_store(chain(2))
    assert (plan.slots >= 0).all()
    with pytest.raises(InvalidArgumentError, match="bookkeeping-only"):
        m.store(chain(1), rand_blocks(1))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="block_bytes"):
        BlockManager(KvbmConfig())
    with pytest.raises(ConfigError, match="host_capacity_bytes"):
        BlockManager(KvbmConfig(block_bytes=BB, host_capacity_bytes=BB - 1))
    with pytest.raises(ConfigError, match="block_size"):
        KvbmConfig(block_size=0)
    with pytest.raises(ConfigError, match="host_capacity_bytes"):
        KvbmConfig(host_capacity_bytes=0)
    with pytest.raises(ConfigError, match="eviction_policy"):
        KvbmConfig(eviction_policy="random-ish")


def test_host_arena_is_pageable_without_gpu() -> None:
    m = mgr()
    if not kvbm.build_info()["cuda_available"]:
        assert m.host_arena.pinned is False
        with pytest.raises((kvbm.errors.CudaUnavailableError, kvbm.errors.CudaError)):
            BlockManager(KvbmConfig(block_bytes=BB, host_capacity_bytes=BB, host_pinned=True))


def test_arena_views_and_addresses() -> None:
    m = mgr()
    hs = chain(1)
    data = rand_blocks(1)
    m.store(hs, data)
    slot = int(m.prepare_load(hs)[0])
    try:
        view = m.host_arena.view(slot)
        assert np.array_equal(view, data[0])
        assert m.host_arena.addresses([slot])[0] == m.host_arena.address(slot)
    finally:
        m.complete_load(hs)
    with pytest.raises(kvbm.errors.OutOfRangeError):
        m.host_arena.address(10_000)
