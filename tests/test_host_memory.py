"""Host allocation: pinned when CUDA is usable, else 4096-aligned pageable."""

import numpy as np
import pytest

import kvbm
from kvbm import _native


def test_alloc_host_is_aligned_writable_and_sized():
    buf = _native.alloc_host(12345, pinned=False)
    assert buf.size == 12345 and len(buf) == 12345
    assert not buf.pinned
    assert buf.address % 4096 == 0
    view = np.frombuffer(buf, dtype=np.uint8)
    view[:] = np.arange(12345, dtype=np.uint64).astype(np.uint8)
    assert int(view[1000]) == 1000 % 256


def test_alloc_host_pinned_follows_cuda_availability():
    buf = _native.alloc_host(1 << 20, pinned=True)
    assert buf.pinned == _native.cuda_available()
    assert buf.address % 4096 == 0


def test_alloc_host_zero_bytes_is_an_error():
    with pytest.raises(kvbm.InvalidArgumentError, match="bytes must be > 0"):
        _native.alloc_host(0)
