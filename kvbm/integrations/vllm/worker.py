"""The worker half of the kvbm vLLM connector: owns the bytes, executes the scheduler's plans.

Copies go through kvbm's layout descriptor (:class:`kvbm.kv_layout.KvLayout`, built from the
tensors vLLM registers: shapes and strides are read, never assumed, so any ``KVCacheLayout``
works) and its gather/scatter (:mod:`kvbm.copy`: the native host path on CPU, the CUDA kernels
on GPU). Whole blocks always move (on vLLM's CPU platform a block's bytes are packed per
(block, head) tile, so token rows must never be copied piecemeal).
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

import numpy as np
import torch

from kvbm.copy import gather, scatter, slot_addresses
from kvbm.errors import ChecksumError, InternalError, StorageIOError, UnsupportedError
from kvbm.integrations.vllm import disk
from kvbm.integrations.vllm.common import Geometry
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, KvbmWorkerMetadata, LoadOp, StoreOp
from kvbm.kv_layout import KvLayout

logger = logging.getLogger("kvbm.vllm")


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:
        return 0


class KvbmWorker:
    """Host arena + disk files of one tensor-parallel rank."""

    def __init__(self, cfg: ConnectorConfig, geo: Geometry, num_blocks: int) -> None:
        self.cfg = cfg
        self.geo = geo
        self.num_blocks = num_blocks
        self.rank = _tp_rank()
        self.ns_digest = geo.rank_namespace(self.rank).digest  # this rank's shard namespace
        self.layout: KvLayout | None = None
        self._cuda = False
        self._slot_addrs = np.empty(0, dtype=np.uint64)
        self.arena: torch.Tensor | None = None
        self.writer: disk.DiskWriter | None = None
        self.rdir: str | None = None
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests with a load error in this step
        self._meta = KvbmWorkerMetadata()
        self._staging: np.ndarray | None = None

    # -- set-up ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layout = KvLayout.from_tensors(kv_caches, kind="vllm")  # InvalidArgumentError names the layer
        if self.layout.num_blocks != self.num_blocks:
            raise UnsupportedError(f"kvbm: the registered KV tensors hold {self.layout.num_blocks} blocks, vLLM's "
                                   f"KV cache config says {self.num_blocks}")
        if self.layout.block_bytes != self.geo.slot_bytes:
            raise InternalError(f"kvbm: registered KV tensors hold {self.layout.block_bytes} bytes per block, "
                                f"the KV cache config says {self.geo.slot_bytes}")
        first = next(iter(kv_caches.values()))
        on_cuda = bool(first.is_cuda)
        self._cuda = on_cuda
        pin = on_cuda if self.cfg.kvbm.host_pinned is None else bool(self.cfg.kvbm.host_pinned)
        self.arena = torch.empty((self.geo.num_host_slots, self.geo.slot_bytes), dtype=torch.uint8, pin_memory=pin)
        arena_np = self.arena.numpy()
        self._slot_addrs = slot_addresses(arena_np)
        self._staging = np.empty((1, self.geo.slot_bytes), dtype=np.uint8)
        if self.cfg.disk_path:
            self.rdir = disk.rank_dir(self.cfg.disk_path, self.ns_digest)
            self.writer = disk.DiskWriter(self.rdir, self.ns_digest, lambda s: arena_np[s])
            atexit.register(self.writer.flush)
        logger.info("kvbm: rank %d registered %d layers, %d bytes/block, %d host slots (%s), disk %s",
                    self.rank, len(kv_caches), self.layout.block_bytes, self.geo.num_host_slots,
                    "pinned" if pin else "pageable", self.rdir)

    # -- byte moving -----------------------------------------------------------------------
    def _stream(self) -> Any:
        return torch.cuda.current_stream() if self._cuda else None

    def _gather(self, block_ids: list[int], slots: list[int] | None, out: np.ndarray | None = None) -> None:
        """vLLM blocks -> host slots (or the rows of ``out``), every layer, whole blocks."""
        dst = self._slot_addrs[np.asarray(slots, dtype=np.int64)] if slots is not None else out
        gather(self.layout, np.asarray(block_ids, dtype=np.int64), dst, self._stream()).wait()

    def _scatter(self, src: np.ndarray, block_ids: list[int]) -> None:
        """Host slot addresses (1-D uint64) or rows ``[n, slot_bytes]`` -> vLLM blocks."""
        scatter(self.layout, np.asarray(block_ids, dtype=np.int64), src, self._stream()).wait()

    # -- vLLM worker API -------------------------------------------------------------------
    def start_load_kv(self, meta: KvbmConnectorMetadata) -> None:
        if not meta.loads:
            return
        assert self.arena is not None
        host = [op for op in meta.loads if op.tier == "host"]
        if host:
            self._scatter(self._slot_addrs[np.asarray([op.slot for op in host], dtype=np.int64)],
                          [op.block_id for op in host])
            self._meta.load_bytes += len(host) * self.geo.slot_bytes
        for op in meta.loads:
            if op.tier == "disk":
                self._load_disk(op)

    def _load_disk(self, op: LoadOp) -> None:
        assert self._staging is not None and self.rdir is not None
        path = disk.block_path(self.rdir, op.block_hash)
        try:
            disk.read_block(path, op.block_hash, self.ns_digest, self._staging[0], self.cfg.kvbm.checksums)
        except (ChecksumError, StorageIOError) as e:
            logger.warning("kvbm: rank %d: disk block %s not loaded, vLLM recomputes it: %s",
                           self.rank, op.block_hash.hex()[:16], e)
            self._load_errors.add(op.block_id)
            self._failed_reqs.add(op.req_id)
            self._meta.load_failed[op.block_hash] += 1
            return
        self._scatter(self._staging, [op.block_id])
        self._meta.load_bytes += self.geo.slot_bytes

    def wait_for_save(self, meta: KvbmConnectorMetadata) -> None:
        stores: list[StoreOp] = meta.stores
        if stores:
            # A request with a failed load computed this step over invalid KV: vLLM rewinds it,
            # and none of its blocks from this step may be stored.
            bad = self._failed_reqs
            ok = [op for op in stores if op.req_id not in bad]
            for op in stores:
                if op.req_id in bad:
                    self._meta.store_failed[op.block_hash] += 1
                    if op.to_disk:
                        self._meta.disk_failed[op.block_hash] += 1
            to_host = [op for op in ok if op.slot >= 0]
            direct = [op for op in ok if op.slot < 0 and op.to_disk]
            if to_host:
                self._gather([op.block_id for op in to_host], [op.slot for op in to_host])
                self._meta.store_bytes += len(to_host) * self.geo.slot_bytes
                for op in to_host:
                    self._meta.stored[op.block_hash] += 1
                    if op.to_disk and self.writer is not None:
                        self.writer.write(op.block_hash, op.slot)
            if direct and self.writer is not None:
                rows = np.empty((len(direct), self.geo.slot_bytes), dtype=np.uint8)
                self._gather([op.block_id for op in direct], None, rows)
                for i, op in enumerate(direct):
                    self.writer.write_buffer(op.block_hash, rows[i])
        if self.writer is not None:
            for h in meta.disk_deletes:
                self.writer.delete(h)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out = self._load_errors
        self._load_errors = set()
        self._failed_reqs = set()
        return out

    def build_worker_meta(self) -> KvbmWorkerMetadata | None:
        if self.writer is not None:
            written, failed = self.writer.drain()
            self._meta.disk_written.update(written)
            self._meta.disk_failed.update(failed)
        if self._meta.empty():
            return None
        out = self._meta
        self._meta = KvbmWorkerMetadata()
        return out

    def shutdown(self) -> None:
        if self.writer is not None:
            self.writer.flush()


__all__ = ["KvbmWorker"]
