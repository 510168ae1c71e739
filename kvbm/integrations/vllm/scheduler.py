"""The scheduler half of the kvbm vLLM connector (engine-core process). See index.py's note."""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm import _native
from kvbm.integrations.vllm import disk
from kvbm.integrations.vllm.common import Geometry
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.index import TierIndex
from kvbm.integrations.vllm.metadata import KvbmConnectorMetadata, KvbmWorkerMetadata, LoadOp, StoreOp
from kvbm.integrations.vllm.pd import PdScheduler

logger = logging.getLogger("kvbm.vllm")

_MAX_PENDING_EVENTS = 1 << 16
#: Disk hits (access time, hit count) are written to the catalog at most this often while requests
#: run, and at once when the last running request finishes (see Note [Shutdown] below).
METADATA_FLUSH_S = 1.0
#: Keep vLLM's engine stepping for disk writes in flight at most this long without a report.
PENDING_STALL_S = 30.0

# Note [Shutdown]
# ---------------
# vLLM's default ``--shutdown-timeout 0`` sends the engine core SIGTERM and then SIGKILL at once:
# nothing the connector does at shutdown can be relied on. So nothing is left for shutdown:
# * Disk writes are committed as the workers report them, and the workers report only inside
#   engine steps. After the last request finished, ``has_pending_work`` (vLLM's
#   ``has_pending_push_work`` hook) keeps the engine stepping (empty steps, no forward) until every
#   planned disk write was reported and committed, or no report came for ``PENDING_STALL_S``.
# * Access times and hit counts of disk hits are written at most ``METADATA_FLUSH_S`` apart while
#   requests run, and as soon as no request is left (the engine is about to go idle).
# * The graceful paths flush the rest: vLLM's shutdown (``KvbmConnector.shutdown``, run on SIGTERM
#   when the engine core gets the time, e.g. ``--shutdown-timeout 20``) and ``atexit`` (the
#   in-process engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). kvbm installs no signal handler of
#   its own: vLLM owns SIGTERM in its processes, and a handler that interrupted a catalog txn on
#   the main thread could not safely open another.


@dataclass
class _Req:
    request: Any
    extra: bytes | None  # per-request keys folded into every block hash (LoRA, salt, mm)
    # Note [Per-request hash cache]: every block is hashed once per request, into `arr` (rows
    # 0..num_hashed, capacity doubling); `hashes` holds the first rows as bytes objects, made
    # only for blocks something needs one for (a hit being loaded, a store, an event), so a
    # lookup creates no Python object per block. Both go when the request finishes.
    hashes: list[bytes] = field(default_factory=list)
    arr: np.ndarray = field(default_factory=lambda: np.empty((0, 16), np.uint8))
    num_hashed: int = 0
    block_ids: list[int] = field(default_factory=list)
    stored_upto: int = 0  # blocks below this index were stored or skipped
    local_blocks: int = 0  # vLLM's own prefix-cache hit, in blocks, at the last lookup
    hit_tiers: list[str] = field(default_factory=list)  # tiers of the planned external hit
    hit_host_tokens: int = 0
    hit_disk_tokens: int = 0
    loaded_at: dict[bytes, int] = field(default_factory=dict)  # hash -> block index of a planned load


@dataclass
class LookupStats:
    """Latency the connector adds to scheduling: hashing + index lookup per call."""

    calls: int = 0
    total_ns: int = 0
    max_ns: int = 0
    samples_ns: list[int] = field(default_factory=list)

    def add(self, ns: int) -> None:
        self.calls += 1
        self.total_ns += ns
        self.max_ns = max(self.max_ns, ns)
        if len(self.samples_ns) < 100_000:
            self.samples_ns.append(ns)


