"""BlockManager.offload/onboard between engine-shaped paged KV and the host tier (host path on
CPU; the CUDA path runs in tests/test_kv_copy_gpu.py and the GPU check script)."""

from __future__ import annotations

import numpy as np
import pytest

import kvbm
from kvbm import BlockManager, KvbmConfig, Tier
from kvbm.errors import BlockNotFoundError, InvalidArgumentError
from kvbm.kv_layout import KvLayout

LAYERS, BLOCKS, HEADS, BS, HEAD = 3, 12, 2, 16, 32


def engine_kv(seed: int) -> list[np.ndarray]:
    # vLLM's per-layer view [num_blocks, num_kv_heads, block_size, 2*head_size]; fp16 as uint16 bits
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1 << 16, (BLOCKS, HEADS, BS, 2 * HEAD), dtype=np.uint16) for _ in range(LAYERS)]


def test_offload_then_onboard_into_other_blocks_is_byte_exact() -> None:
    src = engine_kv(1)
    layout = KvLayout.from_tensors(src, kind="vllm", dtype="float16")
    ns = kvbm.Namespace("m", "fp16", "NHD", BS)
    hashes = kvbm.block_hashes(np.arange(5 * BS), BS, ns)
    m = BlockManager(KvbmConfig(block_bytes=layout.block_bytes, host_capacity_bytes=layout.block_bytes * 8))
    src_ids = [7, 2, 9, 0, 4]
    h = m.offload(layout, src_ids, hashes)
    assert h.num_blocks == 5
    assert h.wait(10)
    assert m.lookup(hashes).num_hits == 5
    again = m.offload(layout, src_ids, hashes)
    assert again.num_blocks == 0 and again.wait()

    dst = engine_kv(2)
    dst_layout = KvLayout.from_tensors(dst, kind="vllm", dtype="float16")
    dst_ids = [1, 3, 5, 6, 11]
    assert m.onboard(dst_layout, dst_ids, hashes).wait(10)
    for layer in range(LAYERS):
        assert np.array_equal(dst[layer][dst_ids], src[layer][src_ids])
    assert m.stats()["host"]["pinned_blocks"] == 0
    m.index.validate()


def test_engine_path_errors() -> None:
    src = engine_kv(3)
    layout = KvLayout.from_tensors(src, kind="vllm", dtype="float16")
    m = BlockManager(KvbmConfig(block_bytes=layout.block_bytes, host_capacity_bytes=layout.block_bytes * 4))
    hashes = [bytes([i]) * 16 for i in range(2)]
    with pytest.raises(InvalidArgumentError, match="block ids for"):
        m.offload(layout, [0], hashes)
    with pytest.raises(kvbm.errors.OutOfRangeError):
        m.offload(layout, [0, BLOCKS], hashes)
    assert m.lookup(hashes).num_hits == 0 and m.stats()["host"]["used_blocks"] == 0
    with pytest.raises(BlockNotFoundError):
        m.onboard(layout, [0, 1], hashes)
    other = BlockManager(KvbmConfig(block_bytes=layout.block_bytes * 2, host_capacity_bytes=layout.block_bytes * 4))
    with pytest.raises(InvalidArgumentError, match="block_bytes"):
        other.offload(layout, [0, 1], hashes)
    assert m.contains(hashes[0]) is None and Tier.HOST == 1
