"""Scheduler-side bookkeeping of the vLLM connector: which blocks each tier holds, where.

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

import enum
from collections import OrderedDict
from dataclasses import dataclass, field


class State(enum.Enum):
    PENDING = 0  # store planned, not yet confirmed by every worker
    READY = 1  # stored and confirmed: visible to lookups


@dataclass
class HostEntry:
    slot: int
    state: State = State.PENDING
    pending_reports: int = 0
    disk_pin: bool = False  # a write-through to disk still reads this slot


@dataclass
class DiskEntry:
    state: State = State.PENDING
    pending_reports: int = 0


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
    """Host and disk residency of blocks, LRU eviction and host slot allocation.

    All methods are O(blocks touched); nothing scans the whole index except :meth:`__init__`
    when it adopts the blocks found on disk.
    """

    def __init__(self, num_host_slots: int, disk_capacity_blocks: int, num_reporters: int) -> None:
        self.num_host_slots = num_host_slots
        self.disk_capacity_blocks = disk_capacity_blocks
        self.num_reporters = num_reporters
        self.host: OrderedDict[bytes, HostEntry] = OrderedDict()
        self.disk: OrderedDict[bytes, DiskEntry] = OrderedDict()
        self._free_slots = list(range(num_host_slots - 1, -1, -1))
        self.stats = IndexStats()
        self.removed = Evictions()  # blocks that left a tier since the last drain (for KV events)
        self.added_host: list[bytes] = []
        self.added_disk: list[bytes] = []

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[str]:
        """Tiers (``"host"``/``"disk"``) of the longest prefix of ``hashes`` that is READY."""
        tiers: list[str] = []
        self.stats.lookups += 1
        self.stats.lookup_blocks += len(hashes)
        for h in hashes:
            e = self.host.get(h)
            if e is not None and e.state is State.READY:
                tiers.append("host")
                continue
            d = self.disk.get(h)
            if d is not None and d.state is State.READY:
                tiers.append("disk")
                continue
            break
        return tiers

    def host_slot(self, h: bytes) -> int:
        return self.host[h].slot

    def touch(self, hashes: list[bytes]) -> None:
        """Mark as most recently used in every tier holding them."""
        for h in hashes:
            if h in self.host:
                self.host.move_to_end(h)
            if h in self.disk:
                self.disk.move_to_end(h)

    def has(self, h: bytes) -> tuple[bool, bool]:
        """(present or pending in host, present or pending on disk)."""
        return h in self.host, h in self.disk

    # -- stores ----------------------------------------------------------------------------
    def prepare_host(self, h: bytes) -> int | None:
        """Allocate a host slot for ``h`` (evicting the LRU evictable block); None when all pinned."""
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = None
            for vh, ve in self.host.items():
                if ve.state is State.READY and not ve.disk_pin:
                    victim = vh
                    break
            if victim is None:
                return None
            slot = self.host.pop(victim).slot
            self.removed.host.append(victim)
            self.stats.evictions_host += 1
        self.host[h] = HostEntry(slot=slot, pending_reports=self.num_reporters)
        return slot

    def prepare_disk(self, h: bytes, deletes: list[bytes]) -> bool:
        """Reserve a disk place for ``h``; evicted hashes are appended to ``deletes``."""
        if self.disk_capacity_blocks <= 0:
            return False
        while len(self.disk) >= self.disk_capacity_blocks:
            victim = None
            for vh, ve in self.disk.items():
                if ve.state is State.READY:
                    victim = vh
                    break
            if victim is None:
                return False
            del self.disk[victim]
            deletes.append(victim)
            self.removed.disk.append(victim)
            self.stats.evictions_disk += 1
        self.disk[h] = DiskEntry(pending_reports=self.num_reporters)
        return True

    def complete_host(self, h: bytes, reports: int, ok: bool) -> None:
        e = self.host.get(h)
        if e is None or e.state is State.READY:
            return
        if not ok:
            self._drop_host(h)
            self.stats.failed_stores += 1
            return
        e.pending_reports -= reports
        if e.pending_reports <= 0:
            e.state = State.READY
            self.added_host.append(h)
            self.stats.stores_host += 1

    def complete_disk(self, h: bytes, reports: int, ok: bool) -> None:
        """A write-through to disk finished on ``reports`` workers (or failed on one)."""
        d = self.disk.get(h)
        done = True
        if d is not None and d.state is State.PENDING:
            if not ok:
                del self.disk[h]
                self.stats.failed_stores += 1
            else:
                d.pending_reports -= reports
                if d.pending_reports <= 0:
                    d.state = State.READY
                    self.added_disk.append(h)
                    self.stats.stores_disk += 1
                else:
                    done = False
        e = self.host.get(h)
        if done and e is not None:
            e.disk_pin = False

    def adopt_disk(self, hashes: list[bytes]) -> list[bytes]:
        """Register blocks found on disk at start-up (oldest first); returns hashes over capacity."""
        over: list[bytes] = []
        for h in hashes:
            self.disk[h] = DiskEntry(state=State.READY)
        while len(self.disk) > self.disk_capacity_blocks:
            victim, _ = self.disk.popitem(last=False)
            over.append(victim)
        return over

    # -- failures --------------------------------------------------------------------------
    def drop(self, h: bytes) -> None:
        """Forget ``h`` in every tier (e.g. it failed verification on load)."""
        if h in self.host:
            self._drop_host(h)
        if self.disk.pop(h, None) is not None:
            self.removed.disk.append(h)

    def _drop_host(self, h: bytes) -> None:
        e = self.host.pop(h)
        self._free_slots.append(e.slot)
        if e.state is State.READY:
            self.removed.host.append(h)
