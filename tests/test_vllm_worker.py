"""The worker half's byte moving against real-shaped vLLM KV tensors (no engine): stores copy whole
blocks into host slots and loads bring them back bit-exact, for CPU-style views into one buffer
and for a non-default stride order."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]


def _worker(tmp_path, kv: dict, num_blocks: int, slot_bytes: int, disk: bool):
    from kvbm.hashing import Namespace
    from kvbm.integrations.vllm.common import Geometry
    from kvbm.integrations.vllm.config import ConnectorConfig
    from kvbm.integrations.vllm.worker import KvbmWorker

    extra = {"host_capacity_bytes": 8 * slot_bytes}
    if disk:
        extra.update(disk_path=str(tmp_path / "kv"), disk_capacity_bytes=64 * slot_bytes)
    cfg = ConnectorConfig.from_extra_config(extra)
    geo = Geometry(block_size=32, slot_bytes=slot_bytes, num_host_slots=8, disk_capacity_blocks=64 if disk else 0,
                   tp_world=1, namespace=Namespace(model_id="t", dtype="bfloat16", kv_layout="x", block_size=32))
    w = KvbmWorker(cfg, geo, num_blocks)
    w.register_kv_caches(kv)
    return w


@pytest.mark.parametrize("order", ["cpu_views", "permuted"])
def test_store_then_load_is_bit_exact(tmp_path, order: str) -> None:
    import torch

    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp

    nb, heads, bs, hd2, layers = 16, 2, 32, 64, 3
    if order == "cpu_views":  # all layers views into one buffer, layer-major (what vLLM CPU hands over)
        buf = torch.randn(layers, nb, heads, bs, hd2).to(torch.bfloat16)
        kv = {f"l{i}": buf[i] for i in range(layers)}
    else:  # same logical shape, blocks not outermost in memory
        kv = {f"l{i}": torch.randn(heads, nb, bs, hd2).to(torch.bfloat16).permute(1, 0, 2, 3) for i in range(layers)}
    slot_bytes = layers * heads * bs * hd2 * 2
    w = _worker(tmp_path, kv, nb, slot_bytes, disk=True)
    ref = {k: v.clone() for k, v in kv.items()}
    h = [bytes([i]) * 16 for i in range(3)]
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(3, 0, h[0], True, disk_slot=4),
                                                  StoreOp(7, 5, h[1], True, disk_slot=0),
                                                  StoreOp(9, -1, h[2], True, disk_slot=63)]))
    w.disk.wait_all()
    meta = w.build_worker_meta()
    assert meta is not None and sorted(meta.stored) == sorted(h[:2]) and sorted(meta.disk_written) == sorted(h)
    crc = {x: (meta.disk_crcs[x][0],) for x in h}  # rank 0's shard CRC32C, as the catalog will hold it
    for t in kv.values():
        t.zero_()
    w.start_load_kv(KvbmConnectorMetadata(loads=[LoadOp(11, "host", 5, h[1]),
                                                 LoadOp(12, "disk", 4, h[0], crcs=crc[h[0]]),
                                                 LoadOp(13, "disk", 63, h[2], crcs=crc[h[2]])]))
    assert w.get_block_ids_with_load_errors() == set()
    for k in kv:
        assert torch.equal(kv[k][11], ref[k][7])
        assert torch.equal(kv[k][12], ref[k][3])
        assert torch.equal(kv[k][13], ref[k][9])
        assert torch.count_nonzero(kv[k][0]) == 0  # nothing else written
    # The slab file holds the shard at the slot's offset; a wrong expected CRC is a load error.
    w.start_load_kv(KvbmConnectorMetadata(loads=[LoadOp(14, "disk", 4, h[0], crcs=(crc[h[0]][0] ^ 1,))]))
    assert w.get_block_ids_with_load_errors() == {14}
    meta = w.build_worker_meta()
    assert meta is not None and list(meta.load_failed) == list(meta.load_corrupt) == [h[0]]
    w.shutdown()


def test_async_loads_are_reported_through_get_finished(tmp_path) -> None:
    """Asynchronous loads (host + disk) run on the worker's load thread; the request is reported by
    ``get_finished`` once, the bytes are exact, and a block failing its checksum is reported as a
    load error in the same step; a store into a host slot still being read waits for the load."""
    import os
    import time

    import torch

    from kvbm.integrations.vllm.disk import disk_slot_bytes
    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp

    nb, heads, bs, hd2, layers = 16, 2, 32, 64, 2
    buf = torch.randn(layers, nb, heads, bs, hd2).to(torch.bfloat16)
    kv = {f"l{i}": buf[i] for i in range(layers)}
    slot_bytes = layers * heads * bs * hd2 * 2
    w = _worker(tmp_path, kv, nb, slot_bytes, disk=True)
    ref = {k: v.clone() for k, v in kv.items()}
    h = [bytes([i + 1]) * 16 for i in range(3)]
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(1, 0, h[0], True, disk_slot=0),
                                                  StoreOp(2, 1, h[1], True, disk_slot=1),
                                                  StoreOp(3, 2, h[2], True, disk_slot=2)]))
    w.disk.wait_all()
    crc = {x: (c[0],) for x, c in w.build_worker_meta().disk_crcs.items()}
    with open(os.path.join(w.rdir, "slab-00000.kvbm"), "r+b") as f:  # flip bytes of disk slot 2
        off = 2 * disk_slot_bytes(slot_bytes) + slot_bytes - 64
        f.seek(off)
        flipped = bytes(b ^ 0xFF for b in f.read(64))
        f.seek(off)
        f.write(flipped)
    for t in kv.values():
        t.zero_()
    w.start_load_kv(KvbmConnectorMetadata(loads=[
        LoadOp(10, "host", 0, h[0], "a", True), LoadOp(11, "disk", 1, h[1], "a", True, crc[h[1]]),
        LoadOp(12, "disk", 2, h[2], "b", True, crc[h[2]])]))
    # A store into slot 0 (being read by the load) must not overwrite it before the load copied it.
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(5, 0, b"\x09" * 16, False)]))
    done: set[str] = set()
    deadline = time.time() + 30
    while done != {"a", "b"}:
        assert time.time() < deadline, "asynchronous loads never reported finished"
        done |= w.get_finished()
        time.sleep(0.01)
    assert w.get_block_ids_with_load_errors() == {12}
    assert w.get_finished() == set()  # reported once
    for k in kv:
        assert torch.equal(kv[k][10], ref[k][1])
        assert torch.equal(kv[k][11], ref[k][2])
    meta = w.build_worker_meta()
    assert meta is not None and list(meta.load_failed) == [h[2]]
    assert w.async_loads_done == 1
    w.shutdown()


@pytest.mark.parametrize("is_async", [True, False])
def test_store_into_a_slot_read_by_a_load_of_the_same_step_lands_after_the_load(tmp_path, is_async: bool) -> None:
    """One step's plan loads block X from host slot 0 and stores a new block into slot 0 (the
    scheduler evicted X for it): the load gets X's bytes, the slot ends up with the new block.
    On the CPU platform save_kv_layer and wait_for_layer_load are no-ops (whole blocks)."""
    import time

    import torch

    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp

    nb, heads, bs, hd2, layers = 16, 2, 32, 64, 2
    buf = torch.randn(layers, nb, heads, bs, hd2).to(torch.bfloat16)
    kv = {f"l{i}": buf[i] for i in range(layers)}
    w = _worker(tmp_path, kv, nb, layers * heads * bs * hd2 * 2, disk=False)
    assert not w.layerwise
    x = b"\x01" * 16
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(1, 0, x, False)]))
    ref = buf.clone()
    meta = KvbmConnectorMetadata(loads=[LoadOp(10, "host", 0, x, "a", is_async)],
                                 stores=[StoreOp(2, 0, b"\x02" * 16, False, "b")])
    w.start_load_kv(meta)
    for name in kv:
        w.wait_for_layer_load(name)
        w.save_kv_layer(name, meta)
    w.wait_for_save(meta)
    deadline = time.time() + 30
    while is_async and not w.get_finished():
        assert time.time() < deadline
        time.sleep(0.01)
    assert torch.equal(buf[:, 10], ref[:, 1])
    assert np.array_equal(w.arena[0].numpy(), np.concatenate([buf[i, 2].reshape(-1).view(torch.uint8).numpy()
                                                              for i in range(layers)]))
    w.shutdown()


def test_layerwise_setting_is_validated() -> None:
    from kvbm.errors import ConfigError
    from kvbm.integrations.vllm.config import ConnectorConfig

    assert ConnectorConfig.from_extra_config(None).layerwise is True
    assert ConnectorConfig.from_extra_config({"layerwise": False}).layerwise is False
    with pytest.raises(ConfigError, match="'layerwise'"):
        ConnectorConfig.from_extra_config({"layerwise": "yes"})


def test_drain_waits_for_asynchronous_loads_and_keeps_their_report(tmp_path) -> None:
    """``drain`` (vLLM 0.33's ``unregister_kv_caches`` before sleep mode) returns once no copy
    touches vLLM's blocks; the drained load is still reported by the next ``get_finished``."""
    import torch

    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp

    nb, heads, bs, hd2, layers = 16, 2, 32, 64, 2
    kv = {f"l{i}": torch.randn(nb, heads, bs, hd2).to(torch.bfloat16) for i in range(layers)}
    w = _worker(tmp_path, kv, nb, layers * heads * bs * hd2 * 2, disk=True)
    h = [bytes([i + 1]) * 16 for i in range(4)]
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(i, i, h[i], True, disk_slot=i) for i in range(4)]))
    assert w.drain()  # disk writes done
    meta = w.build_worker_meta()
    assert meta is not None and sorted(meta.disk_written) == sorted(h)
    ref = {k: v[:4].clone() for k, v in kv.items()}
    w.start_load_kv(KvbmConnectorMetadata(loads=[
        LoadOp(8 + i, "disk", i, h[i], "r", True, crcs=(meta.disk_crcs[h[i]][0],)) if i % 2
        else LoadOp(8 + i, "host", i, h[i], "r", True) for i in range(4)]))
    assert w.drain(timeout=30)
    assert not w._jobs or all(job.poll() for job in w._jobs)
    for k in kv:
        assert torch.equal(kv[k][8:12], ref[k])
    assert w.get_finished() == {"r"}
    assert w.get_block_ids_with_load_errors() == set()
    w.shutdown()


