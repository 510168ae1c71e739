"""Scheduler-side bookkeeping of the vLLM connector, over kvbm's native block index.

Note [Scheduler/worker split]
-----------------------------
vLLM runs the connector twice: a scheduler half in the engine-core process and a worker half in
every worker process; in the default multi-process mode they share no memory. The worker halves
own the bytes (a host arena of fixed-size slots per worker, and a directory of block files on
disk); the scheduler half owns *all* decisions: which hashes are present, which host slot a new
block goes to, which block is evicted. So a lookup is a dictionary probe in the scheduler's own
process, with no round trip to a worker.

Decisions travel to the workers inside the per-step connector metadata as small plans (vLLM
block id, slot, hash); workers execute them in order and report back, through the worker
metadata of the same step, which stores completed and which loads failed verification. A block
becomes visible to lookups only after every tensor-parallel rank has reported its store
(``PENDING`` -> ``READY``); a failed store or a block that failed its checksum is dropped.

Ordering invariant that makes pins unnecessary for loads: a worker runs a step's loads (in
``start_load_kv``) before that step's stores and deletions (in ``wait_for_save``), and metas are
executed in the order they were built. Loads are synchronous, so a slot read by a load planned
in step N is never overwritten by a store planned in step N or later. Host slots that are still
being written through to disk are pinned (not evictable) until the disk write is reported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kvbm import BlockManager, KvbmConfig, Tier
from kvbm.errors import CapacityError, KvbmError

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


@dataclass
class Evictions:
    host: list[bytes] = field(default_factory=list)
    disk: list[bytes] = field(default_factory=list)


class TierIndex:
    """Host and disk residency of blocks, eviction and slot allocation, for the scheduler half.

    Every method is O(blocks touched). Reports from workers are counted per hash until every
    tensor-parallel rank (``num_reporters``) has reported, then committed to the native index.
    """

    def __init__(self, config: KvbmConfig, slot_bytes: int, disk_capacity_blocks: int,
                 num_reporters: int) -> None:
        self.mgr = BlockManager(config, block_bytes=slot_bytes, allocate_memory=False)
        self.idx = self.mgr.index
        self.num_host_slots = self.mgr.host_slots
        self.disk_capacity_blocks = disk_capacity_blocks
        if disk_capacity_blocks > 0:
            self.idx.configure_tier(DISK, disk_capacity_blocks, slot_bytes, config.eviction_policy)
        self.num_reporters = num_reporters
        self._pending_host: Counter = Counter()  # hash -> reports still expected
        self._pending_disk: Counter = Counter()
        self._disk_pinned: set[bytes] = set()  # host blocks pinned while written to disk
        self._tiers = np.empty(4096, dtype=np.uint8)
        self.stats = IndexStats()
        self.removed = Evictions()  # blocks that left a tier since the last drain (KV events)
        self.added_host: list[bytes] = []
        self.added_disk: list[bytes] = []

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[str]:
        """Tiers (``"host"``/``"disk"``) of the longest prefix of ``hashes`` that is Ready."""
        self.stats.lookups += 1
        self.stats.lookup_blocks += len(hashes)
        if not hashes:
            return []
        if len(self._tiers) < len(hashes):
            self._tiers = np.empty(2 * len(hashes), dtype=np.uint8)
        n = self.mgr.lookup_into(hashes, self._tiers)
        return ["host" if t == HOST else "disk" for t in self._tiers[:n].tolist()]

    def host_slot(self, h: bytes) -> int:
        return int(self.idx.get(h)["slot"][HOST])

    def has(self, h: bytes) -> tuple[bool, bool]:
        """(present or being stored in host, present or being stored on disk)."""
        e = self.idx.get(h)
        if e is None:
            return False, False
        st = e["state"]
        return st[HOST] != "absent", self.disk_capacity_blocks > 0 and st[DISK] != "absent"

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
        self._pending_host[h] = self.num_reporters
        return int(slots[0])

    def prepare_disk(self, h: bytes, parent: bytes | None, deletes: list[bytes]) -> bool:
        """Reserve a disk place for ``h``; evicted hashes are appended to ``deletes``."""
        if self.disk_capacity_blocks <= 0:
            return False
        try:
            _, evicted = self.idx.prepare_store(DISK, [h], parent)
        except CapacityError:
            return False
        for e in evicted:
            deletes.append(bytes(e[0]))
            self.removed.disk.append(bytes(e[0]))
            self.stats.evictions_disk += 1
        self._pending_disk[h] = self.num_reporters
        return True

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

    def complete_disk(self, h: bytes, reports: int, ok: bool) -> None:
        """A write-through to disk finished on ``reports`` workers (or failed on one)."""
        if h not in self._pending_disk:
            return
        if ok:
            self._pending_disk[h] -= reports
            if self._pending_disk[h] > 0:
                return
        del self._pending_disk[h]
        self.idx.complete_store(DISK, [h], None if ok else np.zeros(1, np.uint8))
        if ok:
            self.added_disk.append(h)
            self.stats.stores_disk += 1
        else:
            self.stats.failed_stores += 1
        if h in self._disk_pinned:
            self._disk_pinned.discard(h)
            e = self.idx.get(h)
            if e is not None and e["pins"][HOST] > 0:
                self.idx.complete_load(HOST, [h])

    def adopt_disk(self, hashes: list[bytes]) -> list[bytes]:
        """Register blocks found on disk at start-up (oldest first); returns hashes over capacity."""
        keep = hashes[-self.disk_capacity_blocks:] if self.disk_capacity_blocks > 0 else []
        over = hashes[:len(hashes) - len(keep)]
        for slot, h in enumerate(keep):
            self.idx.restore(DISK, h, None, slot)
        return over

    # -- failures --------------------------------------------------------------------------
    def drop(self, h: bytes) -> None:
        """Forget ``h`` in every tier (e.g. it failed verification on load)."""
        for tier, removed in ((HOST, self.removed.host), (DISK, self.removed.disk)):
            if tier == DISK and self.disk_capacity_blocks <= 0:
                continue
            try:
                if self.idx.remove(tier, [h], True):
                    removed.append(h)
            except KvbmError:
                pass  # pinned or in flight in that tier: it goes through its own completion

    def pending(self, h: bytes) -> bool:
        """Whether a store of ``h`` still awaits worker reports in some tier."""
        return h in self._pending_host or h in self._pending_disk

    def counts(self) -> tuple[int, int]:
        """(host blocks, disk blocks) currently used (Storing + Ready)."""
        host = self.idx.tier_info(HOST)["used_slots"]
        disk = self.idx.tier_info(DISK)["used_slots"] if self.disk_capacity_blocks > 0 else 0
        return int(host), int(disk)
