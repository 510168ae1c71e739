"""The vLLM connector's worker on CUDA, without vLLM (the GPU machine has none): ``KvbmWorker`` on real
torch CUDA tensors in vLLM 0.32's CUDA layout (per-layer views ``[num_blocks, num_kv_heads, block_size,
2*head_size]`` of one allocation), driven through a simulated forward that calls the hooks in vLLM's
order for every layer: ``wait_for_layer_load`` -> an "attention" (a real matmul on the current stream
that reads the layer's loaded blocks and writes the layer's KV of new blocks) -> ``save_kv_layer``;
then ``wait_for_save``. Checks byte-exact loads and saves, that layer i's load event gates layer i
only, asynchronous loads polled without waiting, and the host-slot ordering rules.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvbm import _native

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_native.cuda_available() and torch.cuda.is_available()),
                       reason="needs a CUDA GPU and a CUDA build of kvbm (KVBM_CUDA=ON)"),
]


def make_worker(tmp_path, layers: int, num_blocks: int, heads: int, bs: int, hd: int, slots: int,
                layerwise: bool = True, disk: bool = False):
    """(worker, kv dict, one backing buffer): a KvbmWorker with registered CUDA KV tensors."""
    from kvbm.hashing import Namespace
    from kvbm.integrations.vllm.common import Geometry
    from kvbm.integrations.vllm.config import ConnectorConfig
    from kvbm.integrations.vllm.worker import KvbmWorker

    slot_bytes = layers * heads * bs * 2 * hd * 2
    buf = torch.empty((layers, num_blocks, heads, bs, 2 * hd), dtype=torch.bfloat16, device="cuda")
    buf.normal_()
    kv = {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(layers)}
    extra = {"host_capacity_bytes": slots * slot_bytes, "layerwise": layerwise}
    if disk:
        extra.update(disk_path=str(tmp_path / "kv"), disk_capacity_bytes=4 * slots * slot_bytes)
    cfg = ConnectorConfig.from_extra_config(extra)
    geo = Geometry(block_size=bs, slot_bytes=slot_bytes, num_host_slots=slots,
                   disk_capacity_blocks=4 * slots if disk else 0, tp_world=1,
                   namespace=Namespace(model_id="gpu-test", dtype="bfloat16", kv_layout="vllm", block_size=bs))
    w = KvbmWorker(cfg, geo, num_blocks)
    w.register_kv_caches(kv)
    return w, kv, buf


def fill_slots(w, slots: list[int]) -> None:
    """Valid random bf16 values (no NaN) in host slots."""
    n = w.arena.shape[1] // 2
    for s in slots:
        w.arena[s].view(torch.bfloat16).copy_(torch.randn(n).to(torch.bfloat16))


def block_bytes(buf, layer: int, block: int):
    return buf[layer, block].reshape(-1).view(torch.uint8)


def slot_layer(w, slot: int, layer: int):
    off, n = w.layout.layer_offsets[layer], w.layout.layer_bytes[layer]
    return w.arena[slot, off:off + n]


def attention(kvl, load_ids, save_ids, weight, delay_cycles: int = 0):
    """Reads the loaded blocks of one layer, writes that layer's KV of the new blocks (current stream)."""
    if delay_cycles:
        torch.cuda._sleep(delay_cycles)  # a slow layer: a save not ordered after it would read stale KV
    x = kvl[load_ids].float().reshape(-1, kvl.shape[-1])
    y = (x @ weight).to(torch.bfloat16).reshape(len(save_ids), *kvl.shape[1:])
    kvl[save_ids] = y
    return y


def forward(w, kv, meta, load_ids, save_ids, weight, delay_cycles=0, after_layer=None):
    """One step in vLLM's order: start_load_kv, per layer wait -> attention -> save, wait_for_save."""
    w.start_load_kv(meta)
    outs = []
    for i, (name, kvl) in enumerate(kv.items()):
        w.wait_for_layer_load(name)
        outs.append(attention(kvl, load_ids, save_ids, weight, delay_cycles))
        if after_layer is not None:
            after_layer(i)
        w.save_kv_layer(name, meta)
    w.wait_for_save(meta)
    return outs


