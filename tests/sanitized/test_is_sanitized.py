"""Guards the sanitizer job: the kvbm under test must be the ASan+UBSan build."""

from __future__ import annotations

import os

import pytest


@pytest.mark.skipif(os.environ.get("KVBM_EXPECT_SANITIZED") != "1", reason="only in the sanitizer job")
def test_loaded_extension_is_the_sanitized_build() -> None:
    import kvbm
    from kvbm import _native

    assert "asan-pkg" in kvbm.__file__, kvbm.__file__
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert "libasan" in maps, "libasan is not loaded"
    assert _native.__file__.startswith(os.path.dirname(kvbm.__file__))
