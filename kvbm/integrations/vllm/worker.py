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
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
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


@dataclass
class _LoadJob:
    """One step's asynchronous loads: done when ``future`` is; it returns the failed ops."""

    future: Future
    ops: list[LoadOp]
    req_ids: set[str]
    slots: set[int]


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
        self._async_staging: np.ndarray | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list[_LoadJob] = []
        self.async_loads_done = 0  # asynchronous load jobs completed (and reported) so far
        self.pd: Any = None  # pd.PdWorker when prefill/decode is on

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
        self._async_staging = np.empty((1, self.geo.slot_bytes), dtype=np.uint8)
        if self.cfg.disk_path:
            self.rdir = disk.rank_dir(self.cfg.disk_path, self.ns_digest)
            self.writer = disk.DiskWriter(self.rdir, self.ns_digest, lambda s: arena_np[s])
            atexit.register(self.writer.flush)
        if self.cfg.pd is not None:
            from kvbm.integrations.vllm.pd import PdWorker

            self.pd = PdWorker(self.cfg.pd, self.rank, self.geo.slot_bytes, arena_np)
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
        assert self.arena is not None and self._staging is not None and self._async_staging is not None
        sync_ops = [op for op in meta.loads if not op.is_async]
        async_ops = [op for op in meta.loads if op.is_async]
        if sync_ops:
            self._apply_load_result(sync_ops, self._run_loads(sync_ops, self._staging), sync=True)
        if async_ops:
            req_ids = {op.req_id for op in async_ops}
            slots = {op.slot for op in async_ops if op.tier == "host"}
            if self._cuda:
                # The CUDA path runs the copies here, on the current stream (not overlapped with
                # the forward); the requests are still reported through get_finished.
                fut: Future = Future()
                try:
                    fut.set_result(self._run_loads(async_ops, self._async_staging))
                except Exception as e:  # noqa: BLE001 - reported (and recomputed) through get_finished
                    fut.set_exception(e)
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-load-{self.rank}")
                fut = self._pool.submit(self._run_loads, async_ops, self._async_staging)
            self._jobs.append(_LoadJob(fut, async_ops, req_ids, slots))

    def _run_loads(self, ops: list[LoadOp], staging: np.ndarray) -> list[LoadOp]:
        """Copy ``ops`` into vLLM's blocks (host slots in one scatter, disk blocks one by one).

        Returns the ops whose disk block failed its checksum or could not be read (not copied).
        """
        host = [op for op in ops if op.tier == "host"]
        if host:
            self._scatter(self._slot_addrs[np.asarray([op.slot for op in host], dtype=np.int64)],
                          [op.block_id for op in host])
        failed: list[LoadOp] = []
        for op in ops:
            if op.tier == "disk" and not self._load_disk(op, staging):
                failed.append(op)
        remote = [op for op in ops if op.tier == "remote"]
        if remote:  # prefill/decode: pulled from the producer, verified, scattered (pd.py)
            failed.extend(self.pd.load(remote, self._scatter) if self.pd is not None else remote)
        return failed

    def _apply_load_result(self, ops: list[LoadOp], failed: list[LoadOp], sync: bool) -> None:
        """Account for finished loads; failed blocks go to ``get_block_ids_with_load_errors``."""
        self._meta.load_bytes += (len(ops) - len(failed)) * self.geo.slot_bytes
        for op in failed:
            self._load_errors.add(op.block_id)
            if sync:
                self._failed_reqs.add(op.req_id)  # its blocks computed this step are not stored
            self._meta.load_failed[op.block_hash] += 1

    def _load_disk(self, op: LoadOp, staging: np.ndarray) -> bool:
        assert self.rdir is not None
        path = disk.block_path(self.rdir, op.block_hash)
        try:
            disk.read_block(path, op.block_hash, self.ns_digest, staging[0], self.cfg.kvbm.checksums)
        except (ChecksumError, StorageIOError) as e:
            logger.warning("kvbm: rank %d: disk block %s not loaded, vLLM recomputes it: %s",
                           self.rank, op.block_hash.hex()[:16], e)
            return False
        self._scatter(staging, [op.block_id])
        return True

    def get_finished(self) -> set[str]:
        """Requests whose asynchronous loads completed since the last call (failed blocks included:
        they are reported by the next ``get_block_ids_with_load_errors`` of the same step)."""
        done: set[str] = set()
        pending: list[_LoadJob] = []
        for job in self._jobs:
            if not job.future.done():
                pending.append(job)
                continue
            try:
                failed = job.future.result()
            except Exception as e:  # noqa: BLE001 - any copy failure: vLLM recomputes the blocks
                logger.warning("kvbm: rank %d: asynchronous load of %d blocks failed, vLLM recomputes "
                               "them: %s", self.rank, len(job.ops), e)
                failed = job.ops
            self._apply_load_result(job.ops, failed, sync=False)
            self.async_loads_done += 1
            done |= job.req_ids
        self._jobs = pending
        return done

    def _wait_for_loads_from(self, slots: set[int]) -> None:
        """Block until no in-flight asynchronous load still reads one of host ``slots``."""
        busy = [job.future for job in self._jobs if job.slots & slots]
        if busy:
            wait_futures(busy)

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
                if self._jobs:
                    self._wait_for_loads_from({op.slot for op in to_host})
                if self.pd is not None:
                    self.pd.before_store([op.slot for op in to_host])
                self._gather([op.block_id for op in to_host], [op.slot for op in to_host])
                if self.pd is not None:
                    self.pd.after_store([op.slot for op in to_host], [op.block_hash for op in to_host])
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
        if meta.pd_unused and self.pd is not None:
            self.pd.release_unused(meta.pd_unused)

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
        if self.pd is not None:
            self._meta.pd_released.update(self.pd.released())
            blocks, ns = self.pd.take_pull_counters()
            self._meta.pd_pulled_blocks += blocks
            self._meta.pd_pull_ns += ns
        if self._meta.empty():
            return None
        out = self._meta
        self._meta = KvbmWorkerMetadata()
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.writer is not None:
            self.writer.flush()
        if self.pd is not None:
            self.pd.close()
            self.pd = None


__all__ = ["KvbmWorker"]