@pytest.mark.parametrize("layerwise", [True, False])
def test_sync_loads_and_saves_in_a_forward_are_byte_exact(tmp_path, layerwise: bool) -> None:
    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp

    L, NB, H, BS, HD, K = 8, 64, 4, 16, 64, 12
    w, kv, buf = make_worker(tmp_path, L, NB, H, BS, HD, slots=2 * K + 4, layerwise=layerwise)
    assert w.layerwise is layerwise
    rng = np.random.default_rng(1)
    ids = rng.permutation(NB)[:2 * K]
    load_ids, save_ids = [int(b) for b in ids[:K]], [int(b) for b in ids[K:]]
    load_slots = list(range(K))
    save_slots = list(range(K, 2 * K))
    fill_slots(w, load_slots)
    buf.view(torch.int16)[:, torch.as_tensor(ids, device="cuda")] = 0x7BAD  # poison every block the step touches
    meta = KvbmConnectorMetadata(
        loads=[LoadOp(b, "host", s, bytes([i]) * 16, "r0") for i, (b, s) in enumerate(zip(load_ids, load_slots))],
        stores=[StoreOp(b, s, bytes([100 + i]) * 16, False, "r1")
                for i, (b, s) in enumerate(zip(save_ids, save_slots))])
    weight = torch.randn(2 * HD, 2 * HD, device="cuda") / (2 * HD) ** 0.5
    lt, st = torch.tensor(load_ids, device="cuda"), torch.tensor(save_ids, device="cuda")
    outs = forward(w, kv, meta, lt, st, weight, delay_cycles=2_000_000)
    torch.cuda.synchronize()
    for layer in range(L):
        for b, s in zip(load_ids, load_slots):  # loads: the block's layer bytes are the slot's
            assert torch.equal(block_bytes(buf, layer, b).cpu(), slot_layer(w, s, layer)), (layer, b)
        # the attention read fully loaded data: recomputing from the (now final) blocks gives its bits
        ref = attention(kv[list(kv)[layer]].clone(), lt, st, weight)
        assert torch.equal(outs[layer].view(torch.int16), ref.view(torch.int16)), f"layer {layer} read early"
        for b, s in zip(save_ids, save_slots):  # saves: the slot holds what the attention wrote
            assert torch.equal(slot_layer(w, s, layer), block_bytes(buf, layer, b).cpu()), (layer, b)
    meta_out = w.build_worker_meta()
    assert meta_out is not None and len(meta_out.stored) == K and meta_out.load_bytes == K * w.geo.slot_bytes
    assert w.get_block_ids_with_load_errors() == set()
    w.shutdown()