class KvbmScheduler:
    """Decides hits, loads, stores and evictions; holds no KV bytes."""

    def __init__(self, cfg: ConnectorConfig, geo: Geometry) -> None:
        self.cfg = cfg
        self.geo = geo
        self.bs = geo.block_size
        self._ns_digest = geo.namespace.digest  # what kvbm.hashing.block_hashes resolves, once
        self._hash_algo = geo.namespace.hash_algorithm
        catalog = None
        if cfg.disk_path:
            k = cfg.kvbm
            catalog = disk.open_catalog(cfg.disk_path, [geo.rank_namespace(r).digest for r in range(geo.tp_world)],
                                        geo.slot_bytes, k.disk_capacity_bytes, k.disk_durability,
                                        k.eviction_policy)
        self.index = TierIndex(cfg.kvbm, geo.slot_bytes, catalog, geo.tp_world,
                               disk.catalog_namespace(geo.namespace.digest))
        # write_behind: blocks go to disk when the host tier evicts them (and straight to disk
        # when no host slot is free); write_through: every stored block is also written to disk.
        self.write_behind = catalog is not None and cfg.kvbm.disk_write_policy == "write_behind"
        self.index.keep_host_victims = self.write_behind
        self._reqs: dict[str, _Req] = {}
        self._loads: list[LoadOp] = []
        self._event_info: dict[bytes, tuple[bytes | None, list[int], str | None]] = {}
        self.lookup_stats = LookupStats()
        self._stall_warned = False
        self._load_t0: dict[str, float] = {}  # request id -> when its asynchronous load was planned
        self._load_samples: list[float] = []  # seconds per finished asynchronous load, until taken
        self.async_load_reqs = 0  # requests whose hit was loaded asynchronously
        self.async_load_blocks = 0
        self.pd = (PdScheduler(cfg.pd, self.index, geo.namespace.digest, self.bs, geo.tp_world, geo.slot_bytes)
                   if cfg.pd is not None else None)
        if catalog is not None:
            atexit.register(self.shutdown)
            logger.info("kvbm: disk tier %s holds %d blocks of this namespace (catalog reopened in %.3f s, "
                        "%d records dropped at open)", catalog.path, len(catalog), catalog.rebuild_seconds,
                        catalog.counters["dropped_at_open"])

    # -- per-request hashing ---------------------------------------------------------------
    def _req(self, request: Any) -> _Req | None:
        st = self._reqs.get(request.request_id)
        if st is not None:
            return st
        if getattr(request, "prompt_embeds", None) is not None:
            return None  # KV depends on embeddings, not token ids
        extras: list[tuple[str, Any]] = []
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            extras.append(("lora", getattr(lora, "lora_name", str(lora))))
        salt = getattr(request, "cache_salt", None)
        if salt is not None:
            extras.append(("salt", salt))
        for f in getattr(request, "mm_features", None) or ():
            extras.append(("mm", (f.identifier, f.mm_position.offset)))
        extra = repr(extras).encode() if extras else None
        st = _Req(request=request, extra=extra)
        self._reqs[request.request_id] = st
        return st

    def _hash_rows(self, st: _Req, num_blocks: int) -> np.ndarray:
        """The request's first ``num_blocks`` chained hashes as a ``(num_blocks, 16)`` view;
        only blocks not hashed before are hashed (Note [Per-request hash cache])."""
        have = st.num_hashed
        if have < num_blocks:
            req = st.request
            lo, hi = have * self.bs, num_blocks * self.bs
            # The prompt is a plain list (or an integer array), read in place by the binding;
            # tokens past it (a preempted request's outputs) come from all_token_ids (vLLM's
            # ConstantList, sliced once).
            toks = getattr(req, "prompt_token_ids", None)
            if not isinstance(toks, (list, np.ndarray)) or hi > len(toks):
                toks = req.all_token_ids
            new = _native.block_hashes(toks, self.bs, self._ns_digest, self._hash_algo, st.extra,
                                       bytes(st.arr[have - 1]) if have else None, start=lo, stop=hi)
            if len(st.arr) < num_blocks:
                grown = np.empty((max(num_blocks, 2 * len(st.arr)), 16), np.uint8)
                grown[:have] = st.arr[:have]
                st.arr = grown
            st.arr[have:num_blocks] = new
            st.num_hashed = num_blocks
        return st.arr[:num_blocks]

    def _hashes(self, st: _Req, num_blocks: int) -> list[bytes]:
        """The request's first ``num_blocks`` chained hashes as bytes objects."""
        have = len(st.hashes)
        if have < num_blocks:
            raw = self._hash_rows(st, num_blocks)[have:].tobytes()
            st.hashes.extend([raw[i:i + 16] for i in range(0, len(raw), 16)])
        return st.hashes[:num_blocks]

    # -- vLLM scheduler API ----------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        t0 = time.perf_counter_ns()
        st = self._req(request)
        if st is None:
            return 0, False
        # Never claim the last token: vLLM must compute at least one token to sample from.
        max_blocks = (request.num_tokens - 1) // self.bs
        start = num_computed_tokens // self.bs
        st.local_blocks = start
        st.hit_tiers = []
        if start >= max_blocks:
            self.lookup_stats.add(time.perf_counter_ns() - t0)
            if self.pd is not None:
                self.pd.unneeded(request)
            return 0, False
        rows = self._hash_rows(st, max_blocks)
        tiers = self.index.lookup(rows[start:])
        if self.pd is not None:  # prefill/decode: blocks a producer offered in kv_transfer_params
            tiers = self.pd.match(request, self._hashes(st, max_blocks), start, tiers)
        self.lookup_stats.add(time.perf_counter_ns() - t0)
        if len(tiers) < self.cfg.min_hit_blocks:
            if self.pd is not None:
                self.pd.drop_offer(request.request_id)  # a remote hit that will not be pulled
            return 0, False
        st.hit_tiers = tiers
        return len(tiers) * self.bs, self.cfg.async_load

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        st = self._reqs[request.request_id]
        block_ids = blocks.get_block_ids()[0]
        n = num_external_tokens // self.bs
        tiers = st.hit_tiers[:n]
        hashes = self._hashes(st, st.local_blocks + n)[st.local_blocks:]
        assert len(tiers) == n == len(hashes), "external hit changed between lookup and allocation"
        for i, (h, tier) in enumerate(zip(hashes, tiers)):
            crcs: tuple[int, ...] = ()
            if tier == "host":
                slot = self.index.host_slot(h)
            elif tier == "disk":
                slot, crcs = self.index.disk_load(h)
            else:
                slot = -1
            op = LoadOp(block_ids[st.local_blocks + i], tier, slot, h, request.request_id, self.cfg.async_load, crcs)
            st.loaded_at[h] = st.local_blocks + i
            if tier == "remote":
                op.remote, op.slot = self.pd.remote_source(request.request_id, st.local_blocks + i)
            self._loads.append(op)
        if self.pd is not None:
            self.pd.loaded(request.request_id, tiers.count("remote"))
        if self.cfg.async_load:
            # vLLM keeps the request in WAITING_FOR_REMOTE_KVS until the workers report it finished.
            self._load_t0[request.request_id] = time.perf_counter()
            self.async_load_reqs += 1
            self.async_load_blocks += n
        st.hit_host_tokens = tiers.count("host") * self.bs
        st.hit_disk_tokens = tiers.count("disk") * self.bs
        self.index.stats.hit_blocks_host += tiers.count("host")
        self.index.stats.hit_blocks_disk += tiers.count("disk")

    def hit_sources(self, request: Any) -> tuple[int, int]:
        st = self._reqs.get(request.request_id)
        return (st.hit_host_tokens, st.hit_disk_tokens) if st else (0, 0)

    def build_connector_meta(self, so: Any) -> KvbmConnectorMetadata:
        stores: list[StoreOp] = []
        to_disk: list[tuple[StoreOp, bytes | None]] = []  # disk slots are reserved in one batch below
        if self.pd is not None:
            self.pd.expire()
        todo: list[tuple[_Req, int]] = []
        for nr in so.scheduled_new_reqs:
            st = self._reqs.get(nr.req_id)
            if st is None:
                continue
            st.block_ids = list(nr.block_ids[0])
            todo.append((st, nr.num_computed_tokens + so.num_scheduled_tokens.get(nr.req_id, 0)))
        cr = so.scheduled_cached_reqs
        for i, req_id in enumerate(cr.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new = cr.new_block_ids[i]
            if req_id in cr.resumed_req_ids:
                st.block_ids = list(new[0]) if new is not None else []
            elif new is not None:
                st.block_ids.extend(new[0])
            todo.append((st, cr.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)))
        disk_on = bool(self.cfg.disk_path)
        for st, computed_after in todo:
            req = st.request
            full = min(computed_after, len(req.all_token_ids)) // self.bs
            if not self.cfg.store_decode_blocks:
                full = min(full, req.num_prompt_tokens // self.bs)
            full = min(full, len(st.block_ids))
            if full <= st.stored_upto:
                continue
            hashes = self._hashes(st, full)
            for idx in range(st.stored_upto, full):
                h = hashes[idx]
                in_host, in_disk = self.index.has(h)
                if in_host:
                    continue
                parent = hashes[idx - 1] if idx else None
                slot = self.index.prepare_host(h, parent)
                want_disk = disk_on and not in_disk and (slot is None or not self.write_behind)
                if slot is None and not want_disk:
                    continue
                # slot None: every host slot is pinned by in-flight disk writes: write this block
                # to disk straight from vLLM's buffer (the worker copies it out first).
                op = StoreOp(st.block_ids[idx], -1 if slot is None else slot, h, want_disk, req.request_id)
                stores.append(op)
                if want_disk:
                    to_disk.append((op, parent))
                if len(self._event_info) < _MAX_PENDING_EVENTS:
                    lora = getattr(req, "lora_request", None)
                    self._event_info[h] = (hashes[idx - 1] if idx else None,
                                           list(req.all_token_ids[idx * self.bs:(idx + 1) * self.bs]),
                                           getattr(lora, "lora_name", None))
            st.stored_upto = full
        demotes: list[StoreOp] = []
        if self.write_behind:
            # Host victims of this step: their slots are reused by this step's stores, so the
            # worker copies them out first; they are on disk once every rank reported the write.
            for v, parent, hslot in self.index.host_victims:
                if not self.index.has(v)[1]:
                    op = StoreOp(-1, hslot, v, True)
                    demotes.append(op)
                    to_disk.append((op, parent))
            self.index.host_victims.clear()
        if to_disk:
            slots = self.index.reserve_disk([(op.block_hash, parent) for op, parent in to_disk])
            for (op, _), ds in zip(to_disk, slots, strict=True):
                op.disk_slot = ds
                op.to_disk = ds >= 0
                if op.to_disk and op.slot >= 0 and op.block_id >= 0:
                    self.index.pin_for_disk_write(op.block_hash)
            stores = [op for op in stores if op.slot >= 0 or op.to_disk]
            demotes = [op for op in demotes if op.to_disk]
        meta = KvbmConnectorMetadata(loads=self._loads, stores=stores, demotes=demotes)
        if self.pd is not None:
            meta.pd_unused = self.pd.take_unused()
        self._loads = []
        return meta

    def update_connector_output(self, meta: Any) -> None:
        if not isinstance(meta, KvbmWorkerMetadata):
            return
        idx = self.index
        for h, n in meta.store_failed.items():
            idx.complete_host(h, n, ok=False)
        for h, n in meta.stored.items():
            idx.complete_host(h, n, ok=True)
        if meta.disk_written or meta.disk_failed:
            idx.complete_disk(meta.disk_written, meta.disk_failed, meta.disk_crcs)
        for h in meta.load_failed:
            # The block failed verification (or could not be read) on some rank: forget it
            # everywhere (its catalog record is deleted), so it is recomputed and stored afresh.
            idx.drop(h, "checksum_failures" if h in meta.load_corrupt else "read_errors")
            idx.stats.checksum_failures += h in meta.load_corrupt
            idx.stats.failed_loads += 1
            # vLLM recomputes the request from that block on (and the worker refused the stores of
            # its step): plan those blocks' stores again when they are computed.
            for st in self._reqs.values():
                i = st.loaded_at.get(h)
                if i is not None:
                    st.stored_upto = min(st.stored_upto, i)
        self._maybe_flush()
        if self.pd is not None:
            self.pd.on_stores_reported()
            self.pd.on_released(meta.pd_released)
            self.pd.on_pulled(meta.pd_pulled_blocks, meta.pd_pull_ns)

    def request_finished(self, request: Any) -> dict[str, Any] | None:
        """Forget the request; returns the ``kv_transfer_params`` of a P/D producer, else None."""
        # Stores are synchronous within the step that computed the block, so nothing is in
        # flight that still reads this request's vLLM blocks; vLLM itself keeps the blocks of a
        # request finished during an asynchronous load until the workers report that load done.
        st = self._reqs.pop(request.request_id, None)
        self._load_t0.pop(request.request_id, None)
        self._maybe_flush()
        if self.pd is None:
            return None
        # A consumer request that never pulled its offer (aborted before it was scheduled, or
        # its load never planned): let the producer unpin the blocks now, not after pd_lease_s.
        self.pd.unneeded(request)
        self.pd.forget(request.request_id)
        if st is None or not self.pd.cfg.produce:
            return None
        return self.pd.request_finished(request, self._hashes(st, request.num_prompt_tokens // self.bs))

    def loads_finished(self, req_ids: Any) -> None:
        """Requests whose asynchronous loads every worker reported done (vLLM's ``finished_recving``)."""
        now = time.perf_counter()
        for r in req_ids or ():
            t0 = self._load_t0.pop(r, None)
            if t0 is not None and len(self._load_samples) < 10_000:
                self._load_samples.append(now - t0)

    def prom_stats(self) -> tuple[dict[str, float], dict[str, float], list[float]]:
        """(cumulative counters, gauges, load-latency samples since the last call), keyed
        ``"<family>|<tier>"`` as :mod:`kvbm.integrations.vllm.stats` exports them."""
        s = self.index.stats
        sb = self.geo.slot_bytes
        host, disk_used = self.index.counts()
        counters = {
            "lookups|host": s.lookup_blocks, "hits|host": s.hit_blocks_host, "hits|disk": s.hit_blocks_disk,
            "stores|host": s.stores_host, "stores|disk": s.stores_disk, "evictions|host": s.evictions_host,
            "evictions|disk": s.evictions_disk, "store_failures|host": s.failed_stores,
            "bytes_stored|host": s.stores_host * sb, "bytes_stored|disk": s.stores_disk * sb,
            "bytes_loaded|host": s.hit_blocks_host * sb, "bytes_loaded|disk": s.hit_blocks_disk * sb,
            "checksum_failures|disk": s.checksum_failures,
        }
        if self.pd is not None:  # P/D consumer: blocks pulled from a prefill instance and verified
            pulled = self.pd.stats.pulled_blocks // max(self.pd.tp, 1)  # reported per rank
            counters["hits|peer"] = pulled
            counters["bytes_loaded|peer"] = pulled * sb
        gauges = {"used_blocks|host": host, "capacity_blocks|host": self.index.num_host_slots,
                  "used_blocks|disk": disk_used, "capacity_blocks|disk": self.index.disk_capacity_blocks,
                  "write_queue_blocks|disk": self.index.disk_writes_pending}
        samples, self._load_samples = self._load_samples, []
        return counters, gauges, samples

    def _maybe_flush(self) -> None:
        """Write disk hits' access times and hit counts to the catalog when due (Note [Shutdown])."""
        idx = self.index
        if idx.unflushed_hits and (not self._reqs or time.monotonic() - idx.last_flush >= METADATA_FLUSH_S):
            idx.flush_metadata()

    def has_pending_work(self) -> bool:
        """Whether vLLM should keep stepping the engine: disk writes planned but not yet reported
        by every rank (they are committed to the catalog only from those reports)."""
        idx = self.index
        if not idx.disk_writes_pending:
            return False
        if time.monotonic() - idx.last_report < PENDING_STALL_S:
            return True
        if not self._stall_warned:
            self._stall_warned = True
            logger.warning("kvbm: %d disk writes not reported for %.0f s: no longer keeping the engine awake "
                           "for them", idx.disk_writes_pending, PENDING_STALL_S)
        return False

    def shutdown(self) -> None:
        """Close the disk catalog (access times and counters written, lock released). Idempotent."""
        self.index.close()

    def take_events(self) -> Iterable[Any]:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        idx = self.index
        out: list[Any] = []
        for medium, added in (("CPU", idx.added_host), ("DISK", idx.added_disk)):
            for h in added:
                parent, toks, lora = self._event_info.get(h, (None, [], None))
                out.append(BlockStored(block_hashes=[h], parent_block_hash=parent, token_ids=toks,
                                       block_size=self.bs, lora_id=None, medium=medium, lora_name=lora))
            added.clear()
        for medium, removed in (("CPU", idx.removed.host), ("DISK", idx.removed.disk)):
            if removed:
                out.append(BlockRemoved(block_hashes=list(removed), medium=medium))
                removed.clear()
        # Event info is needed until the block's stores completed in every tier it goes to.
        for h in list(self._event_info):
            if not idx.pending(h):
                del self._event_info[h]
        return out

    def stats(self) -> dict[str, Any]:
        s = self.index.stats
        ls = self.lookup_stats
        return {
            **s.__dict__,
            "host_blocks": self.index.counts()[0],
            "disk_blocks": self.index.counts()[1],
            "async_load_reqs": self.async_load_reqs,
            "async_load_blocks": self.async_load_blocks,
            "lookup_calls": ls.calls,
            "lookup_mean_us": (ls.total_ns / ls.calls / 1e3) if ls.calls else 0.0,
            "lookup_max_us": ls.max_ns / 1e3,
            **(self.pd.stats_dict() if self.pd is not None else {}),
        }
