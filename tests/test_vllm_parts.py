"""Unit tests of the vLLM connector's parts that need no vLLM: config, scheduler index, disk files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvbm.config import KvbmConfig
from kvbm.errors import ChecksumError, ConfigError, StorageIOError
from kvbm.integrations.vllm import disk
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.index import TierIndex


def test_config_maps_onto_kvbm_config() -> None:
    c = ConnectorConfig.from_extra_config({"host_capacity_bytes": "64MiB", "disk_path": "/tmp/x",
                                           "disk_capacity_bytes": "1GiB", "min_hit_blocks": 2})
    assert c.kvbm.host_capacity_bytes == 64 << 20 and c.kvbm.disk_capacity_bytes == 1 << 30
    assert c.disk_path == "/tmp/x" and c.min_hit_blocks == 2 and c.kvbm.disk_write_policy == "write_through"
    assert ConnectorConfig.from_extra_config(None).kvbm.host_capacity_bytes == 1 << 30
    assert ConnectorConfig.from_extra_config(None).async_load is True
    assert ConnectorConfig.from_extra_config({"async_load": False}).async_load is False


@pytest.mark.parametrize("extra,needle", [
    ({"hots_bytes": 1}, "'hots_bytes'"),
    ({"block_size": 32}, "'block_size'"),
    ({"host_capacity_bytes": "lots"}, "host_capacity_bytes"),
    ({"disk_path": "/tmp/x"}, "disk_capacity_bytes"),
    ({"min_hit_blocks": 0}, "'min_hit_blocks'"),
    ({"store_decode_blocks": "yes"}, "'store_decode_blocks'"),
    ({"async_load": 1}, "'async_load'"),
    ({"disk_write_policy": "write_behind"}, "'disk_write_policy'"),
    ({"hash_algorithm": "md5"}, "hash_algorithm"),
    ({"eviction_policy": "nope"}, "eviction_policy"),
])
def test_bad_config_names_the_key(extra: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ConnectorConfig.from_extra_config(extra)


def _h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _index(host_slots: int = 2, disk_blocks: int = 4, reporters: int = 1) -> TierIndex:
    return TierIndex(KvbmConfig(host_capacity_bytes=host_slots * 1024), 1024, disk_blocks, reporters)


def test_index_store_visible_only_after_every_rank_reports() -> None:
    ix = _index(reporters=2)
    assert ix.prepare_host(_h(1), None) is not None
    assert ix.lookup([_h(1)]) == []
    ix.complete_host(_h(1), 1, ok=True)
    assert ix.lookup([_h(1)]) == []  # one rank of two
    ix.complete_host(_h(1), 1, ok=True)
    assert ix.lookup([_h(1)]) == ["host"]


def test_index_failed_store_is_never_visible() -> None:
    ix = _index()
    ix.prepare_host(_h(1), None)
    ix.complete_host(_h(1), 1, ok=False)
    assert ix.lookup([_h(1)]) == [] and ix.has(_h(1)) == (False, False)


def test_index_host_block_pinned_while_written_to_disk() -> None:
    ix = _index(host_slots=1)
    deletes: list[bytes] = []
    assert ix.prepare_host(_h(1), None) == 0
    assert ix.prepare_disk(_h(1), None, deletes)
    ix.pin_for_disk_write(_h(1))
    ix.complete_host(_h(1), 1, ok=True)
    # The only host slot holds a block whose disk write is in flight: nothing is evictable.
    assert ix.prepare_host(_h(2), _h(1)) is None
    ix.complete_disk(_h(1), 1, ok=True)
    assert ix.lookup([_h(1)]) == ["host"]
    assert ix.prepare_host(_h(2), _h(1)) == 0  # now h1 can be evicted from host ...
    assert ix.lookup([_h(1)]) == ["disk"]  # ... and is still on disk
    assert ix.removed.host == [_h(1)]


def test_index_disk_eviction_reports_deletes_and_adoption() -> None:
    ix = _index(disk_blocks=2)
    deletes: list[bytes] = []
    for i in (1, 2, 3):
        assert ix.prepare_disk(_h(i), None, deletes)
        ix.complete_disk(_h(i), 1, ok=True)
    assert deletes == [_h(1)]
    assert ix.lookup([_h(2)]) == ["disk"] and ix.lookup([_h(1)]) == []
    fresh = _index(disk_blocks=2)
    assert fresh.adopt_disk([_h(1), _h(2), _h(3)]) == [_h(1)]
    assert fresh.lookup([_h(2)]) == ["disk"]
    fresh.drop(_h(2))
    assert fresh.lookup([_h(2)]) == []


def test_disk_block_roundtrip_and_corruption(tmp_path) -> None:
    ns = bytes(range(16))
    rdir = disk.rank_dir(str(tmp_path), ns)
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    path = disk.block_path(rdir, _h(7))
    disk.write_block(path, _h(7), ns, data)
    out = np.empty_like(data)
    disk.read_block(path, _h(7), ns, out)
    assert np.array_equal(out, data)
    assert disk.scan(str(tmp_path), [ns], data.nbytes) == [_h(7)]
    assert disk.scan(str(tmp_path), [ns, bytes(16)], data.nbytes) == []  # a rank is missing
    with pytest.raises(ChecksumError, match="namespace"):
        disk.read_block(path, _h(7), bytes(16), out)
    with open(path, "r+b") as f:
        f.seek(disk.HEADER_BYTES + 100)
        f.write(b"\xff\x00\xff")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        disk.read_block(path, _h(7), ns, out)
    disk.read_block(path, _h(7), ns, out, verify=False)  # verification off: bytes come back
    with pytest.raises(StorageIOError, match="missing"):
        disk.read_block(disk.block_path(rdir, _h(8)), _h(8), ns, out)


def test_disk_writer_writes_and_deletes_in_order(tmp_path) -> None:
    ns = bytes(16)
    slots = np.arange(4 * 64, dtype=np.uint8).reshape(4, 64)
    w = disk.DiskWriter(str(tmp_path), ns, lambda s: slots[s])
    w.write(_h(1), 2)
    w.write_buffer(_h(2), slots[3].copy())
    w.delete(_h(1))
    w.flush()
    written, failed = w.drain()
    assert written == [_h(1), _h(2)] and failed == []
    assert not os.path.exists(disk.block_path(str(tmp_path), _h(1)))
    out = np.empty(64, np.uint8)
    disk.read_block(disk.block_path(str(tmp_path), _h(2)), _h(2), ns, out)
    assert np.array_equal(out, slots[3])
