"""Facts both halves derive identically from vLLM's configuration: namespace and block geometry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbm.errors import UnsupportedError
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.hashing import namespace_digest


@dataclass(frozen=True)
class Geometry:
    block_size: int
    slot_bytes: int  # one block, all layers, one rank
    num_host_slots: int
    disk_capacity_blocks: int
    tp_world: int
    namespace: bytes


def geometry(vllm_config: Any, kv_cache_config: Any, cfg: ConnectorConfig) -> Geometry:
    """Derive block geometry and the namespace; raises UnsupportedError for hybrid KV layouts."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise UnsupportedError(
            f"the kvbm connector supports models with one KV cache group (full attention); this model "
            f"has {len(groups)} groups")
    spec = groups[0].kv_cache_spec
    layers = list(groups[0].layer_names)
    slot_bytes = int(spec.page_size_bytes) * len(layers)
    pc = vllm_config.parallel_config
    if getattr(pc, "pipeline_parallel_size", 1) != 1:
        raise UnsupportedError("the kvbm connector does not support pipeline parallelism yet "
                               f"(pipeline_parallel_size={pc.pipeline_parallel_size})")
    tp = int(pc.tensor_parallel_size)
    mc = vllm_config.model_config
    model_id = cfg.model_id or f"{mc.model}@{getattr(mc, 'revision', None)}"
    fields = {
        "model": model_id,
        "dtype": str(getattr(spec, "dtype", mc.dtype)),
        "block_size": int(spec.block_size),
        "spec": type(spec).__name__,
        "num_kv_heads": getattr(spec, "num_kv_heads", None),
        "head_size": getattr(spec, "head_size", None),
        "layers": len(layers),
        "page_size_bytes": int(spec.page_size_bytes),
        "kv_cache_layout": getattr(kv_cache_config, "kv_cache_layout", None),
        "device": str(getattr(vllm_config.device_config, "device_type", "")),
        "tp_world": tp,
        "hash": cfg.hash_algorithm,
    }
    return Geometry(
        block_size=int(spec.block_size),
        slot_bytes=slot_bytes,
        num_host_slots=cfg.host_bytes // slot_bytes,
        disk_capacity_blocks=(cfg.disk_bytes // slot_bytes) if cfg.disk_path else 0,
        tp_world=tp,
        namespace=namespace_digest(fields, cfg.hash_algorithm),
    )
