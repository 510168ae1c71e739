"""Scheduler-side bookkeeping of the vLLM connector, over kvbm's native block index.

Note [Scheduler/worker split]
-----------------------------
vLLM runs the connector twice: a scheduler half in the engine-core process and a worker half in
every worker process; in the default multi-process mode they share no memory. The worker halves
own the bytes (a host arena of fixed-size slots per worker, and the slab files of its shard on
disk); the scheduler half owns *all* decisions: which hashes are present, which host or disk slot
a new block goes to, which block is evicted (the disk catalog, an LMDB ``DiskCatalog``, lives
here too: see Note [Connector disk tier] in disk.py). So a lookup is a probe of the native index
in the scheduler's own process, with no round trip to a worker; disk residency is mirrored there
from the catalog.

Decisions travel to the workers inside the per-step connector metadata as small plans (vLLM
block id, slot, hash); workers execute them in order and report back, through the worker
metadata of the same step, which stores completed and which loads failed verification. A block
becomes visible to lookups only after every tensor-parallel rank has reported its store
(``PENDING`` -> ``READY``); a failed store or a block that failed its checksum is dropped.

Ordering invariant that makes pins unnecessary for loads: a worker runs a step's loads (in
``start_load_kv``) before that step's stores and deletions (in ``wait_for_save``), and metas are
executed in the order they were built. Synchronous loads finish before the step's stores; a
worker waits for an asynchronous load still reading a host or disk slot before it writes that
slot. Host slots that are still being written through to disk are pinned (not evictable) until
the disk write is reported by every rank.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kvbm import BlockManager, KvbmConfig, Tier
from kvbm.errors import CapacityError, KvbmError
from kvbm.tiers.disk import DiskCatalog

logger = logging.getLogger("kvbm.vllm")

HOST = int(Tier.HOST)
DISK = int(Tier.DISK)


@dataclass
class IndexStats:
    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks_host: int = 0
    hit_blocks_disk: int = 0
    stores_host: int = 0
    stores_disk: int = 0
    evictions_host: int = 0
    evictions_disk: int = 0
    failed_loads: int = 0
    failed_stores: int = 0
    checksum_failures: int = 0


@dataclass
class _DiskWrite:
    """A disk slot reserved for a block whose shards are being written by the ranks."""

    slot: int
    parent: bytes | None
    left: int  # rank reports still expected
    failed: bool = False
    crcs: dict[int, int] = field(default_factory=dict)


@dataclass
class Evictions:
    host: list[bytes] = field(default_factory=list)
    disk: list[bytes] = field(default_factory=list)


class TierIndex:
    """Host and disk residency of blocks, eviction and slot allocation, for the scheduler half.

    Every method is O(blocks touched). Reports from workers are counted per hash until every
    tensor-parallel rank (``num_reporters``) has reported, then committed to the native index.
    """

    def __init__(self, config: KvbmConfig, slot_bytes: int, disk: DiskCatalog | None,
                 num_reporters: int, disk_namespace: int = 0) -> None:
        self.mgr = BlockManager(config, block_bytes=slot_bytes, allocate_memory=False)
        self.idx = self.mgr.index
        self.num_host_slots = self.mgr.host_slots
        self.slot_bytes = slot_bytes
        self.disk = disk
        self.disk_ns = disk_namespace
        self.disk_capacity_blocks = disk.geometry.num_slots if disk is not None else 0
        self.num_reporters = num_reporters
        self._pending_host: Counter = Counter()  # hash -> reports still expected
        self._pending_disk: dict[bytes, _DiskWrite] = {}
        self._disk_pinned: set[bytes] = set()  # host blocks pinned while written to disk
        self._tiers = np.empty(4096, dtype=np.uint8)
        self.stats = IndexStats()
        self.removed = Evictions()  # blocks that left a tier since the last drain (KV events)
        self.added_host: list[bytes] = []
        self.added_disk: list[bytes] = []
        self.keep_host_victims = False  # write-behind: collect host victims (hash, parent, slot) to demote
        self.host_victims: list[tuple[bytes, bytes | None, int]] = []
        self.unflushed_hits = 0  # disk hits (access time, hit count) not yet written to the catalog
        self.last_flush = time.monotonic()
        self.last_report = time.monotonic()  # last worker report of a finished disk write
        if disk is not None:
            self.idx.configure_tier(DISK, self.disk_capacity_blocks, slot_bytes, config.eviction_policy)
            self._mirror_catalog()

    def _mirror_catalog(self) -> None:
        """Make the catalog's committed blocks visible to lookups (start-up; no directory scan)."""
        assert self.disk is not None
        bad: list[bytes] = []
        committed = self.disk.keys()
        for k in committed:
            try:
                self.idx.restore(DISK, k, None, self.disk.slot_of(k))
            except KvbmError as e:  # not a block hash of this connector (e.g. a foreign record)
                logger.warning("kvbm: disk catalog record %s not usable (%s): dropped", k.hex()[:32], e)
                bad.append(k)
        if bad:
            self.disk.drop(bad)

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, hashes: list[bytes] | np.ndarray) -> list[str]:
        """Tiers (``"host"``/``"disk"``) of the longest prefix of ``hashes`` (a list of 16-byte
        hashes or an ``(n, 16)`` uint8 array) that is Ready."""
        self.stats.lookups += 1
        self.stats.lookup_blocks += len(hashes)
        if len(hashes) == 0:
            return []
        if len(self._tiers) < len(hashes):
            self._tiers = np.empty(2 * len(hashes), dtype=np.uint8)
        n = self.mgr.lookup_into(hashes, self._tiers)
        got = self._tiers[:n]
        if n and (got == got[0]).all():  # one tier for the whole hit: no per-block Python work
            return ["host" if got[0] == HOST else "disk"] * n
        return ["host" if t == HOST else "disk" for t in got.tolist()]

    def host_slot(self, h: bytes) -> int:
        return int(self.idx.get(h)["slot"][HOST])

    def has(self, h: bytes) -> tuple[bool, bool]:
        """(present or being stored in host, present or being stored on disk)."""
        e = self.idx.get(h)
        in_host = e is not None and e["state"][HOST] != "absent"
        return in_host, self.disk is not None and (h in self.disk or self.disk.is_reserved(h))

    # -- stores ----------------------------------------------------------------------------
    def prepare_host(self, h: bytes, parent: bytes | None) -> int | None:
        """Reserve a host slot for ``h`` (evicting per policy); None when nothing is evictable."""
        try:
            slots, evicted = self.idx.prepare_store(HOST, [h], parent)
        except CapacityError:
            return None
        for e in evicted:
            self.removed.host.append(bytes(e[0]))
            self.stats.evictions_host += 1
            if self.keep_host_victims:
                self.host_victims.append((bytes(e[0]), bytes(e[1]) if e[1] else None, int(e[2])))
        self._pending_host[h] = self.num_reporters
        return int(slots[0])

    def reserve_disk(self, items: list[tuple[bytes, bytes | None]]) -> list[int]:
        """Reserve a disk slot for each ``(hash, parent)``; -1 where none can be had.

        Victims are deleted from the catalog (committed) before this returns: evict first, then
        write. Every reserved slot is committed or aborted once every rank reported its write.
        """
        if self.disk is None or not items:
            return [-1] * len(items)
        if not self._pending_disk:
            self.last_report = time.monotonic()  # the stall clock of has_pending_work starts now
        victims: list[bytes] = []
        slots = self.disk.reserve([h for h, _ in items], victims)
        for v in victims:
            with contextlib.suppress(KvbmError):
                self.idx.remove(DISK, [v], True)
            self.removed.disk.append(v)
            self.stats.evictions_disk += 1
        for (h, parent), s in zip(items, slots, strict=True):
            if s >= 0:
                self._pending_disk[h] = _DiskWrite(s, parent, self.num_reporters)
        return slots

    def pin_for_disk_write(self, h: bytes) -> None:
        """Keep ``h``'s host slot from being reused until its disk write is reported."""
        self._disk_pinned.add(h)

    def complete_host(self, h: bytes, reports: int, ok: bool) -> None:
        if h not in self._pending_host:
            return
        if not ok:
            del self._pending_host[h]
            self.idx.complete_store(HOST, [h], np.zeros(1, np.uint8))
            self.stats.failed_stores += 1
            self._disk_pinned.discard(h)
            return
        self._pending_host[h] -= reports
        if self._pending_host[h] > 0:
            return
        del self._pending_host[h]
        self.idx.complete_store(HOST, [h])
        self.added_host.append(h)
        self.stats.stores_host += 1
        if h in self._disk_pinned:
            if h in self._pending_disk:
                self.idx.prepare_load(HOST, [h])  # pin; released in complete_disk
            else:
                self._disk_pinned.discard(h)

    def complete_disk(self, written: Counter, failed: Counter, crcs: dict[bytes, dict[int, int]]) -> None:
        """Rank reports of disk writes; blocks every rank reported are committed (one catalog txn)
        when all succeeded, their slots released otherwise."""
        if self.disk is None:
            return
        if written or failed:
            self.last_report = time.monotonic()
        for reports, ok in ((written, True), (failed, False)):
            for h, n in reports.items():
                w = self._pending_disk.get(h)
                if w is None:
                    continue
                w.left -= n
                if ok:
                    w.crcs.update(crcs.get(h, {}))
                else:
                    w.failed = True
        done = [h for h, w in self._pending_disk.items() if w.left <= 0]
        if not done:
            return
        ws = [self._pending_disk.pop(h) for h in done]
        ranks = range(self.num_reporters)
        oks = [not w.failed and all(r in w.crcs for r in ranks) for w in ws]
        shard = [[w.crcs.get(r, 0) for r in ranks] for w in ws]
        stored = self.disk.commit(done, [w.slot for w in ws], [self.slot_bytes] * len(ws), [c[0] for c in shard],
                                  oks, self.disk_ns, [w.parent for w in ws],
                                  shard if self.disk.shards > 1 else None)
        self.unflushed_hits = 0  # the commit txn wrote them
        for h, w, ok in zip(done, ws, stored, strict=True):
            if ok:
                try:
                    self.idx.restore(DISK, h, None, w.slot)
                except KvbmError as e:  # the mirror disagrees with the catalog: keep them equal
                    logger.error("kvbm: disk block %s committed but not indexed (%s): dropped", h.hex()[:16], e)
                    self.disk.drop([h])
                else:
                    self.added_disk.append(h)
                    self.stats.stores_disk += 1
            else:
                self.stats.failed_stores += 1
            if h in self._disk_pinned:
                self._disk_pinned.discard(h)
                e = self.idx.get(h)
                if e is not None and e["pins"][HOST] > 0:
                    self.idx.complete_load(HOST, [h])

    def disk_load(self, h: bytes) -> tuple[int, tuple[int, ...]]:
        """(disk slot, CRC32C of every rank's shard) of a committed block, noting the hit."""
        assert self.disk is not None
        slot = self.disk.slot_of(h)
        self.disk.record_hit(slot)
        self.unflushed_hits += 1
        return slot, tuple(self.disk.shard_crcs(slot))

    # -- failures --------------------------------------------------------------------------
    def drop(self, h: bytes, reason: str | None = None) -> None:
        """Forget ``h`` in every tier (e.g. it failed verification on load); on disk the record is
        deleted from the catalog (``reason``: a catalog counter, e.g. ``"checksum_failures"``)."""
        try:
            if self.idx.remove(HOST, [h], True):
                self.removed.host.append(h)
        except KvbmError:
            pass  # pinned or in flight in the host tier: it goes through its own completion
        if self.disk is not None and self.disk.drop([h], reason):
            with contextlib.suppress(KvbmError):
                self.idx.remove(DISK, [h], True)
            self.removed.disk.append(h)

    def pending(self, h: bytes) -> bool:
        """Whether a store of ``h`` still awaits worker reports in some tier."""
        return h in self._pending_host or h in self._pending_disk

    def counts(self) -> tuple[int, int]:
        """(host blocks, disk blocks) currently used (Storing + Ready)."""
        host = self.idx.tier_info(HOST)["used_slots"]
        disk = len(self.disk) + self.disk.reserved if self.disk is not None else 0
        return int(host), int(disk)

    @property
    def disk_writes_pending(self) -> int:
        """Disk writes planned whose rank reports have not all arrived (not committed yet)."""
        return len(self._pending_disk)

    def flush_metadata(self) -> None:
        """Write the catalog's pending access times, hit counts and counters (one txn)."""
        if self.disk is not None:
            self.disk.flush()
        self.unflushed_hits = 0
        self.last_flush = time.monotonic()

    def close(self) -> None:
        """Write the catalog's access times and counters and release its lock. Idempotent."""
        if self.disk is not None:
            self.disk.close()
        self.unflushed_hits = 0
