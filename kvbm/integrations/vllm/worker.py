"""The worker half of the kvbm vLLM connector: owns the bytes, executes the scheduler's plans.

Copies go through torch indexing over the tensors vLLM registered (``index_select`` /
``index_copy_`` along the block dimension), so any stride order or ``KVCacheLayout`` is read from
the tensors themselves and whole blocks are always moved (on vLLM's CPU platform a block's bytes
are packed per (block, head) tile, so token rows must never be copied piecemeal).
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass

import numpy as np
import torch

from kvbm.errors import ChecksumError, InternalError, StorageIOError, UnsupportedError
from kvbm.integrations.vllm import disk
from kvbm.integrations.vllm.common import Geometry
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, KvbmWorkerMetadata, LoadOp, StoreOp

logger = logging.getLogger("kvbm.vllm")


@dataclass
class _Layer:
    name: str
    tensor: torch.Tensor
    block_dim: int
    block_shape: tuple[int, ...]
    offset: int  # bytes into the slot
    nbytes: int  # bytes of one block of this layer


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
        self.layers: list[_Layer] = []
        self.arena: torch.Tensor | None = None
        self.writer: disk.DiskWriter | None = None
        self.rdir: str | None = None
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests with a load error in this step
        self._meta = KvbmWorkerMetadata()
        self._staging: np.ndarray | None = None

    # -- set-up ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        offset = 0
        for name, t in kv_caches.items():
            if t.shape[0] == self.num_blocks:
                bdim = 0
            elif t.dim() > 1 and t.shape[1] == self.num_blocks:
                bdim = 1  # e.g. FlashAttention's [2, num_blocks, ...]
            else:
                raise UnsupportedError(f"kvbm: KV tensor of layer {name} has shape {tuple(t.shape)}; no "
                                       f"dimension of size num_blocks={self.num_blocks}")
            shape = tuple(t.shape[:bdim]) + tuple(t.shape[bdim + 1:])
            nbytes = int(np.prod(shape)) * t.element_size()
            self.layers.append(_Layer(name, t, bdim, shape, offset, nbytes))
            offset += nbytes
        if offset != self.geo.slot_bytes:
            raise InternalError(f"kvbm: registered KV tensors hold {offset} bytes per block, the KV cache "
                                f"config says {self.geo.slot_bytes}")
        on_cuda = any(lay.tensor.is_cuda for lay in self.layers)
        pin = on_cuda if self.cfg.kvbm.host_pinned is None else bool(self.cfg.kvbm.host_pinned)
        self.arena = torch.empty((self.geo.num_host_slots, self.geo.slot_bytes), dtype=torch.uint8, pin_memory=pin)
        self._staging = np.empty(self.geo.slot_bytes, dtype=np.uint8)
        if self.cfg.disk_path:
            self.rdir = disk.rank_dir(self.cfg.disk_path, self.ns_digest)
            arena_np = self.arena.numpy()
            self.writer = disk.DiskWriter(self.rdir, self.ns_digest, lambda s: arena_np[s])
            atexit.register(self.writer.flush)
        logger.info("kvbm: rank %d registered %d layers, %d bytes/block, %d host slots (%s), disk %s",
                    self.rank, len(self.layers), offset, self.geo.num_host_slots,
                    "pinned" if pin else "pageable", self.rdir)

    # -- byte moving -----------------------------------------------------------------------
    def _gather(self, block_ids: list[int], slots: list[int] | None, out: torch.Tensor | None = None) -> None:
        """vLLM blocks -> host slots (or the rows of ``out``), every layer, whole blocks."""
        assert self.arena is not None
        dev = self.layers[0].tensor.device
        ids = torch.tensor(block_ids, dtype=torch.long, device=dev)
        sl = torch.tensor(slots, dtype=torch.long) if slots is not None else None
        n = len(block_ids)
        for lay in self.layers:
            src = lay.tensor.index_select(lay.block_dim, ids)
            if lay.block_dim:
                src = src.movedim(lay.block_dim, 0)
            src = src.contiguous().view(torch.uint8).reshape(n, lay.nbytes).cpu()
            if sl is not None:
                self.arena[sl, lay.offset:lay.offset + lay.nbytes] = src
            else:
                assert out is not None
                out[:, lay.offset:lay.offset + lay.nbytes] = src

    def _scatter(self, rows: torch.Tensor, block_ids: list[int]) -> None:
        """rows ``[n, slot_bytes]`` (host) -> vLLM blocks, every layer."""
        dev = self.layers[0].tensor.device
        ids = torch.tensor(block_ids, dtype=torch.long, device=dev)
        n = len(block_ids)
        for lay in self.layers:
            part = rows[:, lay.offset:lay.offset + lay.nbytes].contiguous().to(dev, non_blocking=True)
            part = part.view(lay.tensor.dtype).reshape((n, *lay.block_shape))
            if lay.block_dim:
                part = part.movedim(0, lay.block_dim)
            lay.tensor.index_copy_(lay.block_dim, ids, part)

    # -- vLLM worker API -------------------------------------------------------------------
    def start_load_kv(self, meta: KvbmConnectorMetadata) -> None:
        if not meta.loads:
            return
        assert self.arena is not None
        host = [op for op in meta.loads if op.tier == "host"]
        if host:
            rows = self.arena[torch.tensor([op.slot for op in host], dtype=torch.long)]
            self._scatter(rows, [op.block_id for op in host])
            self._meta.load_bytes += len(host) * self.geo.slot_bytes
        for op in meta.loads:
            if op.tier == "disk":
                self._load_disk(op)

    def _load_disk(self, op: LoadOp) -> None:
        assert self._staging is not None and self.rdir is not None
        path = disk.block_path(self.rdir, op.block_hash)
        try:
            disk.read_block(path, op.block_hash, self.ns_digest, self._staging, self.cfg.kvbm.checksums)
        except (ChecksumError, StorageIOError) as e:
            logger.warning("kvbm: rank %d: disk block %s not loaded, vLLM recomputes it: %s",
                           self.rank, op.block_hash.hex()[:16], e)
            self._load_errors.add(op.block_id)
            self._failed_reqs.add(op.req_id)
            self._meta.load_failed[op.block_hash] += 1
            return
        self._scatter(torch.from_numpy(self._staging).reshape(1, -1), [op.block_id])
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
                rows = torch.empty((len(direct), self.geo.slot_bytes), dtype=torch.uint8)
                self._gather([op.block_id for op in direct], None, rows)
                rows_np = rows.numpy()
                for i, op in enumerate(direct):
                    self.writer.write_buffer(op.block_hash, rows_np[i])
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