def _step_async_loads_after_forward(w, kv, meta) -> None:
    """One vLLM step without synchronous loads, as vLLM's model runner orders it: the forward
    (save_kv_layer per layer), then start_load_kv (asynchronous loads start after the forward),
    then wait_for_save."""
    for name in kv:
        w.wait_for_layer_load(name)
        w.save_kv_layer(name, meta)
    w.start_load_kv(meta)
    w.wait_for_save(meta)


@pytest.mark.parametrize("layerwise", [False, True])
def test_disk_slot_read_by_an_async_load_started_after_the_forward_is_written_after_it(
        tmp_path, monkeypatch, layerwise: bool) -> None:
    """The scheduler hands out disk slots whose blocks an asynchronous load of the same step still
    reads (disk eviction does not pin loads): slot 3 to a write-behind demotion, slot 4 to a
    write-through store. vLLM starts a step's asynchronous loads after the forward, i.e. after
    save_kv_layer planned the step's saves; the disk writes must still wait for those loads.
    layerwise=True drives the CUDA call sequence (plan at the first save_kv_layer) on the host."""
    import time

    import torch

    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp

    nb, heads, bs, hd2, layers = 16, 2, 32, 64, 2
    buf = torch.randn(layers, nb, heads, bs, hd2).to(torch.bfloat16)
    kv = {f"l{i}": buf[i] for i in range(layers)}
    w = _worker(tmp_path, kv, nb, layers * heads * bs * hd2 * 2, disk=True)
    if layerwise:
        w.layerwise = True
        w.layer_copy_method = w.copy_method  # host path: whole-layer copies without the CUDA method
    a, c, x, y = (bytes([i]) * 16 for i in (0xA1, 0xA2, 0xA3, 0xA4))
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(1, 0, a, True, disk_slot=3),
                                                  StoreOp(2, 1, c, True, disk_slot=4),
                                                  StoreOp(3, 2, x, False)]))
    w.disk.wait_all()
    crc = {h: (v[0],) for h, v in w.build_worker_meta().disk_crcs.items()}
    ref = buf.clone()
    slow_read = w._read_disk

    def read_late(ops, rows):  # the load thread reads after the step's saves were issued
        time.sleep(0.5)
        return slow_read(ops, rows)

    monkeypatch.setattr(w, "_read_disk", read_late)
    meta = KvbmConnectorMetadata(
        loads=[LoadOp(10, "disk", 3, a, "r", True, crc[a]), LoadOp(11, "disk", 4, c, "r", True, crc[c])],
        stores=[StoreOp(4, 5, y, True, "s", disk_slot=4)],
        demotes=[StoreOp(-1, 2, x, True, disk_slot=3)])
    _step_async_loads_after_forward(w, kv, meta)
    deadline = time.time() + 30
    while not w.get_finished():
        assert time.time() < deadline, "asynchronous load never reported finished"
        time.sleep(0.01)
    assert w.get_block_ids_with_load_errors() == set()
    assert torch.equal(buf[:, 10], ref[:, 1]) and torch.equal(buf[:, 11], ref[:, 2])
    # The slots then hold the new blocks: demoted x (host slot 2) in 3, stored y in 4.
    w.disk.wait_all()
    m = w.build_worker_meta()
    assert m is not None and sorted(m.disk_written) == sorted([x, y]) and not m.disk_failed
    monkeypatch.setattr(w, "_read_disk", slow_read)
    w.start_load_kv(KvbmConnectorMetadata(loads=[LoadOp(12, "disk", 3, x, crcs=(m.disk_crcs[x][0],)),
                                                 LoadOp(13, "disk", 4, y, crcs=(m.disk_crcs[y][0],))]))
    assert w.get_block_ids_with_load_errors() == set()
    assert torch.equal(buf[:, 12], ref[:, 3]) and torch.equal(buf[:, 13], ref[:, 4])
    w.shutdown()


