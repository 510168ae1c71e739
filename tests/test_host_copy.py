"""copy_bytes (Note [Host copies] in csrc/host_copy.h): the host tier's block copy is memcpy's
equal byte for byte at every size and relative offset, on both of its paths."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm import _native
from kvbm.errors import InvalidArgumentError

SIZES = [0, 1, 15, 16, 17, 63, 64, 65, 127, 4095, 4096, 4097, 65536 + 7]
OFFSETS = [0, 1, 8, 15, 16, 17, 31, 32, 63, 64, 100, 4080, 4095]


def _aligned(n: int) -> np.ndarray:
    raw = np.zeros(n + 2 * 4096, np.uint8)
    return raw[(-raw.ctypes.data) % 4096:]


@pytest.mark.parametrize("impl", ["auto", "sse2", "memcpy"])
def test_every_size_and_offset_copies_exactly(impl: str) -> None:
    rng = np.random.default_rng(3)
    src_page = _aligned(70000)
    src_page[:] = rng.integers(0, 256, src_page.size, dtype=np.uint8)
    checked = 0
    for n in SIZES:
        for so in (0, 16, 4095):
            for do in OFFSETS:
                dst_page = _aligned(70000)
                dst_page[:] = 0xA5
                src = src_page[so:so + n]
                _native.copy_bytes(dst_page[do:do + n], src, impl)
                assert np.array_equal(dst_page[do:do + n], src), (impl, n, so, do)
                assert (dst_page[:do] == 0xA5).all() and (dst_page[do + n:do + n + 64] == 0xA5).all(), (n, so, do)
                checked += 1
    assert checked == len(SIZES) * 3 * len(OFFSETS)


def test_bad_arguments_are_named() -> None:
    a, b = np.zeros(64, np.uint8), np.zeros(65, np.uint8)
    with pytest.raises(InvalidArgumentError, match="src"):
        _native.copy_bytes(a, b)
    with pytest.raises(InvalidArgumentError, match="impl"):
        _native.copy_bytes(a, b[:64], "fast")
    c = np.zeros(128, np.uint8)
    with pytest.raises(InvalidArgumentError, match="overlap"):
        _native.copy_bytes(c[:64], c[32:96])
    with pytest.raises(InvalidArgumentError, match="dst"):
        _native.copy_bytes(b"immutable" * 8, a[:72])


def test_host_tier_round_trip_from_unaligned_numpy_rows() -> None:
    """Blocks stored from and loaded into arrays whose data sits 16 bytes into a page (numpy's own
    offset, the case the SSE2 path exists for): byte-exact both ways."""
    from kvbm import BlockManager, KvbmConfig

    bb, n = 64 << 10, 16
    raw = np.random.default_rng(4).integers(0, 256, n * bb + 4096 + 16, dtype=np.uint8)
    off = (-raw.ctypes.data) % 4096 + 16
    data = raw[off:off + n * bb].reshape(n, bb)
    out_raw = np.zeros(n * bb + 4096 + 16, np.uint8)
    off2 = (-out_raw.ctypes.data) % 4096 + 16
    out = out_raw[off2:off2 + n * bb].reshape(n, bb)
    with BlockManager(KvbmConfig(block_bytes=bb, host_capacity_bytes=n * bb)) as m:
        hashes = [i.to_bytes(16, "little") for i in range(1, n + 1)]
        m.store(hashes, data)
        m.load(hashes, out)
    assert np.array_equal(out, data)
