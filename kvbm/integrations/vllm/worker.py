"""The worker half of the kvbm vLLM connector: owns the bytes, executes the scheduler's plans.

Copies go through kvbm's layout descriptor (:class:`kvbm.kv_layout.KvLayout`, built from the
tensors vLLM registers: shapes and strides are read, never assumed, so any ``KVCacheLayout``
works) and its gather/scatter (:mod:`kvbm.copy`: the native host path on CPU, the CUDA kernels
on GPU). Whole blocks always move (on vLLM's CPU platform a block's bytes are packed per
(block, head) tile, so token rows must never be copied piecemeal); on CUDA they may move one
layer at a time (all of a block's bytes of that layer).

Note [copies on CUDA]
Nothing is copied on vLLM's forward stream and nothing waits on the host before the forward:
- kvbm's *load stream* runs synchronous loads. It first waits for an event recorded on the
  forward stream when ``start_load_kv`` runs (vLLM zeroes newly allocated blocks there before
  the forward). They are queued one layer at a time (``layerwise``), each followed by an event:
  the first two layers in ``start_load_kv``, the next ones as ``wait_for_layer_load`` reaches
  earlier layers (so the host cost of queueing is not paid before the forward starts);
  ``wait_for_layer_load(layer)`` makes the forward stream wait for that layer's event (events
  on one stream complete in order, so waiting for layer l covers layers < l). Without
  ``layerwise`` one whole-block copy and one event gate every layer. When vLLM will not call
  the hooks (a full CUDA graph replay), the forward waits for the whole load up front.
- Asynchronous loads (requests in vLLM's ``WAITING_FOR_REMOTE_KVS``, which vLLM does not
  schedule, so nothing else touches their blocks) run on a second stream, after the same kind
  of event, so they never delay a synchronous load; disk blocks are read on the worker thread,
  which then queues their copy on that stream. ``get_finished`` only polls (no host wait).
- kvbm's *save stream* runs stores. ``save_kv_layer(layer)`` (vLLM calls it after each layer's
  attention, whose KV update wrote the layer) records an event on the forward stream; the save
  stream waits for it and gathers that layer of the step's planned blocks into their host slots.
  ``wait_for_save`` gathers whatever was not saved per layer, then waits for the save stream on
  the host: vLLM may reuse the blocks afterwards, and the disk writes read the slots.
- A host slot that a load still reads is not overwritten: stores into it wait for the load's
  event on the GPU (CPU platform: the host waits for the load thread). Stores into a slot read
  by a load of the same step are done in ``wait_for_save``, after that load was queued.
- Disk writes (write-through and write-behind demotions) start in ``wait_for_save``, after every
  asynchronous load still reading their disk slots finished reading: vLLM starts a step's
  asynchronous loads after the forward when the step has no synchronous ones, i.e. after the
  first ``save_kv_layer`` planned the step's saves.
On vLLM's CPU platform every copy is a synchronous memcpy at the same points (whole blocks,
before and after the forward), and asynchronous loads run on the worker thread.
"""

from __future__ import annotations

import atexit
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvbm.copy import TransferHandle, gather, scatter, slot_addresses
from kvbm.errors import InternalError, KvbmError, UnsupportedError
from kvbm.integrations.vllm import compat, disk
from kvbm.integrations.vllm.common import Geometry
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, KvbmWorkerMetadata, LoadOp, StoreOp
from kvbm.kv_layout import KvLayout

logger = logging.getLogger("kvbm.vllm")

_LOOKAHEAD = 2  # synchronous load ranges queued ahead of the layer the forward waits for


@dataclass
class _LoadJob:
    """One step's asynchronous loads. Done when the worker thread's part (``future``: returns the
    ops whose disk block failed, the copies it queued and what they read) and every queued copy
    (``handles``) are."""

    ops: list[LoadOp]
    req_ids: set[str]
    slots: set[int]
    future: Future | None = None
    handles: list[TransferHandle] = field(default_factory=list)
    event: Any = None  # CUDA: recorded on the load stream after the copies out of host slots
    failed: list[LoadOp] = field(default_factory=list)
    error: BaseException | None = None
    keep: list[Any] = field(default_factory=list)  # buffers the copies read, until they are done
    disk_slots: set[int] = field(init=False, default_factory=set)  # disk slots the job reads

    def __post_init__(self) -> None:
        self.disk_slots = {op.slot for op in self.ops if op.tier == "disk"}

    def poll(self) -> bool:
        """True once every part finished (successfully or not); never waits."""
        if self.future is not None:
            if not self.future.done():
                return False
            try:
                failed, handles, keep = self.future.result()
                self.failed += failed
                self.handles += handles
                self.keep.append(keep)
            except Exception as e:  # noqa: BLE001 - any failure: vLLM recomputes the blocks
                self.error = self.error or e
            self.future = None
        running = []
        for h in self.handles:
            try:
                if not h.poll():
                    running.append(h)
            except KvbmError as e:
                self.error = self.error or e
        self.handles = running
        return not running