@pytest.mark.parametrize("layerwise", [False, True])
def test_write_behind_demotion_reaches_its_disk_slot_before_the_host_slot_is_reused(tmp_path, layerwise: bool) -> None:
    """``disk_write_policy: write_behind``: the scheduler evicted the blocks in host slots 0 and 1
    and, in the same step's plan, demotes them to disk slots 7 and 2 and stores new blocks into
    both host slots. Each demoted block's bytes (not the new ones) land in its own disk slot, the
    host slots end up with the new blocks, and the write is reported with the shard's CRC32C. A
    step with demotions and no stores writes them too."""
    import torch

    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp

    nb, heads, bs, hd2, layers = 16, 2, 32, 64, 2
    buf = torch.randn(layers, nb, heads, bs, hd2).to(torch.bfloat16)
    kv = {f"l{i}": buf[i] for i in range(layers)}
    w = _worker(tmp_path, kv, nb, layers * heads * bs * hd2 * 2, disk=True)
    if layerwise:
        w.layerwise = True
        w.layer_copy_method = w.copy_method
    ref = buf.clone()

    def block_bytes(block_id: int) -> np.ndarray:
        return np.concatenate([ref[i, block_id].reshape(-1).view(torch.uint8).numpy() for i in range(layers)])

    x0, x1, y0, y1, z = (bytes([i]) * 16 for i in (0xB0, 0xB1, 0xC0, 0xC1, 0xD0))
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(1, 0, x0, False), StoreOp(2, 1, x1, False),
                                                  StoreOp(3, 4, z, False)]))
    assert w.build_worker_meta() is not None
    meta = KvbmConnectorMetadata(stores=[StoreOp(5, 0, y0, False, "r"), StoreOp(6, 1, y1, False, "r")],
                                 demotes=[StoreOp(-1, 0, x0, True, disk_slot=7), StoreOp(-1, 1, x1, True, disk_slot=2)])
    for name in kv:
        w.save_kv_layer(name, meta)
    w.wait_for_save(meta)
    assert np.array_equal(w.arena[0].numpy(), block_bytes(5)) and np.array_equal(w.arena[1].numpy(), block_bytes(6))
    w.disk.wait_all()
    m = w.build_worker_meta()
    assert m is not None and sorted(m.disk_written) == sorted([x0, x1]) and not m.disk_failed
    assert sorted(m.stored) == sorted([y0, y1])
    # Demotions alone (no stores this step): host slot 4 -> disk slot 9.
    w.wait_for_save(KvbmConnectorMetadata(demotes=[StoreOp(-1, 4, z, True, disk_slot=9)]))
    w.disk.wait_all()
    m2 = w.build_worker_meta()
    assert m2 is not None and list(m2.disk_written) == [z]
    for t in kv.values():
        t.zero_()
    w.start_load_kv(KvbmConnectorMetadata(loads=[LoadOp(10, "disk", 7, x0, crcs=(m.disk_crcs[x0][0],)),
                                                 LoadOp(11, "disk", 2, x1, crcs=(m.disk_crcs[x1][0],)),
                                                 LoadOp(12, "disk", 9, z, crcs=(m2.disk_crcs[z][0],))]))
    assert w.get_block_ids_with_load_errors() == set()
    assert torch.equal(buf[:, 10], ref[:, 1]) and torch.equal(buf[:, 11], ref[:, 2])
    assert torch.equal(buf[:, 12], ref[:, 3])
    w.shutdown()
