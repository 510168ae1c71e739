"""CUDA gather/scatter against a torch reference (byte-exact), on a GPU.

Skipped without torch-with-CUDA or a GPU. The reference slot of a block is built by torch:
each layer's tensors, the block's sub-tensor permuted into memory order, as bytes.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvbm
from kvbm import _native
from kvbm.copy import gather, scatter
from kvbm.gpu_arena import GpuArena
from kvbm.kv_layout import KvLayout

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_native.cuda_available() and torch.cuda.is_available()),
                       reason="needs a CUDA GPU and a CUDA build of kvbm (KVBM_CUDA=ON)"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
GEN = torch.Generator(device="cpu").manual_seed(7)


def rand_base(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=GEN).cuda()


def view(base: torch.Tensor, dtype, phys_shape, perm):
    """A tensor of `dtype` over `base`, physically `phys_shape`, logically permuted by `perm`."""
    return base.view(dtype).view(phys_shape).permute(*perm)


def block_bytes_ref(t: torch.Tensor, b: int) -> torch.Tensor:
    sub = t[b]
    axes = sorted(range(sub.dim()), key=lambda a: -sub.stride(a))
    return sub.permute(*axes).contiguous().view(torch.uint8).reshape(-1)


def slot_ref(layers, b: int) -> torch.Tensor:
    return torch.cat([block_bytes_ref(t, b) for ts in layers for t in ts])


def pinned_slots(n: int, nbytes: int) -> tuple[object, np.ndarray]:
    buf = _native.alloc_host(max(1, n * nbytes), pinned=True)
    assert buf.pinned
    arr = np.frombuffer(buf, dtype=np.uint8)[: n * nbytes].reshape(n, nbytes)
    return buf, arr


def check_roundtrip(layout, layers, bases, ids, method="auto", pinned=True, **kw):
    n, bb = len(ids), layout.block_bytes
    keep, slots = pinned_slots(n, bb) if pinned else (None, np.empty((n, bb), np.uint8))
    slots.fill(0xA5)
    torch.cuda.synchronize()  # kvbm's own stream is not ordered after torch's stream
    h = gather(layout, ids, slots, method=method, **kw)
    assert h.wait(30.0) and h.error is None
    ref = torch.stack([slot_ref(layers, int(b)) for b in ids]).cpu().numpy()
    mism = np.nonzero((slots != ref).any(axis=1))[0]
    assert mism.size == 0, f"gather ({method}): slots {mism[:8].tolist()} differ"
    # Onboard: poison every engine byte, scatter the gathered slots of the unique ids back, then
    # every scattered block must equal its slot and every other block must still be poison.
    uniq, first = np.unique(np.asarray(ids), return_index=True)
    keep_src, src = pinned_slots(len(uniq), bb) if pinned else (None, np.empty((len(uniq), bb), np.uint8))
    src[:] = slots[first]
    for b in bases:
        b.fill_(0x5A)
    torch.cuda.synchronize()
    h = scatter(layout, uniq, src, method=method, **kw)
    assert h.wait(30.0)
    torch.cuda.synchronize()
    where = {int(b): i for i, b in enumerate(uniq)}
    for blk in range(layout.num_blocks):
        got = slot_ref(layers, blk).cpu().numpy()
        if blk in where:
            assert np.array_equal(got, src[where[blk]]), f"scatter ({method}): block {blk} differs"
        else:
            assert bool((got == 0x5A).all()), f"scatter ({method}): block {blk} was touched"
    del keep, keep_src


def random_ids(nb: int, n: int) -> np.ndarray:
    ids = np.random.default_rng(n * 31 + nb).integers(0, nb, size=n)
    ids[::3] = ids[0]  # repeats, out of order
    return ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["kernel", "copy_engine", "staged", "naive"])
def test_kv_split_separate_k_v(dtype, method):
    nb, bs, h, d, nl = 13, 16, 3, 40, 3  # non-power-of-two heads and head size
    es = torch.empty((), dtype=dtype).element_size()
    bases = [rand_base(nb * bs * h * d * es) for _ in range(2 * nl)]
    ts = [view(b, dtype, (nb, bs, h, d), (0, 1, 2, 3)) for b in bases]
    layers = [[ts[2 * i], ts[2 * i + 1]] for i in range(nl)]
    layout = KvLayout.from_tensors([tuple(x) for x in layers], kind="kv_split")
    assert layout.device == torch.cuda.current_device()
    check_roundtrip(layout, layers, bases, random_ids(nb, 17), method)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_vllm_views_of_one_buffer_any_order(dtype, block_size):
    nb, h, d, nl = 5, 2, 64, 4
    es = torch.empty((), dtype=dtype).element_size()
    base = rand_base(nl * nb * h * block_size * 2 * d * es)
    # Physical order per layer [nb, bs, h, 2d] (NHD), the 4-D view [nb, h, bs, 2d].
    full = base.view(dtype).view(nl, nb, block_size, h, 2 * d)
    views = [full[l].permute(0, 2, 1, 3) for l in range(nl)]
    layout = KvLayout.from_tensors(views, kind="vllm")
    assert len(layout.chunks) == nl
    check_roundtrip(layout, [[v] for v in views], [base], random_ids(nb, 9))


def test_vllm_hnd_heads_outside_blocks():
    nb, bs, h, d = 6, 16, 5, 32
    base = rand_base(h * nb * bs * 2 * d * 2)
    v = view(base, torch.bfloat16, (h, nb, bs, 2 * d), (1, 0, 2, 3))
    layout = KvLayout.from_tensors([v], kind="vllm")
    assert len(layout.chunks) == h
    check_roundtrip(layout, [[v]], [base], [5, 0, 5, 3, 1])


def test_kv_split_5d_with_unaligned_head_slices():
    # K and V are odd-sized slices: chunks of 3 elements * 2 bytes = 6 bytes, unaligned.
    nb, bs, h, d = 4, 8, 3, 3
    base = rand_base(nb * bs * h * 2 * d * 2 + 2)
    big = base[2:].view(torch.float16).view(nb, bs, h, 2 * d)
    k, v = big[..., :d], big[..., d:]
    layout = KvLayout.from_tensors([(k, v)], kind="kv_split")
    check_roundtrip(layout, [[k, v]], [base], [3, 1, 1, 0], "kernel")
    check_roundtrip(layout, [[k, v]], [base], [3, 1, 1, 0], "staged")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32], ids=str)
@pytest.mark.parametrize("block_size", [1, 128])
def test_mla(dtype, block_size):
    nb, latent, nl = 3, 576, 5
    es = torch.empty((), dtype=dtype).element_size()
    bases = [rand_base(nb * block_size * latent * es) for _ in range(nl)]
    ts = [b.view(dtype).view(nb, block_size, latent) for b in bases]
    layout = KvLayout.from_tensors(ts, kind="mla")
    check_roundtrip(layout, [[t] for t in ts], bases, [2, 0, 2, 1])


def test_single_block_and_pageable_slots_use_copy_engines():
    base = rand_base(1 * 16 * 2 * 128 * 2)
    t = view(base, torch.bfloat16, (1, 2, 16, 128), (0, 1, 2, 3))
    layout = KvLayout.from_tensors([t], kind="vllm")
    check_roundtrip(layout, [[t]], [base], [0], "auto", pinned=False)
    with pytest.raises(kvbm.InvalidArgumentError, match="not pinned"):
        gather(layout, [0], np.zeros((1, layout.block_bytes), np.uint8), method="kernel")


def test_large_batch_spans_several_launches():
    nb, bs, h, d = 1030, 1, 1, 16  # > 1024 blocks per launch
    base = rand_base(nb * bs * h * 2 * d * 2)
    t = view(base, torch.float16, (nb, h, bs, 2 * d), (0, 1, 2, 3))
    layout = KvLayout.from_tensors([t], kind="vllm")
    ids = np.random.default_rng(3).permutation(nb)
    check_roundtrip(layout, [[t]], [base], ids, "kernel")
    # Staged through buffers of 7 blocks: many sub-batches alternating two buffers.
    check_roundtrip(layout, [[t]], [base], ids, "staged", stage_bytes=7 * layout.block_bytes)
    check_roundtrip(layout, [[t]], [base], ids[:5], "staged", pinned=False, stage_bytes=2 * layout.block_bytes)


def test_errors_on_gpu():
    base = rand_base(4 * 2 * 16 * 64 * 2)
    t = view(base, torch.float16, (4, 2, 16, 64), (0, 1, 2, 3))
    layout = KvLayout.from_tensors([t], kind="vllm")
    keep, slots = pinned_slots(2, layout.block_bytes)
    with pytest.raises(kvbm.OutOfRangeError, match="outside"):
        gather(layout, [0, 4], slots)
    with pytest.raises(kvbm.InvalidArgumentError, match="host slot too small"):
        scatter(layout, [0], slots[:, :-1])
    with pytest.raises(kvbm.InvalidArgumentError, match="device cpu|device -1|differs"):
        KvLayout.from_tensors([t, t.cpu()], kind="vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="does not exist"):
        from kvbm.kv_layout import TensorSpec

        s = TensorSpec(t.data_ptr(), tuple(t.shape), tuple(t.stride()), "float16", 64)
        gather(KvLayout.from_specs([[s]], "vllm"), [0], slots)
    del keep


def test_async_handles_streams_and_overlap():
    nb, bs, h, d, nl = 64, 16, 8, 128, 4
    base = rand_base(nl * 2 * nb * bs * h * d * 2)
    full = base.view(torch.bfloat16).view(nl, 2, nb, bs, h, d)
    layout = KvLayout.from_tensors([full[l] for l in range(nl)], kind="kv_split")
    bb = layout.block_bytes
    keep, slots = pinned_slots(nb, bb)
    slots.fill(0xA5)
    torch.cuda.synchronize()
    # The first transfer on a layout sets up its chunk table and the staging pool (and may wait
    # for queued device work); warm it up, then check the steady state.
    assert gather(layout, np.arange(1), slots[:1]).wait(30.0)
    # A caller stream held up by ~50 ms of matmuls: the handle is not done until they ran.
    s = torch.cuda.Stream()
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        for _ in range(32):
            torch.mm(a, a)
    h1 = gather(layout, np.arange(32), slots[:32], stream=s)
    assert h1.poll() is False and h1.wait(0.002) is False
    # Many batches in flight on kvbm's own streams, offload and onboard at once.
    hs = [gather(layout, np.arange(32 + i, 33 + i), slots[32 + i:33 + i]) for i in range(16)]
    assert h1.wait(60.0) and all(h.wait(60.0) for h in hs)
    ref = torch.stack([slot_ref([[full[l][0], full[l][1]] for l in range(nl)], b) for b in range(48)]).cpu().numpy()
    assert np.array_equal(slots[:48], ref)
    # Onboard blocks 0..31 from slots while offloading 32..47 again: both correct.
    src = slots[:32].copy()
    keep2, src_p = pinned_slots(32, bb)
    src_p[:] = src[::-1]
    g = gather(layout, np.arange(32, 48), slots[32:48])
    sc = scatter(layout, np.arange(32), src_p)
    assert g.wait(60.0) and sc.wait(60.0)
    for b in range(32):
        assert np.array_equal(slot_ref([[full[l][0], full[l][1]] for l in range(nl)], b).cpu().numpy(), src[31 - b])
    assert np.array_equal(slots[32:48], ref[32:48])
    del keep, keep2


def test_gpu_arena_roundtrip():
    arena = GpuArena(num_blocks=20, num_layers=3, block_size=16, num_kv_heads=3, head_size=40, dtype="float16")
    layout = arena.layout
    assert layout.block_bytes == 3 * 2 * 16 * 3 * 40 * 2
    keep, src = pinned_slots(20, layout.block_bytes)
    src[:] = np.random.default_rng(5).integers(0, 256, size=src.shape, dtype=np.uint8)
    ids = np.random.default_rng(6).permutation(20)
    assert scatter(layout, ids, src).wait(30.0)
    keep2, out = pinned_slots(20, layout.block_bytes)
    out.fill(0xA5)
    assert gather(layout, ids[::-1], out).wait(30.0)
    assert np.array_equal(out, src[::-1])
    del keep, keep2
