"""KV layout descriptor + host gather/scatter, on numpy arrays (runs in CI, no GPU needed).

The reference for a block's host slot is computed independently of the descriptor: for each
layer and tensor, the block's sub-array transposed into memory order (axes by descending
stride) and serialized.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvbm
from kvbm import _native
from kvbm.copy import gather, scatter, slot_addresses
from kvbm.kv_layout import KvLayout, TensorSpec

RNG = np.random.default_rng(1234)

# numpy dtype used to hold the values, dtype name kvbm sees
DTYPES = [(np.uint16, "bfloat16"), (np.float16, None), (np.float32, None), (np.uint8, "float8_e4m3fn"),
          (np.uint8, "float8_e5m2")]


def rand(shape, np_dtype):
    raw = RNG.integers(0, 256, size=int(np.prod(shape)) * np.dtype(np_dtype).itemsize, dtype=np.uint8)
    return raw.view(np_dtype).reshape(shape)


def memory_order_bytes(block_view: np.ndarray) -> bytes:
    axes = sorted(range(block_view.ndim), key=lambda a: -block_view.strides[a])
    return np.ascontiguousarray(block_view.transpose(axes)).tobytes()


def expected_slot(layers, b) -> bytes:
    out = b""
    for tensors in layers:
        for t in tensors:
            out += memory_order_bytes(t[b])
    return out


def roundtrip(layout: KvLayout, layers, num_blocks: int, ids) -> None:
    ids = np.asarray(ids, dtype=np.int64)
    slots = np.full((len(ids), layout.block_bytes), 0xA5, dtype=np.uint8)  # poisoned
    h = gather(layout, ids, slots)
    assert h.poll() and h.wait(0) and h.error is None
    assert h.nbytes == len(ids) * layout.block_bytes
    for i, b in enumerate(ids):
        assert slots[i].tobytes() == expected_slot(layers, int(b)), f"slot {i} (block {b}) differs"
    # Onboard into poisoned engine blocks: only the scattered blocks change, byte-exact.
    uniq = np.unique(ids)
    originals = [[t.copy() for t in tensors] for tensors in layers]
    new_slots = np.stack([np.frombuffer(expected_slot(layers, int(b)), dtype=np.uint8) for b in uniq])
    for tensors in layers:
        for t in tensors:
            t[uniq] = 0x5A if t.dtype.kind in "ui" else np.asarray(1.5, dtype=t.dtype)
    scatter(layout, uniq, new_slots).wait()
    for tensors, origs in zip(layers, originals):
        for t, o in zip(tensors, origs):
            assert np.ascontiguousarray(t).view(np.uint8).tobytes() == o.view(np.uint8).tobytes()


@pytest.mark.parametrize("np_dtype,name", DTYPES)
@pytest.mark.parametrize("block_size,heads,head", [(16, 8, 32), (1, 3, 8), (128, 5, 16)])
def test_vllm_contiguous_per_layer(np_dtype, name, block_size, heads, head):
    nb, nl = 7, 3
    buf = rand((nl, nb, heads, block_size, 2 * head), np_dtype)  # layer-major, views of one allocation
    layers = [[buf[l]] for l in range(nl)]
    layout = KvLayout.from_tensors([buf[l] for l in range(nl)], kind="vllm", dtype=name)
    esz = np.dtype(np_dtype).itemsize
    assert layout.block_bytes == nl * heads * block_size * 2 * head * esz
    assert len(layout.chunks) == nl  # each layer's block region is one contiguous chunk
    assert layout.layer_offsets == [l * heads * block_size * 2 * head * esz for l in range(nl)]
    roundtrip(layout, layers, nb, RNG.integers(0, nb, size=11))


def test_vllm_permuted_memory_order_is_one_chunk_in_memory_order():
    nb, bs, h, d2 = 5, 16, 4, 64
    base = rand((nb, bs, h, d2), np.float16)  # physical NHD, viewed as [nb, h, bs, 2d]
    view = base.transpose(0, 2, 1, 3)
    layout = KvLayout.from_tensors([view], kind="vllm")
    assert len(layout.chunks) == 1
    slots = np.zeros((1, layout.block_bytes), np.uint8)
    gather(layout, [3], slots).wait()
    assert slots[0].tobytes() == base[3].tobytes()  # engine memory order, not logical order
    roundtrip(layout, [[view]], nb, [4, 0, 4, 2])


def test_vllm_heads_outside_blocks_gives_a_chunk_per_head():
    nb, bs, h, d2 = 6, 16, 3, 32
    base = rand((h, nb, bs, d2), np.float32)
    view = base.transpose(1, 0, 2, 3)  # [nb, h, bs, 2d], heads outermost in memory
    layout = KvLayout.from_tensors([view], kind="vllm")
    assert [c[2] for c in layout.chunks] == [bs * d2 * 4] * h
    roundtrip(layout, [[view]], nb, [5, 1, 1, 0])


def test_cross_layer_block_major_buffer_merges_all_layers():
    nb, nl, h, bs, d2 = 4, 6, 2, 16, 16
    buf = rand((nb, nl, h, bs, d2), np.uint16)
    views = [buf[:, l] for l in range(nl)]
    layout = KvLayout.from_tensors(views, kind="vllm", dtype="bfloat16")
    assert len(layout.chunks) == 1 and layout.chunks[0][2] == layout.block_bytes
    roundtrip(layout, [[v] for v in views], nb, [3, 2, 1, 0, 3])


@pytest.mark.parametrize("np_dtype,name", DTYPES)
def test_kv_split_separate_tensors(np_dtype, name):
    nb, bs, h, d, nl = 9, 16, 3, 24, 2
    ks = [rand((nb, bs, h, d), np_dtype) for _ in range(nl)]
    vs = [rand((nb, bs, h, d), np_dtype) for _ in range(nl)]
    layout = KvLayout.from_tensors(list(zip(ks, vs)), kind="kv_split", dtype=name)
    assert len(layout.chunks) == 2 * nl
    roundtrip(layout, [[k, v] for k, v in zip(ks, vs)], nb, RNG.integers(0, nb, size=20))


def test_kv_split_5d_hnd_order_and_adjacent_k_v_merge():
    nb, bs, h, d = 6, 16, 4, 8
    # [2, nb, bs, h, d] viewed from a physical [nb, 2, h, bs, d] (HND, K and V of a block adjacent)
    phys = rand((nb, 2, h, bs, d), np.float16)
    view = phys.transpose(1, 0, 3, 2, 4)
    layout = KvLayout.from_tensors([view, view], kind="kv_split")
    assert len(layout.chunks) == 2  # per layer K+V merged into one chunk
    roundtrip(layout, [[view[0], view[1]], [view[0], view[1]]], nb, [1, 5, 0])
    # Separate K/V halves of one [2, nb, ...] tensor: two chunks per layer.
    t = rand((2, nb, bs, h, d), np.float32)
    layout2 = KvLayout.from_tensors([t], kind="kv_split")
    assert len(layout2.chunks) == 2
    roundtrip(layout2, [[t[0], t[1]]], nb, [2, 2, 4])


def test_kv_split_head_slice_splits_into_token_rows():
    nb, bs, h, d = 4, 8, 2, 16
    big = rand((nb, bs, h, 2 * d), np.float16)
    k, v = big[..., :d], big[..., d:]  # non-contiguous views: chunk per (token, head)
    layout = KvLayout.from_tensors([(k, v)], kind="kv_split")
    assert len(layout.chunks) == 2 * bs * h and all(c[2] == d * 2 for c in layout.chunks)
    roundtrip(layout, [[k, v]], nb, [3, 0, 1])


@pytest.mark.parametrize("np_dtype,name", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_mla(np_dtype, name, block_size):
    nb, latent, nl = 3, 576, 4
    ts = [rand((nb, block_size, latent), np_dtype) for _ in range(nl)]
    layout = KvLayout.from_tensors(ts, kind="mla", dtype=name)
    assert layout.block_bytes == nl * block_size * latent * np.dtype(np_dtype).itemsize
    roundtrip(layout, [[t] for t in ts], nb, [2, 0, 2, 1])


def test_single_block_cache_and_address_list():
    t = rand((1, 16, 2, 32), np.float16)
    layout = KvLayout.from_tensors([t], kind="vllm")
    slot = np.zeros((1, layout.block_bytes), np.uint8)
    h = gather(layout, [0], slot_addresses(slot), slot_bytes=layout.block_bytes)
    assert h.wait(1.0) and slot.tobytes() == t.tobytes()


def test_from_specs_matches_from_tensors():
    t = rand((4, 2, 16, 64), np.float32)
    spec = TensorSpec(t.__array_interface__["data"][0], t.shape, tuple(s // 4 for s in t.strides), "float32", -1)
    assert KvLayout.from_specs([[spec]], "vllm").chunks == KvLayout.from_tensors([t]).chunks


# ---- errors ----

def small_layout():
    t = rand((4, 2, 16, 64), np.float16)
    return KvLayout.from_tensors([t], kind="vllm"), t


@pytest.mark.parametrize("bad", [-1, 4, 1 << 40])
def test_out_of_range_block_id(bad):
    layout, _ = small_layout()
    slots = np.zeros((2, layout.block_bytes), np.uint8)
    with pytest.raises(kvbm.OutOfRangeError, match=r"block_ids\[1\] = .* outside \[0, 4\)"):
        gather(layout, [0, bad], slots)
    assert not slots.any()  # nothing copied


def test_slot_too_small_and_count_mismatch():
    layout, _ = small_layout()
    with pytest.raises(kvbm.InvalidArgumentError, match="host slot too small"):
        gather(layout, [0], np.zeros((1, layout.block_bytes - 1), np.uint8))
    with pytest.raises(kvbm.InvalidArgumentError, match="host slot too small"):
        gather(layout, [0], [12345], slot_bytes=layout.block_bytes - 2)
    with pytest.raises(kvbm.InvalidArgumentError, match="1 rows for 2 block ids"):
        scatter(layout, [0, 1], np.zeros((1, layout.block_bytes), np.uint8))
    with pytest.raises(kvbm.InvalidArgumentError, match="2 block ids but 1 slot addresses"):
        gather(layout, [0, 1], [12345])
    with pytest.raises(kvbm.InvalidArgumentError, match="is null"):
        gather(layout, [0], [0])


def test_wrong_dtype_shape_stride_device():
    a = rand((4, 2, 16, 64), np.float16)
    b = rand((4, 2, 16, 64), np.float32)
    with pytest.raises(kvbm.InvalidArgumentError, match="dtype float32 differs"):
        KvLayout.from_tensors([a, b], kind="vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="not supported"):
        KvLayout.from_tensors([rand((4, 2, 16, 64), np.int32)], kind="vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="element size"):
        KvLayout.from_tensors([a], kind="vllm", dtype="float32")
    with pytest.raises(kvbm.InvalidArgumentError, match="must be 4-D"):
        KvLayout.from_tensors([a[0]], kind="vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="must be even"):
        KvLayout.from_tensors([a[..., :63]], kind="vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="num_blocks 3 differs"):
        KvLayout.from_tensors([a, a[:3]], kind="vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="overlap|positive"):
        KvLayout.from_tensors([np.broadcast_to(a[:1], a.shape)], kind="vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="overlap"):
        KvLayout.from_specs([[TensorSpec(a.ctypes.data, (4, 2, 16, 64), (64, 64, 64, 1), "float16")]], "vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="positive"):
        KvLayout.from_tensors([a[::-1]], kind="vllm")
    with pytest.raises(kvbm.InvalidArgumentError, match="takes 2 tensor"):
        KvLayout.from_tensors([a], kind="kv_split")
    with pytest.raises(kvbm.InvalidArgumentError, match="V shape"):
        KvLayout.from_tensors([(a, a[:, :1])], kind="kv_split")
    with pytest.raises(kvbm.InvalidArgumentError, match="not one of"):
        KvLayout.from_tensors([a], kind="paged")
    gpu = TensorSpec(a.ctypes.data, a.shape, tuple(s // 2 for s in a.strides), "float16", 0)
    host = TensorSpec(a.ctypes.data, a.shape, tuple(s // 2 for s in a.strides), "float16", -1)
    with pytest.raises(kvbm.InvalidArgumentError, match="device -1 differs"):
        KvLayout.from_specs([[gpu], [host]], "vllm")


@pytest.mark.skipif(_native.cuda_available(), reason="checks the no-GPU error; a GPU is present")
def test_gpu_layout_without_cuda_raises_cuda_unavailable():
    a = rand((4, 2, 16, 64), np.float16)
    spec = TensorSpec(a.ctypes.data, a.shape, tuple(s // 2 for s in a.strides), "float16", 0)
    layout = KvLayout.from_specs([[spec]], "vllm")
    slots = np.zeros((1, layout.block_bytes), np.uint8)
    with pytest.raises(kvbm.CudaUnavailableError, match="CUDA device 0"):
        gather(layout, [0], slots)
    with pytest.raises(kvbm.CudaUnavailableError):
        scatter(layout, [0], slots)


def test_import_kvbm_copy_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, kvbm, kvbm.copy, kvbm.kv_layout; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_repr_names_the_geometry():
    layout, _ = small_layout()
    r = repr(layout)
    assert "kind=vllm" in r and "num_blocks=4" in r and f"block_bytes={layout.block_bytes}" in r


@pytest.mark.skipif(_native.cuda_available(), reason="checks the no-GPU error; a GPU is present")
def test_gpu_arena_without_cuda_raises_cuda_unavailable():
    from kvbm.gpu_arena import GpuArena

    with pytest.raises(kvbm.CudaUnavailableError, match="GpuArena"):
        GpuArena(num_blocks=4, num_layers=2, block_size=16, num_kv_heads=2, head_size=64)


def test_gpu_arena_rejects_bad_sizes():
    from kvbm.gpu_arena import GpuArena

    with pytest.raises(kvbm.InvalidArgumentError, match="must be > 0"):
        GpuArena(num_blocks=0, num_layers=2, block_size=16)
