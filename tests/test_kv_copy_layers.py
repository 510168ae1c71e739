"""Gather/scatter of a layer range (``layers=``) on host layouts (runs in CI, no GPU needed).

The reference is the whole-block path: gathering every layer range of a partition must give the
same slot bytes as one whole-block gather, touching nothing outside the range; scattering a
range must write exactly that range's bytes of each block and nothing else.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvbm.copy import gather, scatter
from kvbm.errors import InvalidArgumentError, KvbmError
from kvbm.kv_layout import KvLayout

RNG = np.random.default_rng(99)
L, NB = 4, 12


def _rand(shape) -> np.ndarray:
    return RNG.integers(0, 1 << 16, size=shape, dtype=np.uint16)


def _layouts():
    """(name, layout, backing arrays) for memory orders that exercise chunk cutting."""
    # per-layer tensors [nb, heads, bs, 2*hd] (vLLM CUDA-style separate allocations)
    sep = [_rand((NB, 2, 4, 16)) for _ in range(L)]
    yield "vllm_per_layer", KvLayout.from_tensors(sep, kind="vllm", dtype="bfloat16"), sep
    # views into one layer-major buffer (what vLLM's CPU platform hands over)
    buf = _rand((L, NB, 2, 4, 16))
    yield "vllm_layer_major_views", KvLayout.from_tensors([buf[i] for i in range(L)], kind="vllm",
                                                          dtype="bfloat16"), [buf]
    # one block-major buffer: a block's layers are adjacent, so all layers coalesce into ONE chunk
    # per block that a layer range must cut
    cross = _rand((NB, L, 2, 4, 16))
    yield "cross_layer_block_major", KvLayout.from_tensors([cross[:, i] for i in range(L)], kind="vllm",
                                                           dtype="bfloat16"), [cross]
    # heads outside blocks: several chunks per layer
    hnd = [_rand((2, NB, 4, 16)).transpose(1, 0, 2, 3) for _ in range(L)]
    yield "heads_outer", KvLayout.from_tensors(hnd, kind="vllm", dtype="bfloat16"), hnd
    # kv_split: separate K and V per layer
    kvs = [(_rand((NB, 4, 2, 8)), _rand((NB, 4, 2, 8))) for _ in range(L)]
    yield "kv_split", KvLayout.from_tensors(kvs, kind="kv_split", dtype="bfloat16"), [t for p in kvs for t in p]


LAYOUTS = list(_layouts())
IDS = np.array([7, 0, 11, 3, 5], dtype=np.int64)


def test_cross_layer_layout_really_merges_layers() -> None:
    layout = dict((n, lay) for n, lay, _ in LAYOUTS)["cross_layer_block_major"]
    assert len(layout.chunks) == 1  # the case a layer range must split


@pytest.mark.parametrize("name,layout,arrays", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
@pytest.mark.parametrize("parts", [[(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 2), (2, 4)], [(0, 3), (3, 4)], [(0, 4)]])
def test_gather_by_layer_ranges_equals_whole_block(name, layout, arrays, parts) -> None:
    bb = layout.block_bytes
    whole = np.zeros((len(IDS), bb), np.uint8)
    assert gather(layout, IDS, whole).wait()
    pieced = np.full((len(IDS), bb), 0xA5, np.uint8)
    offs, lens = layout.layer_offsets, layout.layer_bytes
    for begin, end in parts:
        before = pieced.copy()
        assert gather(layout, IDS, pieced, layers=(begin, end)).wait()
        lo, hi = offs[begin], offs[end - 1] + lens[end - 1]
        changed = np.nonzero((pieced != before).any(axis=0))[0]
        assert changed.size == 0 or (changed.min() >= lo and changed.max() < hi), "bytes outside the range moved"
        assert np.array_equal(pieced[:, lo:hi], whole[:, lo:hi])
    assert np.array_equal(pieced, whole)


@pytest.mark.parametrize("name,layout,arrays", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
@pytest.mark.parametrize("rng", [range(1, 2), range(0, 4), (2, 4), 3])
def test_scatter_of_a_layer_range_writes_exactly_that_range(name, layout, arrays, rng) -> None:
    bb = layout.block_bytes
    src = RNG.integers(0, 256, size=(len(IDS), bb), dtype=np.uint8)
    # expected engine state: poison everywhere, then the whole-block scatter of src, then keep
    # only the range's bytes of it (compared through a whole-block gather)
    for a in arrays:
        a.fill(0x5A5A)
    poison = np.zeros((NB, bb), np.uint8)
    assert gather(layout, np.arange(NB), poison).wait()
    assert scatter(layout, IDS, src, layers=rng).wait()
    got = np.zeros((NB, bb), np.uint8)
    assert gather(layout, np.arange(NB), got).wait()
    begin, end = (rng, rng + 1) if isinstance(rng, int) else (rng[0], rng[-1] + 1) if isinstance(rng, range) else rng
    lo = layout.layer_offsets[begin]
    hi = layout.layer_offsets[end - 1] + layout.layer_bytes[end - 1]
    expect = poison.copy()
    expect[IDS, lo:hi] = src[:, lo:hi]
    assert np.array_equal(got, expect)


@pytest.mark.parametrize("bad", [(2, 2), (3, 1), (-1, 1), (0, L + 1), (L, L + 1), -1, L, range(0, 4, 2)])
def test_bad_layer_range_raises_naming_layers(bad) -> None:
    _, layout, _ = LAYOUTS[0]
    slots = np.zeros((len(IDS), layout.block_bytes), np.uint8)
    slots_before = slots.copy()
    for fn in (gather, scatter):
        with pytest.raises(InvalidArgumentError, match="layers"):
            fn(layout, IDS, slots, layers=bad)
    assert np.array_equal(slots, slots_before)


@pytest.mark.parametrize("bad", ["1", (0, 1, 2), (0.0, 1), True, [None, 1]])
def test_bad_layer_argument_type_raises(bad) -> None:
    _, layout, _ = LAYOUTS[0]
    slots = np.zeros((1, layout.block_bytes), np.uint8)
    with pytest.raises(KvbmError, match="layers"):
        gather(layout, [0], slots, layers=bad)
