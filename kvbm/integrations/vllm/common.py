"""Facts both halves derive identically from vLLM's configuration: namespace and block geometry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kvbm.errors import ConfigError, UnsupportedError
from kvbm.hashing import Namespace
from kvbm.integrations.vllm.config import SOURCE, ConnectorConfig
from kvbm.integrations.vllm.disk import disk_block_bytes, disk_capacity_slots


@dataclass(frozen=True)
class Geometry:
    block_size: int
    slot_bytes: int  # one block, all layers, one rank
    num_host_slots: int
    disk_capacity_blocks: int  # most disk slots this engine may hold (all of disk_capacity_bytes, every rank)
    tp_world: int
    namespace: Namespace  # the logical namespace (tp_rank 0): the scheduler's index keys

    def rank_namespace(self, rank: int) -> Namespace:
        """The namespace a rank stores its shard under (same fields, its own ``tp_rank``)."""
        return dataclasses.replace(self.namespace, tp_rank=rank)


def geometry(vllm_config: Any, kv_cache_config: Any, cfg: ConnectorConfig) -> Geometry:
    """Derive block geometry and the namespace.

    Raises:
        UnsupportedError: several KV cache groups (hybrid models) or pipeline parallelism.
        ConfigError: the host tier cannot hold one block.
    """
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
    # Everything that changes a block's bytes besides model, dtype, block size and TP goes into
    # the layout string: attention spec, head geometry, layer count, page size, cache layout, device.
    layout = (f"{type(spec).__name__}|kv_heads={getattr(spec, 'num_kv_heads', None)}"
              f"|head_size={getattr(spec, 'head_size', None)}|layers={len(layers)}"
              f"|page_bytes={int(spec.page_size_bytes)}|layout={getattr(kv_cache_config, 'kv_cache_layout', None)}"
              f"|device={getattr(vllm_config.device_config, 'device_type', '')}")
    ns = Namespace(model_id=cfg.model_id or str(mc.model), dtype=str(getattr(spec, "dtype", mc.dtype)),
                   kv_layout=layout, block_size=int(spec.block_size), tp_rank=0, tp_size=tp,
                   revision=str(getattr(mc, "revision", None) or ""), hash_algorithm=cfg.kvbm.hash_algorithm)
    k = cfg.kvbm
    num_host_slots = k.host_capacity_bytes // slot_bytes
    if num_host_slots < 1:
        raise ConfigError(f"{SOURCE}['host_capacity_bytes']={k.host_capacity_bytes} is smaller than one block "
                          f"({slot_bytes} bytes for all layers of this rank)")
    disk_blocks = disk_capacity_slots(k.disk_capacity_bytes, slot_bytes, tp) if k.disk_path else 0
    if k.disk_path and disk_blocks < 1:
        raise ConfigError(f"{SOURCE}['disk_capacity_bytes']={k.disk_capacity_bytes} is smaller than one block on "
                          f"disk ({disk_block_bytes(slot_bytes, tp)} bytes: record header and data on each of "
                          f"{tp} rank(s))")
    return Geometry(
        block_size=int(spec.block_size),
        slot_bytes=slot_bytes,
        num_host_slots=num_host_slots,
        disk_capacity_blocks=disk_blocks,
        tp_world=tp,
        namespace=ns,
    )