def test_layer_i_load_event_gates_layer_i_only(tmp_path) -> None:
    """With a large load (hundreds of MiB, held back until all of it is queued), layer 0's
    attention runs long before the last layer has arrived: the forward waits per layer, not for
    the whole load. Whole-block mode, or a forward vLLM runs without the hooks (hooks_run=False:
    a full CUDA graph replay), same load: layer 0 cannot finish before everything arrived."""
    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp

    L, H, BS, HD, K = 32, 8, 16, 128, 160  # 2 MiB blocks, 320 MiB loaded
    NB = K + 8
    for layerwise, hooks_run in ((True, True), (False, True), (True, False)):
        w, kv, buf = make_worker(tmp_path, L, NB, H, BS, HD, slots=K, layerwise=layerwise)
        fill_slots(w, list(range(K)))
        meta = KvbmConnectorMetadata(loads=[LoadOp(b, "host", b, bytes([b % 256]) * 16, "r") for b in range(K)])
        lt = torch.arange(K, device="cuda")
        names = list(kv)
        # warm-up step: one-time set-up (chunk tables per layer range, staging pool) happens here
        w.start_load_kv(meta)
        for name in names:
            w.wait_for_layer_load(name)
        w.wait_for_save(KvbmConnectorMetadata())
        torch.cuda.synchronize()
        buf.view(torch.int16)[:, :K] = 0x7BAD
        with torch.cuda.stream(w._load_stream):  # hold the load stream until everything is queued
            torch.cuda._sleep(200_000_000)
        w.start_load_kv(meta, hooks_run=hooks_run)
        if hooks_run:
            w.wait_for_layer_load(names[0])
        first = torch.cuda.Event()
        x = kv[names[0]][lt[:4]].float().sum()  # layer 0's "attention"
        first.record()
        for name in names[1:] if hooks_run else []:
            w.wait_for_layer_load(name)
        last_load = w._load_events[-1]
        while not first.query():
            pass
        all_loaded_when_layer0_done = last_load.query()
        w.wait_for_save(KvbmConnectorMetadata())
        torch.cuda.synchronize()
        for layer in (0, L // 2, L - 1):
            for b in (0, K // 2, K - 1):
                assert torch.equal(block_bytes(buf, layer, b).cpu(), slot_layer(w, b, layer))
        assert torch.isfinite(x)
        if layerwise and hooks_run:
            assert not all_loaded_when_layer0_done, "layer 0 waited for the whole load"
        else:
            assert all_loaded_when_layer0_done, (layerwise, hooks_run)
        w.shutdown()
        del w, kv, buf
        torch.cuda.empty_cache()


def test_async_loads_are_polled_not_waited_and_slots_are_not_overwritten_early(tmp_path) -> None:
    """CUDA asynchronous loads (host + disk, one corrupt disk block) queue on the load stream and
    return at once; get_finished never blocks and reports each request once, when its copies are
    done; a store into a host slot an in-flight load reads waits for it (on the GPU)."""
    import os

    from kvbm.integrations.vllm.disk import disk_slot_bytes
    from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, LoadOp, StoreOp

    L, NB, H, BS, HD = 4, 32, 2, 16, 64
    w, kv, buf = make_worker(tmp_path, L, NB, H, BS, HD, slots=8, disk=True)
    h = [bytes([i + 1]) * 16 for i in range(3)]
    # blocks 1, 2, 3 -> slots 0, 1, 2, written through to disk
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(1, 0, h[0], True, disk_slot=0),
                                                  StoreOp(2, 1, h[1], True, disk_slot=1),
                                                  StoreOp(3, 2, h[2], True, disk_slot=2)]))
    w.disk.wait_all()
    crc = {x: (c[0],) for x, c in w.build_worker_meta().disk_crcs.items()}
    ref = buf.clone()
    slot_bytes = w.geo.slot_bytes
    with open(os.path.join(w.rdir, "slab-00000.kvbm"), "r+b") as f:  # flip bytes of disk slot 2
        off = 2 * disk_slot_bytes(slot_bytes) + slot_bytes - 64
        f.seek(off)
        flipped = bytes(b ^ 0xFF for b in f.read(64))
        f.seek(off)
        f.write(flipped)
    # warm-up: one asynchronous load (one-time set-up of the copy path happens here, not below)
    w.start_load_kv(KvbmConnectorMetadata(loads=[LoadOp(20, "host", 1, h[1], "w", True)]))
    deadline = time.time() + 30
    while w.get_finished() != {"w"}:
        assert time.time() < deadline
        time.sleep(0.005)
    w.build_worker_meta()
    buf.view(torch.int16)[:, 10:13].fill_(0x7BAD)
    # Hold kvbm's asynchronous load stream (as a long copy would) so the loads are still in flight
    # below. (Asynchronous loads run on _async_stream, not on _load_stream: holding the latter held
    # nothing, and the store into slot 0 below was not ordered against anything in flight.)
    with torch.cuda.stream(w._async_stream):
        torch.cuda._sleep(400_000_000)  # a few hundred ms
    t0 = time.perf_counter()
    w.start_load_kv(KvbmConnectorMetadata(loads=[
        LoadOp(10, "host", 0, h[0], "a", True), LoadOp(11, "disk", 1, h[1], "a", True, crc[h[1]]),
        LoadOp(12, "disk", 2, h[2], "b", True, crc[h[2]])]))
    t_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = w.get_finished()
    t_poll = time.perf_counter() - t0
    assert first == set() and t_poll < 0.05 and t_start < 0.2, (first, t_poll, t_start)
    # a store into slot 0 (read by the in-flight load) must not land before the load read it
    new = torch.full_like(buf[:, 5], 3.0)
    buf[:, 5] = new
    w.wait_for_save(KvbmConnectorMetadata(stores=[StoreOp(5, 0, b"\x09" * 16, False)]))
    done: set[str] = set()
    deadline = time.time() + 30
    while done != {"a", "b"}:
        assert time.time() < deadline, "asynchronous loads never reported finished"
        done |= w.get_finished()
        time.sleep(0.005)
    assert w.get_block_ids_with_load_errors() == {12}
    assert w.get_finished() == set()
    torch.cuda.synchronize()
    assert torch.equal(buf[:, 10].view(torch.int16), ref[:, 1].view(torch.int16))  # old slot 0 content
    assert torch.equal(buf[:, 11].view(torch.int16), ref[:, 2].view(torch.int16))
    for layer in range(L):
        assert torch.equal(slot_layer(w, 0, layer), block_bytes(buf, layer, 5).cpu())  # then the store
    meta = w.build_worker_meta()
    assert meta is not None and list(meta.load_failed) == [h[2]]
    w.shutdown()


