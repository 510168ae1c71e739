"""CRC32C: known vector, a pure-Python reference on random data, chaining, implementations."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvbm import _native
from kvbm.errors import InvalidArgumentError, UnsupportedError


def _table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_TABLE = _table()


def ref_crc32c(data: bytes, crc: int = 0) -> int:
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c = _TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _impls() -> list[str]:
    impls = ["auto", "table"]
    if _native.crc32c_impl() == "sse4.2":
        impls.append("sse4.2")
    return impls


@pytest.mark.parametrize("impl", _impls())
def test_known_vectors(impl):
    assert _native.crc32c(b"123456789", impl=impl) == 0xE3069283
    assert _native.crc32c(b"", impl=impl) == 0
    assert ref_crc32c(b"123456789") == 0xE3069283
    # RFC 3720 (iSCSI) B.4 vectors: 32 bytes of zeros / of 0xff.
    assert _native.crc32c(bytes(32), impl=impl) == 0x8A9136AA
    assert _native.crc32c(b"\xff" * 32, impl=impl) == 0x62A8AB43


@pytest.mark.parametrize("impl", _impls())
def test_matches_reference_on_random_data(impl):
    rng = random.Random(11)
    # Lengths around every path boundary: bytewise head/tail, 8-byte words, the 3x256 and
    # 3x4096 interleaved chunks of the hardware path.
    lengths = list(range(70)) + [767, 768, 769, 1535, 1536, 2400, 12287, 12288, 12289, 24576 + 777,
                                     rng.randrange(30000, 70000)]
    blob = rng.randbytes(max(lengths) + 8)
    for n in lengths:
        for off in (0, 3):  # unaligned starts too
            data = blob[off:off + n]
            assert _native.crc32c(data, impl=impl) == ref_crc32c(data), (impl, n, off)


def test_implementations_agree_on_large_buffers():
    rng = np.random.default_rng(12)
    data = rng.integers(0, 256, size=(8 << 20) + 13, dtype=np.uint8)
    results = {impl: _native.crc32c(data, impl=impl) for impl in _impls()}
    assert len(set(results.values())) == 1, results
    mv = memoryview(data)[5:]
    results = {impl: _native.crc32c(mv, impl=impl) for impl in _impls()}
    assert len(set(results.values())) == 1, results


@pytest.mark.parametrize("impl", _impls())
def test_incremental_equals_one_shot(impl):
    rng = random.Random(13)
    data = rng.randbytes(50_000)
    whole = _native.crc32c(data, impl=impl)
    for _ in range(30):
        cuts = sorted(rng.randrange(0, len(data)) for _ in range(rng.randrange(1, 5)))
        crc = 0
        prev = 0
        for c in [*cuts, len(data)]:
            crc = _native.crc32c(data[prev:c], crc, impl=impl)
            prev = c
        assert crc == whole
    assert _native.crc32c(b"6789", _native.crc32c(b"12345")) == 0xE3069283


def test_buffer_kinds_and_errors():
    data = np.arange(1000, dtype=np.int32)
    assert _native.crc32c(data) == ref_crc32c(data.tobytes())
    assert _native.crc32c(bytearray(b"123456789")) == 0xE3069283
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        _native.crc32c(data[::2])
    with pytest.raises(InvalidArgumentError, match="bytes-like"):
        _native.crc32c("123456789")
    with pytest.raises(InvalidArgumentError, match="impl='crc'"):
        _native.crc32c(b"x", impl="crc")
    if _native.crc32c_impl() == "table":
        with pytest.raises(UnsupportedError):
            _native.crc32c(b"x", impl="sse4.2")
