"""Package-level promises: no torch on import, errors map from native codes, build info."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kvbm
from kvbm import _native, errors


def test_import_does_not_import_torch() -> None:
    code = "import sys, kvbm, kvbm.cli; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "code,cls",
    [
        (1, errors.InvalidArgumentError),
        (2, errors.OutOfRangeError),
        (3, errors.CapacityError),
        (4, errors.StateError),
        (5, errors.BlockNotFoundError),
        (7, errors.StorageIOError),
        (8, errors.ChecksumError),
        (9, errors.CudaUnavailableError),
        (11, errors.TransferTimeoutError),
        (12, errors.PeerError),
        (13, errors.ConfigError),
        (15, errors.InternalError),
    ],
)
def test_status_codes_map_to_kvbm_errors(code: int, cls: type) -> None:
    with pytest.raises(cls, match="boom") as ei:
        _native._raise_status(code, "boom")
    assert isinstance(ei.value, kvbm.KvbmError)


def test_build_info() -> None:
    info = kvbm.build_info()
    assert info["version"] == kvbm.__version__
    assert "lru" in info["eviction_policies"]
    if not info["cuda_compiled"]:
        assert info["cuda_available"] is False