def test_layer_range_copies_on_cuda_match_whole_block(tmp_path) -> None:
    """kvbm.copy gather/scatter with layers= on a CUDA layout, every method, against the
    whole-block copy (byte-exact, bytes outside the range untouched)."""
    from kvbm.copy import gather, scatter
    from kvbm.kv_layout import KvLayout

    L, NB, H, BS, HD = 6, 40, 4, 16, 64
    buf = torch.randn((L, NB, H, BS, 2 * HD), device="cuda").to(torch.bfloat16)
    layout = KvLayout.from_tensors([buf[i] for i in range(L)], kind="vllm")
    ids = np.array([3, 17, 5, 39, 0], dtype=np.int64)
    whole = torch.zeros((len(ids), layout.block_bytes), dtype=torch.uint8, pin_memory=True)
    torch.cuda.synchronize()
    assert gather(layout, ids, whole.numpy()).wait(30)
    offs, lens = layout.layer_offsets, layout.layer_bytes
    for method in ("auto", "kernel", "staged", "copy_engine", "naive"):
        part = torch.full(tuple(whole.shape), 0xA5, dtype=torch.uint8, pin_memory=True)  # 'kernel' needs pinned
        for r in (range(0, 2), range(2, 3), range(3, 6)):
            assert gather(layout, ids, part.numpy(), method=method, layers=r).wait(30)
        assert torch.equal(part, whole), method
        saved = buf.clone()
        buf.view(torch.int16).fill_(0x5A5A)
        torch.cuda.synchronize()
        assert scatter(layout, ids, whole.numpy(), method=method, layers=(2, 4)).wait(30)
        torch.cuda.synchronize()
        for layer in range(L):
            for j, b in enumerate(ids):
                got = block_bytes(buf, layer, int(b)).cpu()
                if 2 <= layer < 4:
                    assert torch.equal(got, whole[j, offs[layer]:offs[layer] + lens[layer]]), (method, layer)
                else:
                    assert bool((got.view(torch.int16) == 0x5A5A).all()), (method, layer)
        buf.copy_(saved)
        torch.cuda.synchronize()