@dataclass
class _SavePlan:
    """One step's stores, split by when they are copied."""

    to_host: list[StoreOp]  # into host slots, layer by layer on CUDA
    later: list[StoreOp]  # into host slots a load of this step reads: whole blocks in wait_for_save
    direct: list[StoreOp]  # no host slot (disk only): whole blocks into a private buffer in wait_for_save
    ids: np.ndarray
    addrs: np.ndarray
    layers_done: set[int] = field(default_factory=set)
    demoted: tuple[list[StoreOp], Any] | None = None  # write-behind: (ops, copies of their host slots)


class KvbmWorker:
    """Host arena + disk slab files of one tensor-parallel rank."""

    def __init__(self, cfg: ConnectorConfig, geo: Geometry, num_blocks: int) -> None:
        self.cfg = cfg
        self.geo = geo
        self.num_blocks = num_blocks
        self.rank = compat.tp_rank()
        self.ns_digest = geo.rank_namespace(self.rank).digest  # this rank's shard namespace
        self.layout: KvLayout | None = None
        self._cuda = False
        self._slot_addrs = np.empty(0, dtype=np.uint64)
        self.arena: torch.Tensor | None = None
        self.disk: disk.RankDisk | None = None
        self.rdir: str | None = None
        self._corrupt: set[bytes] = set()  # disk loads that failed their checksum, not yet reported
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests with a load error in this step
        self._meta = KvbmWorkerMetadata()
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list[_LoadJob] = []
        self.async_loads_done = 0  # asynchronous load jobs completed (and reported) so far
        # Copies on CUDA (see Note [copies on CUDA]); on the CPU platform the streams stay None.
        self.layerwise = False  # set by register_kv_caches
        self.copy_method = "auto"  # kvbm.copy method of whole-block copies (benchmarks compare others)
        # Per-layer copies run while the forward computes: copy engines only, no kernel taking SMs
        # from the model's (bench_vllm_layerwise_gpu.py on the H100, 32 layers of 0.3 ms, 128 blocks
        # each way: layer-wise with "copy_engine" hid 95% of the copy time, with "auto" (staged:
        # a packing kernel) it was slower than whole blocks).
        self.layer_copy_method = "copy_engine"
        self._layer_of: dict[str, int] = {}  # vLLM layer name -> layer index in the layout
        self._load_stream: Any = None  # this step's synchronous loads
        self._async_stream: Any = None  # asynchronous loads (never in front of a synchronous one)
        self._save_stream: Any = None
        self._load_ranges: list[range] = []  # how a synchronous load is cut: per layer, or all layers
        self._load_events: list[Any] | None = None  # this step's event after each range queued so far
        self._sync_load: tuple[list[int], np.ndarray, Any] | None = None  # (ids, sources, buffer) still to queue
        self._waited: set[int] = set()  # ranges the forward waited for this step
        self._gate_forward = False  # the forward never called wait_for_layer_load: gate it whole
        self._keep: list[tuple[Any, Any]] = []  # (event, buffer a queued copy reads) until the event is done
        self._save: _SavePlan | None = None  # this step's stores, planned at the first save_kv_layer
        self.pd: Any = None  # pd.PdWorker when prefill/decode is on
        # Copies queued or run, by direction and granularity (shown by the GPU vLLM tests: the
        # layer-wise path is active), and forward waits on one layer's load event.
        self.copy_counts: dict[str, int] = {"load_layer": 0, "load_all": 0, "save_layer": 0, "save_all": 0}
        self.layer_waits = 0

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
        self._layer_of = {name: i for i, name in enumerate(kv_caches)}
        n_layers = self.layout.num_layers
        if on_cuda:
            self._load_stream = torch.cuda.Stream(device=first.device)
            self._async_stream = torch.cuda.Stream(device=first.device)
            self._save_stream = torch.cuda.Stream(device=first.device)
            # Per-layer saves into pageable slots would block the host on every layer.
            self.layerwise = self.cfg.layerwise and pin
        if self.layerwise and self.copy_method == "auto":
            # Every copy then overlaps some forward (asynchronous loads run beside other
            # requests' steps): keep the SMs for the model there too.
            self.copy_method = self.layer_copy_method
        self._load_ranges = ([range(i, i + 1) for i in range(n_layers)] if self.layerwise
                             else [range(0, n_layers)])
        if self.cfg.disk_path:
            k = self.cfg.kvbm
            self.disk = disk.RankDisk(self.cfg.disk_path, self.ns_digest, self.geo.slot_bytes,
                                      self.geo.disk_capacity_blocks, io_threads=k.disk_io_threads,
                                      o_direct=k.disk_o_direct, durability=k.disk_durability, verify=k.checksums)
            self.rdir = self.disk.dir
            atexit.register(self.disk.close)
        if self.cfg.pd is not None:
            from kvbm.integrations.vllm.pd import PdWorker

            self.pd = PdWorker(self.cfg.pd, self.rank, self.geo.slot_bytes, arena_np)
        logger.info("kvbm: rank %d registered %d layers, %d bytes/block, %d host slots (%s), disk %s, %s copies",
                    self.rank, len(kv_caches), self.layout.block_bytes, self.geo.num_host_slots,
                    "pinned" if pin else "pageable", self.rdir, "layer-wise" if self.layerwise else "whole-block")

    # -- byte moving -----------------------------------------------------------------------
    def _copy(self, to_host: bool, block_ids: list[int], addrs: np.ndarray, stream: Any,
              layers: range | None = None) -> TransferHandle:
        """Queue (CUDA: on ``stream``) or run (host) one gather/scatter between vLLM blocks and the
        host addresses ``addrs`` (one slot-sized region each), all layers or ``layers``."""
        fn = gather if to_host else scatter
        per_layer = layers is not None and len(layers) < self.layout.num_layers
        self.copy_counts[("save_" if to_host else "load_") + ("layer" if per_layer else "all")] += 1
        return fn(self.layout, np.asarray(block_ids, dtype=np.int64), addrs, stream,
                  method=self.layer_copy_method if per_layer else self.copy_method, layers=layers)

    def _after_forward_so_far(self, stream: Any) -> None:
        """Order ``stream`` after everything queued so far on the forward (current) stream."""
        if stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(stream.device))
            stream.wait_event(ev)

    def _sources(self, ops: list[LoadOp]) -> tuple[list[LoadOp], np.ndarray, list[LoadOp], np.ndarray | None]:
        """Where each load's bytes are: its host slot, or (disk) a row of a fresh buffer read here.

        Returns (ops to copy, their source addresses, ops whose disk block failed, the buffer).
        """
        host = [op for op in ops if op.tier == "host"]
        on_disk = [op for op in ops if op.tier == "disk"]
        remote = [op for op in ops if op.tier == "remote"]
        addrs = [self._slot_addrs[np.asarray([op.slot for op in host], dtype=np.int64)]]
        ok, failed, rows = list(host), [], None
        remote_rows = None
        if on_disk:
            # 4096-aligned rows: O_DIRECT reads land in place.
            rows = disk.aligned_rows(len(on_disk), disk.disk_slot_bytes(self.geo.slot_bytes))
            good = self._read_disk(on_disk, rows)
            ok += [on_disk[i] for i in good]
            failed += [op for i, op in enumerate(on_disk) if i not in set(good)]
            addrs.append(slot_addresses(rows)[np.asarray(good, dtype=np.int64)])
        if remote:  # prefill/decode: pulled from the producer and verified (pd.py)
            remote_rows = np.empty((len(remote), self.geo.slot_bytes), dtype=np.uint8)
            got, bad = self.pd.load(remote, remote_rows) if self.pd is not None else ([], remote)
            ok += [remote[i] for i in got]
            failed += bad
            addrs.append(slot_addresses(remote_rows)[np.asarray(got, dtype=np.int64)])
        if remote_rows is not None:
            rows = (rows, remote_rows) if rows is not None else remote_rows
        return ok, np.concatenate(addrs).astype(np.uint64), failed, rows

    def _load_now(self, ops: list[LoadOp], stream: Any) -> tuple[list[LoadOp], list[TransferHandle], Any]:
        """Copy ``ops`` (whole blocks) into vLLM's blocks: run now (host) or queued on ``stream``.

        Returns (ops whose disk block failed its checksum or could not be read, the copies' handles,
        the buffer they read until done).
        """
        ok, addrs, failed, rows = self._sources(ops)
        handles = [self._copy(False, [op.block_id for op in ok], addrs, stream)] if ok else []
        return failed, handles, rows

    def _read_disk(self, ops: list[LoadOp], rows: np.ndarray) -> list[int]:
        """Read the disk slots of ``ops`` (this rank's shard, verified against its CRC) into
        ``rows``. Returns the indices read; the others are logged (and remembered as corrupt when
        their checksum failed)."""
        assert self.disk is not None
        crcs = [op.crcs[self.rank] if self.rank < len(op.crcs) else 0 for op in ops]
        res = self.disk.read([op.slot for op in ops], crcs, rows, [op.block_hash for op in ops])
        bad = [j for j, ok in enumerate(res.ok) if not ok]
        for j, msg in zip(bad, res.messages, strict=True):
            op = ops[j]
            if res.checksum_failed[j]:
                self._corrupt.add(op.block_hash)
            logger.warning("kvbm: rank %d: disk block %s not loaded, vLLM recomputes it: %s%s", self.rank,
                           op.block_hash.hex()[:16], "checksum mismatch: " if res.checksum_failed[j] else "", msg)
        return [j for j, ok in enumerate(res.ok) if ok]

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-load-{self.rank}")
        return self._pool

    def _release_kept(self) -> None:
        self._keep = [(ev, buf) for ev, buf in self._keep if not ev.query()]

    # -- vLLM worker API: loads ------------------------------------------------------------
    def start_load_kv(self, meta: KvbmConnectorMetadata, hooks_run: bool = True) -> None:
        """Start this step's loads. ``hooks_run=False``: vLLM will not call ``wait_for_layer_load``
        in this forward (a full CUDA graph replay, no attention metadata), so on CUDA the forward
        stream waits for the whole synchronous load here (still on the GPU, no host wait)."""
        if not meta.loads:
            return
        assert self.arena is not None
        sync_ops = [op for op in meta.loads if not op.is_async]
        async_ops = [op for op in meta.loads if op.is_async]
        if self._load_stream is not None:
            self._release_kept()
            for stream in (self._load_stream if sync_ops else None, self._async_stream if async_ops else None):
                self._after_forward_so_far(stream)  # after vLLM zeroed the new blocks
        if sync_ops:
            self._start_sync_loads(sync_ops, gate=not hooks_run)
        if async_ops:
            self._jobs.append(self._start_async_loads(async_ops))

    def _start_sync_loads(self, ops: list[LoadOp], gate: bool) -> None:
        """Loads this step's forward reads: done now (host), or queued range by range on the load
        stream with an event after each, which ``wait_for_layer_load`` hands to the forward. The
        first ranges are queued here, the next ones as the forward reaches earlier layers (the
        host cost of queueing every layer is not paid before the forward starts)."""
        ok, addrs, failed, rows = self._sources(ops)
        ids = [op.block_id for op in ok]
        if self._load_stream is None:
            if ok:
                self._copy(False, ids, addrs, None).wait()  # host layout: already done
        else:
            self._sync_load = (ids, addrs, rows)
            self._load_events = []
            self._waited = set()
            if gate or self._gate_forward:
                self._queue_sync_loads(len(self._load_ranges))
                torch.cuda.current_stream(self._load_stream.device).wait_event(self._load_events[-1])
                self._waited.add(len(self._load_ranges) - 1)
            else:
                self._queue_sync_loads(_LOOKAHEAD - 1)  # layers 0 and 1
        self._apply_load_result(ops, failed, sync=True)

    def _queue_sync_loads(self, upto: int) -> None:
        """Queue this step's synchronous load ranges up to index ``upto`` (CUDA)."""
        if self._sync_load is None:
            return
        ids, addrs, rows = self._sync_load
        events, stream = self._load_events, self._load_stream
        while len(events) <= min(upto, len(self._load_ranges) - 1):
            if ids:
                self._copy(False, ids, addrs, stream, layers=self._load_ranges[len(events)])
            ev = torch.cuda.Event()
            ev.record(stream)
            events.append(ev)
        if len(events) == len(self._load_ranges):
            if rows is not None:
                self._keep.append((events[-1], rows))
            self._sync_load = None

    def _start_async_loads(self, ops: list[LoadOp]) -> _LoadJob:
        """Loads reported through ``get_finished``: on the worker thread (host), or queued on the
        load stream (host slots here, disk blocks by the worker thread once read)."""
        job = _LoadJob(ops, {op.req_id for op in ops}, {op.slot for op in ops if op.tier == "host"})
        stream = self._async_stream
        if stream is None:
            job.future = self._thread_pool().submit(self._load_now, ops, None)
            return job
        host = [op for op in ops if op.tier == "host"]
        on_disk = [op for op in ops if op.tier in ("disk", "remote")]  # read by the worker thread
        if host:
            try:
                _, job.handles, _ = self._load_now(host, stream)
            except KvbmError as e:  # reported (and recomputed) through get_finished
                job.error = e
            job.event = torch.cuda.Event()
            job.event.record(stream)
        if on_disk:
            job.future = self._thread_pool().submit(self._load_now, on_disk, stream)
        return job

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Make the forward stream wait (on the GPU) until ``layer_name``'s part of this step's
        synchronous loads is in place (an unknown layer waits for all of it)."""
        events = self._load_events
        if events is None:
            return
        i = self._layer_of.get(layer_name)
        n = len(self._load_ranges)
        k = n - 1 if i is None or n == 1 else i
        self._queue_sync_loads(k + _LOOKAHEAD)
        torch.cuda.current_stream(self._load_stream.device).wait_event(events[k])
        self._waited.add(k)
        if n > 1:
            self.layer_waits += 1

    def _apply_load_result(self, ops: list[LoadOp], failed: list[LoadOp], sync: bool) -> None:
        """Account for finished loads; failed blocks go to ``get_block_ids_with_load_errors``."""
        self._meta.load_bytes += (len(ops) - len(failed)) * self.geo.slot_bytes
        for op in failed:
            self._load_errors.add(op.block_id)
            if sync:
                self._failed_reqs.add(op.req_id)  # its blocks computed this step are not stored
            self._meta.load_failed[op.block_hash] += 1
            if op.block_hash in self._corrupt:
                self._corrupt.discard(op.block_hash)
                self._meta.load_corrupt[op.block_hash] += 1

    def get_finished(self) -> set[str]:
        """Requests whose asynchronous loads completed since the last call (failed blocks included:
        they are reported by the next ``get_block_ids_with_load_errors`` of the same step). Polls;
        never waits."""
        done: set[str] = set()
        pending: list[_LoadJob] = []
        for job in self._jobs:
            if not job.poll():
                pending.append(job)
                continue
            failed = job.failed
            if job.error is not None:
                logger.warning("kvbm: rank %d: asynchronous load of %d blocks failed, vLLM recomputes "
                               "them: %s", self.rank, len(job.ops), job.error)
                failed = job.ops
            self._apply_load_result(job.ops, failed, sync=False)
            self.async_loads_done += 1
            done |= job.req_ids
        self._jobs = pending
        return done

    def _wait_for_loads_from(self, slots: set[int], disk_slots: set[int] | None = None) -> None:
        """Order the next copies into host ``slots`` after every in-flight asynchronous load that
        still reads one: on CUDA the save stream waits for the load's event (no host wait); on the
        CPU platform the host waits for the load thread. A load still reading one of ``disk_slots``
        (about to be written again) is waited for on the host (disk reads run on the load thread)."""
        for job in self._jobs:
            on_disk = bool(disk_slots and job.disk_slots & disk_slots)
            if on_disk and job.future is not None:
                wait_futures([job.future])
            if not job.slots & slots:
                continue
            if self._save_stream is not None:
                if job.event is not None:
                    self._save_stream.wait_event(job.event)
            elif job.future is not None:
                wait_futures([job.future])

    # -- vLLM worker API: saves ------------------------------------------------------------
    def _plan_saves(self, meta: KvbmConnectorMetadata) -> _SavePlan:
        if self._save is not None:
            return self._save
        # Demoted slots are copied before any of this step's stores reuses them.
        demoted = self._demote(meta.demotes) if meta.demotes else None
        # A request with a failed load computed this step over invalid KV: vLLM rewinds it,
        # and none of its blocks from this step may be stored.
        bad = self._failed_reqs
        ok = [op for op in meta.stores if op.req_id not in bad]
        for op in meta.stores:
            if op.req_id in bad:
                self._meta.store_failed[op.block_hash] += 1
                if op.to_disk:
                    self._meta.disk_failed[op.block_hash] += 1
        read_now = {op.slot for op in meta.loads if op.tier == "host"}
        to_host = [op for op in ok if op.slot >= 0 and op.slot not in read_now]
        later = [op for op in ok if op.slot >= 0 and op.slot in read_now]
        if self.disk is None:  # a plan for disk without a disk tier: never stored there
            for op in ok:
                if op.to_disk:
                    self._meta.disk_failed[op.block_hash] += 1
        direct = [op for op in ok if op.slot < 0 and op.to_disk and self.disk is not None]
        if to_host and self._jobs:
            self._wait_for_loads_from({op.slot for op in to_host})
        if self.pd is not None:  # P/D producer: these slots' table entries are invalid until stored
            self.pd.before_store([op.slot for op in to_host + later])
        self._save = _SavePlan(to_host, later, direct, np.asarray([op.block_id for op in to_host], dtype=np.int64),
                               self._slot_addrs[np.asarray([op.slot for op in to_host], dtype=np.int64)],
                               demoted=demoted)
        return self._save

    def _wait_before_disk_writes(self, plan: _SavePlan) -> None:
        """Wait for every asynchronous load still reading a disk slot this step writes. Called in
        ``wait_for_save``, not when the plan is made: with layer-wise saves the plan is made at the
        first ``save_kv_layer``, and vLLM starts a step's asynchronous loads after the forward
        (``start_load_kv`` after the last layer when the step has no synchronous loads), so this
        step's own loads of a slot the scheduler just handed out again start after the plan."""
        if self.disk is None or not self._jobs:
            return
        slots = {op.disk_slot for op in plan.to_host + plan.later + plan.direct if op.to_disk}
        if plan.demoted is not None:
            slots |= {op.disk_slot for op in plan.demoted[0]}
        if slots:
            self._wait_for_loads_from(set(), slots)

    def save_kv_layer(self, layer_name: str, meta: KvbmConnectorMetadata) -> None:
        """Layer-wise (CUDA): once the forward stream has written ``layer_name``'s KV, gather that
        layer of this step's planned blocks into their host slots on the save stream. No-op
        otherwise (whole blocks are saved in ``wait_for_save``)."""
        if not self.layerwise or not meta.stores:
            return
        i = self._layer_of.get(layer_name)
        plan = self._plan_saves(meta)
        if i is None or not plan.to_host or i in plan.layers_done:
            return
        self._after_forward_so_far(self._save_stream)
        self._copy(True, plan.ids, plan.addrs, self._save_stream, layers=range(i, i + 1))
        plan.layers_done.add(i)

    def wait_for_save(self, meta: KvbmConnectorMetadata) -> None:
        if self._load_events is not None and len(self._load_ranges) - 1 not in self._waited:
            # The forward never waited for the last layer: order what follows after the loads,
            # and from now on gate the whole forward on them.
            self._queue_sync_loads(len(self._load_ranges))
            torch.cuda.current_stream(self._load_stream.device).wait_event(self._load_events[-1])
            if not self._gate_forward:
                logger.warning("kvbm: rank %d: vLLM did not call wait_for_layer_load for every layer; "
                               "synchronous loads now gate the whole forward", self.rank)
                self._gate_forward = True
        if meta.stores:
            plan = self._plan_saves(meta)
            stream = self._save_stream
            self._after_forward_so_far(stream)
            # Layers not saved one by one during the forward (all of them on the CPU platform).
            missing = [i for i in range(self.layout.num_layers) if i not in plan.layers_done]
            for r in _runs(missing) if plan.to_host else []:
                self._copy(True, plan.ids, plan.addrs, stream, layers=r)
            if plan.later:
                self._wait_for_loads_from({op.slot for op in plan.later})
                self._copy(True, [op.block_id for op in plan.later],
                           self._slot_addrs[np.asarray([op.slot for op in plan.later], dtype=np.int64)], stream)
            rows = None
            if plan.direct:
                rows = disk.aligned_rows(len(plan.direct), disk.disk_slot_bytes(self.geo.slot_bytes))
                self._copy(True, [op.block_id for op in plan.direct], slot_addresses(rows), stream)
            if stream is not None:
                stream.synchronize()  # vLLM may reuse the blocks; the disk writes read the slots
            if self.pd is not None:
                stored = plan.to_host + plan.later
                self.pd.after_store([op.slot for op in stored], [op.block_hash for op in stored])
            for op in plan.to_host + plan.later:
                self._meta.store_bytes += self.geo.slot_bytes
                self._meta.stored[op.block_hash] += 1
            self._wait_before_disk_writes(plan)
            self._write_demoted(plan)
            if self.disk is not None:
                # Shards go from the host slots (pinned by the scheduler until every rank reported)
                # or, without a host slot, from the private copy; the catalog commits after the reports.
                w = [(op.block_hash, op.disk_slot, int(self._slot_addrs[op.slot]))
                     for op in plan.to_host + plan.later if op.to_disk]
                w += [(op.block_hash, op.disk_slot, rows[i, :self.geo.slot_bytes]) for i, op in enumerate(plan.direct)]
                if w:
                    self.disk.write([x[0] for x in w], [x[1] for x in w], [x[2] for x in w], keep=rows)
        else:
            plan = self._plan_saves(meta)  # demotions of a step without stores
            self._wait_before_disk_writes(plan)
            self._write_demoted(plan)
        self._save = None
        self._load_events = None
        if meta.pd_unused and self.pd is not None:
            self.pd.release_unused(meta.pd_unused)

    def _demote(self, ops: list[StoreOp]) -> tuple[list[StoreOp], Any] | None:
        """Write-behind: copy host slots the scheduler evicted (before this step's stores reuse them).
        The copies are written to their disk slots by ``wait_for_save`` (``_write_demoted``)."""
        if self.disk is None or self.arena is None:
            for op in ops:
                self._meta.disk_failed[op.block_hash] += 1
            return None
        sb = self.geo.slot_bytes
        rows = disk.aligned_rows(len(ops), disk.disk_slot_bytes(sb))
        arena = self.arena.numpy()
        for i, op in enumerate(ops):
            rows[i, :sb] = arena[op.slot]
        return ops, rows

    def _write_demoted(self, plan: _SavePlan) -> None:
        """Start the disk writes of the step's demoted copies (after ``_wait_before_disk_writes``)."""
        if plan.demoted is None or self.disk is None:
            return
        ops, rows = plan.demoted
        sb = self.geo.slot_bytes
        self.disk.write([op.block_hash for op in ops], [op.disk_slot for op in ops],
                        [rows[i, :sb] for i in range(len(ops))], keep=rows)
        plan.demoted = None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out = self._load_errors
        self._load_errors = set()
        self._failed_reqs = set()
        return out

    def build_worker_meta(self) -> KvbmWorkerMetadata | None:
        if self.disk is not None:
            written, failed = self.disk.poll()
            self._meta.disk_written.update(written.keys())
            for h, crc in written.items():
                self._meta.disk_crcs[h] = {self.rank: crc}
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

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until no copy touches vLLM's KV tensors: asynchronous loads finished (their requests
        are still reported by the next ``get_finished``), kvbm's CUDA streams idle, disk writes done.

        vLLM 0.33 calls this (``unregister_kv_caches``) before sleep mode remaps the KV cache memory.
        Returns False if loads were still running after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while any(not job.poll() for job in self._jobs):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        for st in (self._load_stream, self._async_stream, self._save_stream):
            if st is not None:
                st.synchronize()
        if self.disk is not None:
            self.disk.wait_all()
        return True

    def copy_stats(self) -> dict[str, Any]:
        """How this worker copied so far: ``copy_counts`` (gathers/scatters per direction, one
        layer or all), ``layer_waits`` (forward waits on a single layer's load), ``layerwise``."""
        return {**self.copy_counts, "layer_waits": self.layer_waits, "layerwise": self.layerwise,
                "cuda": bool(self._cuda), "async_loads_done": self.async_loads_done}

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.disk is not None:
            self.disk.close()
        if self.pd is not None:
            self.pd.close()
            self.pd = None


def _runs(layers: list[int]) -> list[range]:
    """Sorted layer indices as maximal ranges of consecutive layers."""
    out: list[range] = []
    for i in layers:
        if out and out[-1].stop == i:
            out[-1] = range(out[-1].start, i + 1)
        else:
            out.append(range(i, i + 1))
    return out


__all__ = ["KvbmWorker"]
