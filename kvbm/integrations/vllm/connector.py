"""``KvbmConnector``: kvbm as a vLLM v1 KV connector (``KVConnectorBase_V1``, vLLM 0.26 to 0.34;
the differences between releases live in :mod:`kvbm.integrations.vllm.compat`).

Load it with::

    kv_transfer_config={"kv_connector": "KvbmConnector",
                        "kv_connector_module_path": "kvbm.integrations.vllm",
                        "kv_role": "kv_both",
                        "kv_load_failure_policy": "recompute",
                        "kv_connector_extra_config": {"host_capacity_bytes": "4GiB", "disk_path": "/nvme/kvbm",
                                                      "disk_capacity_bytes": "100GiB"}}

The class is instantiated twice: with role SCHEDULER in the engine-core process (bookkeeping,
:mod:`kvbm.integrations.vllm.scheduler`) and with role WORKER in every worker process (bytes,
:mod:`kvbm.integrations.vllm.worker`). See the note in :mod:`kvbm.integrations.vllm.index`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvbm.integrations.vllm import compat
from kvbm.integrations.vllm.common import geometry
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.logs import attach_to_vllm_logging
from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata
from kvbm.integrations.vllm.scheduler import KvbmScheduler
from kvbm.integrations.vllm.stats import KvbmConnectorStats, KvbmPromMetrics, StatsTracker
from kvbm.integrations.vllm.worker import KvbmWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvbm.vllm")


class KvbmConnector(KVConnectorBase_V1):
    """kvbm's host + disk KV cache tiers behind vLLM's connector API.

    Raises (at engine start-up):
        kvbm.errors.ConfigError: ``kv_connector_extra_config`` has an unknown key or a bad value
            (the message names the key).
        kvbm.errors.UnsupportedError: hybrid KV cache groups or pipeline parallelism.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        attach_to_vllm_logging()
        super().__init__(vllm_config, role, kv_cache_config)
        compat.warn_if_unsupported()
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.cfg = ConnectorConfig.from_extra_config(extra, getattr(self._kv_transfer_config, "kv_role", None))
        if kv_cache_config is None:
            from kvbm.errors import UnsupportedError

            raise UnsupportedError("the kvbm connector needs vLLM >= 0.26 (kv_cache_config is passed to "
                                   "connectors)")
        self.geo = geometry(vllm_config, kv_cache_config, self.cfg)
        self._sched: KvbmScheduler | None = None
        self._worker: KvbmWorker | None = None
        self._busy_ns = 0  # time spent inside this connector's methods (its overhead on vLLM)
        self._busy_calls = 0
        self._stats = StatsTracker()
        self._events = None  # kvbm's own KV-event publisher (events_endpoint), scheduler side
        if role == KVConnectorRole.SCHEDULER:
            self._sched = KvbmScheduler(self.cfg, self.geo)
            if self.cfg.events_endpoint:
                from kvbm.events import KvEventPublisher

                self._events = KvEventPublisher(self.cfg.events_endpoint, self.cfg.events_replay_endpoint)
            policy = compat.load_failure_policy(self._kv_transfer_config)
            if policy not in (None, "recompute"):
                logger.warning("kvbm: kv_load_failure_policy is %r: a block that fails its checksum will "
                               "fail its request; set \"kv_load_failure_policy\": \"recompute\" to have "
                               "vLLM recompute it instead", policy)
        else:
            self._worker = KvbmWorker(self.cfg, self.geo, kv_cache_config.num_blocks)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped store is a future miss

    # ---------------------------------------------------------------- early validation
    # vLLM 0.32 builds the connector only once the model is loaded (it needs the KV cache config).
    # These class hooks run earlier and carry the configuration: kvbm validates
    # ``kv_connector_extra_config`` there so a typo stops the launch before the model loads.
    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Called by ``VllmConfig`` in the launching process (with CUDA graphs on): validates the
        extra config (raises ``ConfigError`` naming the key). kvbm needs no PIECEWISE mode: its
        worker gates a full CUDA graph replay on the whole load instead."""
        ConnectorConfig.from_extra_config(extra_config)
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """Called in every worker while the model's attention layers are built (before the KV
        cache exists): validates the extra config. kvbm reads any layout (returns None)."""
        ktc = getattr(vllm_config, "kv_transfer_config", None)
        if ktc is not None:
            ConnectorConfig.from_extra_config(ktc.kv_connector_extra_config, getattr(ktc, "kv_role", None))
        return None

    def has_pending_push_work(self) -> bool:
        """Scheduler side: keep vLLM's engine stepping while disk writes await their workers'
        reports (committed to the catalog only from those; see Note [Shutdown] in scheduler.py)."""
        return self._sched is not None and self._sched.has_pending_work()

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._sched is not None
        t0 = time.perf_counter_ns()
        try:
            return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0
            self._busy_calls += 1

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self._sched is not None
        t0 = time.perf_counter_ns()
        try:
            self._sched.update_state_after_alloc(request, blocks, num_external_tokens)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0
            self._busy_calls += 1

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict:
        """Tokens loaded per source (vLLM 0.32+ asks; see compat.cache_hit_sources)."""
        if num_external_tokens == 0 or self._sched is None:
            return {}
        host, disk = self._sched.hit_sources(request)
        return compat.cache_hit_sources(num_external_tokens, host, disk)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._sched is not None
        t0 = time.perf_counter_ns()
        try:
            return self._sched.build_connector_meta(scheduler_output)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0
            self._busy_calls += 1

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._sched is not None
        t0 = time.perf_counter_ns()
        try:
            self._sched.update_connector_output(compat.worker_meta(connector_output))
            self._sched.loads_finished(connector_output.finished_recving)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0
            self._busy_calls += 1

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._sched is not None
        # A P/D producer answers with where the blocks are (they live in kvbm's host tier, pinned
        # under a lease, so vLLM may free its own blocks at once).
        return False, self._sched.request_finished(request)

    def get_handshake_metadata(self) -> Any:
        """Worker side: this rank's P/D address (a plain dict), or None."""
        return self._worker.pd.handshake() if self._worker is not None and self._worker.pd is not None else None

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        """Scheduler side: the P/D addresses of all ranks, keyed by tensor-parallel rank."""
        if self._sched is not None and self._sched.pd is not None and self._sched.pd.cfg.produce:
            self._sched.pd.set_ranks(metadata)

    def take_events(self) -> Iterable[Any]:
        if self._sched is None:
            return ()
        t0 = time.perf_counter_ns()
        try:
            events = self._sched.take_events()
            if self._events is not None:
                self._events.publish(events)
            return events
        finally:
            self._busy_ns += time.perf_counter_ns() - t0

    # ---------------------------------------------------------------- vLLM's stats and /metrics
    def get_kv_connector_stats(self) -> KvbmConnectorStats | None:
        """Scheduler side, after every step: per-tier counters since the last call (vLLM ships
        them to its front-end's logger and Prometheus metrics); None when nothing changed."""
        if self._sched is None:
            return None
        return self._stats.take(*self._sched.prom_stats())

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvbmConnectorStats | None:
        return KvbmConnectorStats(data=dict(data)) if data is not None else None

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KvbmPromMetrics:
        """kvbm's per-tier families on vLLM's ``/metrics`` (see :mod:`kvbm.integrations.vllm.stats`)."""
        return KvbmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def kvbm_stats(self) -> dict[str, Any]:
        """Scheduler-side counters (hits per tier, stores, evictions, lookup latency)."""
        assert self._sched is not None
        return {**self._sched.stats(), "busy_ns": self._busy_ns}

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        t0 = time.perf_counter_ns()
        try:
            self._worker.register_kv_caches(kv_caches)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0
            self._busy_calls += 1

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmConnectorMetadata)
        # vLLM calls wait_for_layer_load only where attention runs eagerly with metadata: not in a
        # replayed full CUDA graph (uniform decode batches, e.g. a new request with a one-token tail).
        hooks_run = compat.forward_hooks_run(forward_context)
        t0 = time.perf_counter_ns()
        try:
            self._worker.start_load_kv(meta, hooks_run=hooks_run)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0
            self._busy_calls += 1

    def wait_for_layer_load(self, layer_name: str) -> None:
        """CUDA: the forward stream waits (on the GPU) for this layer of the step's synchronous
        loads. No-op on the CPU platform (loads completed in start_load_kv)."""
        assert self._worker is not None
        t0 = time.perf_counter_ns()
        try:
            self._worker.wait_for_layer_load(layer_name)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """CUDA (layerwise): queue the gather of this layer of the step's planned blocks on kvbm's
        save stream, after the attention that wrote it. No-op otherwise (saved in wait_for_save)."""
        assert self._worker is not None
        if not self._worker.layerwise:
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmConnectorMetadata)
        t0 = time.perf_counter_ns()
        try:
            self._worker.save_kv_layer(layer_name, meta)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmConnectorMetadata)
        t0 = time.perf_counter_ns()
        try:
            self._worker.wait_for_save(meta)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0
            self._busy_calls += 1

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(no sends, requests whose asynchronous loads completed) — polled every step."""
        if self._worker is None:
            return None, None
        t0 = time.perf_counter_ns()
        try:
            return None, (self._worker.get_finished() or None)
        finally:
            self._busy_ns += time.perf_counter_ns() - t0

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors() if self._worker else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self._worker is None:
            return None
        t0 = time.perf_counter_ns()
        try:
            return self._worker.build_worker_meta()
        finally:
            self._busy_ns += time.perf_counter_ns() - t0

    def kvbm_busy_ns(self) -> int:
        """Nanoseconds spent inside this connector instance's hooks so far (either role)."""
        return self._busy_ns

    # ---------------------------------------------------------------- vLLM 0.33 sleep mode
    def unregister_kv_caches(self) -> None:
        """Before sleep mode remaps the KV cache (vLLM 0.33+): let every copy into or out of vLLM's
        blocks finish. kvbm registers nothing with a NIC, and sleep mode keeps the tensors' virtual
        addresses, so the layout stays valid; the host and disk tiers keep their blocks."""
        if self._worker is not None and not self._worker.drain():
            logger.warning("kvbm: asynchronous loads still running when vLLM went to sleep")

    def restore_kv_caches(self) -> None:
        """After wake-up (vLLM 0.33+): nothing to redo (see :meth:`unregister_kv_caches`)."""
        return

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None:
            self._sched.shutdown()
        if self._events is not None:
            self._events.close()
