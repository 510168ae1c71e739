"""The BlockManager façade: lookup, store, load, evict and stats over kvbm's tiers.

Design note — bookkeeping apart from byte moving.
    All decisions (which blocks exist, in which tier and slot, what to evict) live in the
    native :class:`kvbm._native.BlockIndex`; bytes move through tier memory objects (the host
    arena here; disk and GPU paths elsewhere). The split-process primitives
    (``prepare_store`` / ``complete_store`` / ``prepare_load`` / ``complete_load``) expose
    exactly the bookkeeping half, so an engine's scheduler process can own the index while its
    workers own the memory (``BlockManager(config, allocate_memory=False)``). The one-call
    ``store`` / ``load`` are those primitives plus the arena copy.

Hashes are 16-byte block hashes from :func:`kvbm.block_hashes` (or any 16-byte keys), given as
a list of ``bytes`` or a ``(n, 16)`` uint8 array. A list of hashes passed to ``store`` is a
chain: hash i's parent is hash i-1 and the first one's is ``parent``.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm import _native
from kvbm.args import block_ids_arg, block_rows, enum_arg, flags_arg, float_arg, int_arg, tiers_out_arg, uint32_arg
from kvbm.config import KvbmConfig
from kvbm.errors import ClosedError, ConfigError, InvalidArgumentError
from kvbm.hashing import Namespace, hash_key, hashes_arg, normalize_hashes, tier_namespace_digest

if TYPE_CHECKING:
    from kvbm.tiers.disk import DiskTier
    from kvbm.tiers.remote import RemoteTier

HashesLike = Sequence[bytes] | np.ndarray
_NO_PARENT = bytes(16)


class Tier(enum.IntEnum):
    """Storage tiers, fastest first (the order lookups prefer)."""

    GPU = 0
    HOST = 1
    DISK = 2
    REMOTE = 3


NO_TIER: int = int(_native.NO_TIER)


@dataclass
class LookupResult:
    """The longest cached prefix of a chain of block hashes.

    Attributes:
        num_hits: number of leading blocks that are cached (in some tier).
        tiers: uint8 array, one per asked block: the fastest tier holding it for the first
            ``num_hits`` blocks, ``NO_TIER`` (255) after.
    """

    num_hits: int
    tiers: np.ndarray

    def tier_of(self, i: int) -> Tier | None:
        """The tier of block ``i``, or None past the hit prefix."""
        t = int(self.tiers[i])
        return None if t == NO_TIER else Tier(t)


@dataclass
class StorePlan:
    """Slots reserved by :meth:`BlockManager.prepare_store`.

    Attributes:
        slots: int64 array, one per hash: the slot to fill, or -1 when the block is already
            present or in flight (nothing to write).
        evicted: blocks evicted to make room: ``(hash, parent, slot, checksum_or_None)``.
            Their bytes are still in those slots until the new blocks are written there.
    """

    tier: Tier
    slots: np.ndarray
    evicted: list[tuple[bytes, bytes, int, int | None]]

    def new_hashes(self, hashes: HashesLike) -> list[bytes]:
        """The hashes that got a slot (the ones to write and then complete)."""
        return [bytes(hashes[i]) for i in np.flatnonzero(self.slots >= 0)]


class EngineTransfer:
    """An offload or onboard in flight; finishing it (``wait``/``poll``) publishes the stored
    blocks or unpins the loaded ones. Exactly once, whatever the outcome."""

    def __init__(
        self, manager: BlockManager, handle: Any, keys: list[bytes], kind: str, slots: np.ndarray | None = None
    ) -> None:
        self._manager = manager
        self._handle = handle
        self._keys = keys
        self._kind = kind
        self._slots = slots  # store: the host slots being filled (Storing until finished)
        self._done = handle is None

    @property
    def num_blocks(self) -> int:
        """Blocks this transfer moves (skipped, already-cached blocks not counted)."""
        return len(self._keys)

    def _finish(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        ix = self._manager.index
        if self._kind == "store":
            flags = np.full(len(self._keys), 1 if ok else 0, np.uint8)
            try:
                if ok and self._slots is not None:  # copied out while Storing: not evictable yet
                    self._manager._write_through_storing(self._keys, self._slots)
            finally:
                ix.complete_store(int(Tier.HOST), self._keys, flags)
        else:
            ix.complete_load(int(Tier.HOST), self._keys)

    def poll(self) -> bool:
        """True once finished; raises the copy's error (after releasing the blocks)."""
        if self._done:
            return True
        try:
            done = self._handle.poll()
        except BaseException:
            self._finish(False)
            raise
        if done:
            self._finish(True)
        return done

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s (None: forever); True when finished. Raises the copy's error."""
        timeout = float_arg(timeout, "timeout", 0.0, 1e9, allow_none=True)
        if self._done:
            return True
        try:
            done = self._handle.wait(timeout)
        except BaseException:
            self._finish(False)
            raise
        if done:
            self._finish(True)
        return done


class BlockManager:
    """Keeps KV blocks across tiers with prefix-hash reuse and eviction.

    Args:
        config: the configuration (default: ``KvbmConfig()``). ``block_bytes`` must be set
            unless given here.
        block_bytes: overrides ``config.block_bytes`` (engines learn it from their layout).
        allocate_memory: False makes a bookkeeping-only manager (no host memory), for an
            engine's scheduler process whose workers hold the bytes.
        namespace: the :class:`kvbm.Namespace` (or its 16-byte digest) the block hashes were
            made under. With ``block_bytes`` and ``config.remote_namespace`` it forms the one
            namespace digest (:func:`kvbm.hashing.tier_namespace_digest`) stamped on disk
            and remote blocks: blocks stored under another digest are misses.

    Raises:
        ConfigError: block_bytes unset or capacity too small for one block.
        InvalidArgumentError: ``namespace`` is neither a Namespace nor a 16-byte digest.
        CudaError / CapacityError: host memory could not be allocated (or pinned when
            ``host_pinned=True``).
    """

    def __init__(
        self,
        config: KvbmConfig | None = None,
        *,
        block_bytes: int | None = None,
        allocate_memory: bool = True,
        namespace: Namespace | bytes | None = None,
    ) -> None:
        self._shut = False  # set when close() has finished: every public call raises ClosedError
        if config is not None and not isinstance(config, KvbmConfig):
            raise ConfigError(f"config: expected a KvbmConfig, got {type(config).__name__}")
        self.config = config if config is not None else KvbmConfig()
        bb = self.config.block_bytes if block_bytes is None else int_arg(block_bytes, "block_bytes", 0, 1 << 40)
        if bb <= 0:
            raise ConfigError("block_bytes: must be positive (set it in KvbmConfig or pass block_bytes=)")
        self.block_bytes = bb
        self.namespace_digest = tier_namespace_digest(namespace, bb, self.config.remote_namespace)
        num_slots = self.config.host_capacity_bytes // bb
        if num_slots <= 0:
            raise ConfigError(
                f"host_capacity_bytes: {self.config.host_capacity_bytes} bytes hold no block of {bb} bytes"
            )
        if num_slots >= 0xFFFFFFFF:
            raise ConfigError(f"host_capacity_bytes: {num_slots} slots is more than the index addresses")
        self.host_slots = int(num_slots)
        self._index = _native.BlockIndex(min(self.config.index_initial_capacity, 1 << 30))
        self._index.configure_tier(int(Tier.HOST), self.host_slots, bb, self.config.eviction_policy)
        self._arena: _native.HostArena | None = None
        if allocate_memory:
            self._arena = _native.HostArena(self.host_slots, bb, self.config.host_pinned)
        self._lock = threading.Lock()
        self._closed = False
        self._disk = self._open_disk() if allocate_memory else None
        self._remote: RemoteTier | None = None
        self._remote_pool: Any = None
        self._remote_pending: list[Any] = []
        self._prefetch_pending: list[Any] = []
        if allocate_memory and self.config.remote_url:
            self._open_remote()
        self._metrics_server: Any = None
        if self.config.metrics_port is not None:
            from kvbm.metrics import start_metrics_server

            self._metrics_server = start_metrics_server(self, self.config.metrics_port)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def index(self) -> _native.BlockIndex:
        """The native block index (advanced use: tiers, tests)."""
        return self._index

    @property
    def host_arena(self) -> _native.HostArena | None:
        """The host tier's memory, or None for a bookkeeping-only manager."""
        return self._arena

    @property
    def disk(self) -> DiskTier | None:
        """The local disk tier (``config.disk_path``), or None."""
        return self._disk

    def _need_arena(self) -> _native.HostArena:
        if self._arena is None:
            raise InvalidArgumentError(
                "this BlockManager is bookkeeping-only (allocate_memory=False): it holds no bytes"
            )
        return self._arena

    # ---- lookups ------------------------------------------------------------------------------
    def lookup(self, hashes: HashesLike) -> LookupResult:
        """Longest cached prefix of ``hashes`` and the tier of each hit block.

        Hit blocks count as used (recency/frequency for eviction). Raises InvalidArgumentError
        for malformed hashes; ClosedError after :meth:`close`.
        """
        hashes = self._hashes(hashes)
        n, tiers = self._index.lookup(hashes)
        if self._disk is not None and n < len(tiers):
            n = self._disk_extend_lookup(hashes, int(n), tiers)
        if self._remote is not None and n < len(tiers):
            n = self._remote_extend_lookup(hashes, int(n), tiers)
        return LookupResult(int(n), tiers)

    def lookup_into(self, hashes: HashesLike, tiers_out: np.ndarray) -> int:
        """Like :meth:`lookup` but writes tiers into a caller-owned uint8 array (no allocation).

        Raises InvalidArgumentError when ``tiers_out`` is not a writable, C-contiguous 1-D
        uint8 array of at least ``len(hashes)`` elements.
        """
        hashes = self._hashes(hashes)
        tiers_out_arg(tiers_out, len(hashes))
        n = int(self._index.lookup_into(hashes, tiers_out))
        if self._disk is not None and n < len(hashes):
            n = self._disk_extend_lookup(hashes, n, tiers_out)
        if self._remote is not None and n < len(hashes):
            n = self._remote_extend_lookup(hashes, n, tiers_out)
        return n

    def contains(self, block_hash: bytes) -> Tier | None:
        """The fastest tier holding the block (no recency update), or None."""
        self._check_open()
        block_hash = hash_key(block_hash, "block_hash")
        n, tiers = self._index.peek([block_hash])
        if n:
            return Tier(int(tiers[0]))
        if self._disk is not None and self._disk.contains(bytes(block_hash)):
            return Tier.DISK
        return None

    # ---- one-call store / load (host tier) ----------------------------------------------------
    def store(self, hashes: HashesLike, data: Any, *, parent: bytes | None = None) -> int:
        """Store a chain of blocks in the host tier; returns how many were newly stored.

        ``data`` holds one row of ``block_bytes`` per hash: a C-contiguous ``(n, block_bytes)``
        uint8 array (or any buffer of n*block_bytes bytes), or a sequence of n buffers. Blocks
        already present are skipped (their recency is not changed). Evicts as the policy says.

        Raises:
            CapacityError: not enough evictable room (everything pinned or in flight); nothing
                is stored then.
            InvalidArgumentError: wrong buffer sizes, malformed hashes or a first block that is
                its own ``parent``; nothing is stored. ``data`` must be buffers (or
                :class:`kvbm.Pointer`), never a bare int.
        """
        hashes, parent = self._hashes(hashes), _parent_arg(parent)
        data = block_rows(data, len(hashes), self.block_bytes, "data")
        arena = self._need_arena()
        if parent is not None and len(hashes) and bytes(parent) == bytes(hashes[0]):
            raise InvalidArgumentError(f"parent: block {bytes(parent).hex()} cannot be its own parent")
        plan = self.prepare_store(hashes, parent=parent)
        self._demote(plan.evicted)  # disk tier write-behind: evicted bytes leave before being overwritten
        new = plan.new_hashes(hashes)
        try:
            arena.write(plan.slots, data)
            if self._remote is not None and new and self.config.remote_write_policy == "write_through":
                # staged while the slots are still Storing: once published they may be evicted and reused
                self._remote_write(new, plan.slots[plan.slots >= 0])
        except BaseException:
            self._index.complete_store(int(Tier.HOST), new, np.zeros(len(new), np.uint8))
            raise
        self._index.complete_store(int(Tier.HOST), new)
        if self._disk is not None and self.config.disk_write_policy == "write_through":
            keys = _hash_list(hashes)
            self._disk.put(keys, _rows(data, len(keys), self.block_bytes), parents=_chain_parents(keys, parent))
        return len(new)

    def load(self, hashes: HashesLike, out: Any) -> None:
        """Copy the given blocks from the host tier into ``out`` (same forms as ``store``'s data).

        With a disk tier, blocks found only on disk are first brought into the host tier
        (:meth:`promote`), so disk -> host -> ``out`` is one call. More blocks than half the host
        tier are then moved in chunks; a verification failure on disk discovered in a later
        chunk raises after earlier chunks were copied.

        Raises:
            BlockNotFoundError: a block is in neither the host nor the disk tier (nothing is
                copied then), or failed verification on disk (counted; it is dropped).
            StateError: a block is still being stored.
            InvalidArgumentError: malformed hashes, or ``out`` not writable buffers (or
                :class:`kvbm.Pointer`) of ``len(hashes) * block_bytes`` bytes.
        """
        hashes = self._hashes(hashes)
        out = block_rows(out, len(hashes), self.block_bytes, "out", writable=True)
        arena = self._need_arena()
        if self._remote is not None:
            self._remote_fill(hashes)
        if self._disk is not None:
            self._load_via_disk(hashes, out)
            return
        slots = self._index.prepare_load(int(Tier.HOST), hashes)
        try:
            arena.read(slots, out)
        finally:
            self._index.complete_load(int(Tier.HOST), hashes)

    # ---- engine path: paged KV <-> host slots (CUDA kernels or the host memcpy path) ----------
    def offload(
        self,
        layout: Any,
        block_ids: Sequence[int] | np.ndarray,
        hashes: HashesLike,
        *,
        parent: bytes | None = None,
        stream: Any = None,
    ) -> EngineTransfer:
        """Copy engine blocks ``block_ids`` (a :class:`kvbm.kv_layout.KvLayout`) into host slots
        as the chain ``hashes``; returns a handle. Blocks already cached are skipped. The
        blocks become visible to lookups when the handle completes (``wait``/``poll``); a
        failed copy drops them. ``layout.block_bytes`` must equal this manager's block_bytes.
        """
        from kvbm import copy as kvcopy

        hashes, parent = self._hashes(hashes), _parent_arg(parent)
        arena = self._need_arena()
        ids = block_ids_arg(block_ids)
        self._check_layout(layout, len(ids), hashes)
        plan = self.prepare_store(hashes, parent=parent)
        self._demote(plan.evicted)  # disk tier write-behind: evicted bytes leave before being overwritten
        new_idx = np.flatnonzero(plan.slots >= 0)
        new = [bytes(hashes[i]) for i in new_idx]
        if len(new) == 0:
            return EngineTransfer(self, None, [], "store")
        try:
            addrs = arena.addresses(plan.slots[new_idx])
            handle = kvcopy.gather(layout, ids[new_idx], addrs, stream, slot_bytes=self.block_bytes)
        except BaseException:
            self._index.complete_store(int(Tier.HOST), new, np.zeros(len(new), np.uint8))
            raise
        return EngineTransfer(self, handle, new, "store", plan.slots[new_idx])

    def onboard(
        self, layout: Any, block_ids: Sequence[int] | np.ndarray, hashes: HashesLike, *, stream: Any = None
    ) -> EngineTransfer:
        """Copy cached host blocks ``hashes`` into engine blocks ``block_ids``; returns a handle.
        The host slots stay pinned (never evicted) until the handle completes.

        With a disk tier, blocks found only on disk are promoted to host slots first (the disk
        reads are waited for; use :meth:`promote_async` earlier to overlap them).

        Raises BlockNotFoundError when a block is not in the host tier (nor on disk); nothing
        is copied then.
        """
        from kvbm import copy as kvcopy

        keys = normalize_hashes(self._hashes(hashes))
        arena = self._need_arena()
        ids = block_ids_arg(block_ids)
        self._check_layout(layout, len(ids), keys)
        if self._remote is not None:  # remote-only blocks come into host first: remote -> host -> GPU
            self._remote_fill(keys)
        # with a disk tier, disk-only blocks are promoted first: disk -> host -> GPU in one call
        slots = self._pin_in_host(keys) if self._disk is not None else self._index.prepare_load(int(Tier.HOST), keys)
        try:
            handle = kvcopy.scatter(layout, ids, arena.addresses(slots), stream, slot_bytes=self.block_bytes)
        except BaseException:
            self._index.complete_load(int(Tier.HOST), keys)
            raise
        return EngineTransfer(self, handle, keys, "load")

    def _check_layout(self, layout: Any, n_ids: int, hashes: HashesLike) -> None:
        from kvbm.kv_layout import KvLayout

        if not isinstance(layout, KvLayout):
            raise InvalidArgumentError(f"layout: expected a kvbm.kv_layout.KvLayout, got {type(layout).__name__}")
        if layout.block_bytes != self.block_bytes:
            raise InvalidArgumentError(
                f"layout.block_bytes is {layout.block_bytes} but this manager's block_bytes is {self.block_bytes}"
            )
        if n_ids != len(hashes):
            raise InvalidArgumentError(f"{n_ids} block ids for {len(hashes)} hashes")

    # ---- split-process primitives -------------------------------------------------------------
    def prepare_store(self, hashes: HashesLike, *, parent: bytes | None = None, tier: Tier = Tier.HOST) -> StorePlan:
        """Reserve slots (state Storing) for the blocks not yet present; see :class:`StorePlan`."""
        hashes, parent, tier = self._hashes(hashes), _parent_arg(parent), _tier_arg(tier)
        slots, evicted = self._index.prepare_store(int(tier), hashes, parent)
        return StorePlan(Tier(tier), slots, evicted)

    def complete_store(
        self,
        hashes: HashesLike,
        ok: Any | None = None,
        checksums: Any | None = None,
        *,
        tier: Tier = Tier.HOST,
    ) -> None:
        """Publish stored blocks (Storing -> Ready), or drop the ones whose ``ok`` flag is false.

        ``ok``: one bool per hash (None: all ok); ``checksums``: one uint32 per hash or None.
        """
        hashes, tier = self._hashes(hashes), _tier_arg(tier)
        ok = flags_arg(ok, len(hashes), "ok")
        checksums = uint32_arg(checksums, len(hashes), "checksums")
        self._index.complete_store(int(tier), hashes, ok, checksums)

    def prepare_load(self, hashes: HashesLike, *, tier: Tier = Tier.HOST) -> np.ndarray:
        """Pin Ready blocks for reading and return their slots (int64)."""
        hashes, tier = self._hashes(hashes), _tier_arg(tier)
        return self._index.prepare_load(int(tier), hashes)

    def complete_load(self, hashes: HashesLike, *, tier: Tier = Tier.HOST) -> None:
        """Unpin blocks pinned by :meth:`prepare_load`."""
        hashes, tier = self._hashes(hashes), _tier_arg(tier)
        self._index.complete_load(int(tier), hashes)

    def touch(self, hashes: HashesLike) -> int:
        """Mark cached blocks as used (same as a lookup); returns the hit prefix length."""
        return self.lookup(hashes).num_hits

    # ---- eviction -----------------------------------------------------------------------------
    def evict(self, count: int, *, tier: Tier = Tier.HOST) -> list[bytes]:
        """Evict up to ``count`` blocks chosen by the policy; returns their hashes.

        Raises InvalidArgumentError / OutOfRangeError for a count that is not an int in 0..2**63-1.
        """
        self._check_open()
        count, tier = int_arg(count, "count", 0, (1 << 63) - 1), _tier_arg(tier)
        if tier != Tier.HOST:
            return [e[0] for e in self._index.evict(int(tier), int(count))]
        # Note [Slot lifetime] in csrc/block_index.h: the slots stay draining (no store on another
        # thread, nor the remote prefetch thread, gets them) until their bytes were copied out.
        ev = self._index.evict(int(Tier.HOST), int(count), hold=True)
        try:
            self._demote(ev)
        finally:
            self._index.release_slots(int(Tier.HOST), [e[2] for e in ev])
        return [e[0] for e in ev]

    def remove(self, hashes: HashesLike, *, tier: Tier = Tier.HOST, ignore_missing: bool = False) -> int:
        """Drop blocks from a tier; raises StateError for pinned or in-flight ones."""
        hashes, tier = self._hashes(hashes), _tier_arg(tier)
        if not isinstance(ignore_missing, (bool, np.bool_)):
            raise InvalidArgumentError(f"ignore_missing: expected a bool, got {type(ignore_missing).__name__}")
        if tier == Tier.DISK and self._disk is not None:
            return self._disk.remove(_hash_list(hashes))
        return len(self._index.remove(int(tier), hashes, ignore_missing))

    # ---- stats --------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-tier counters and occupancy, e.g. ``stats()["host"]["hits"]``. ClosedError after close."""
        self._check_open()
        out: dict[str, dict[str, Any]] = {}
        for tier in Tier:
            info = self._index.tier_info(int(tier))
            if not info["enabled"]:
                continue
            d = dict(self._index.counters(int(tier)))
            d.update(
                capacity_blocks=info["num_slots"],
                used_blocks=info["used_slots"],
                pinned_blocks=info["pinned_slots"],
                block_bytes=info["slot_bytes"],
                capacity_bytes=info["num_slots"] * info["slot_bytes"],
                used_bytes=info["used_slots"] * info["slot_bytes"],
                policy=info["policy"],
            )
            out[tier.name.lower()] = d
        if self._disk is not None:
            out["disk"] = self._disk_stats()
        if self._remote is not None:
            out["remote"] = self._remote.stats()
        out["index"] = {"blocks": len(self._index), "memory_bytes": self._index.memory_bytes}
        return out

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release memory and stop the metrics server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self._remote is not None:
            self._remote_pool.shutdown(wait=True)
            self._remote.close()
            self._remote = None
        if self._disk is not None:
            self._disk.close()
            self._disk = None
        self._arena = None
        self._shut = True

    def _check_open(self) -> None:
        if self._shut:
            raise ClosedError("this BlockManager is closed")

    def _hashes(self, hashes: Any, what: str = "hashes") -> Any:
        """The entry-point check: open, and ``hashes`` well-formed (see kvbm.hashing.hashes_arg)."""
        if self._shut:
            raise ClosedError("this BlockManager is closed")
        return hashes_arg(hashes, what)

    def __enter__(self) -> BlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- disk tier (kvbm.tiers.disk) ----------------------------------------------------------
    # The disk tier keeps its own persistent catalog (LMDB) and eviction; the native index
    # tracks GPU/host residency. Lookups walk the index first and continue on disk; host
    # evictions are demoted to disk (write-behind); loads onboard disk blocks into host slots.

    def _open_disk(self) -> DiskTier | None:
        c = self.config
        if not c.disk_path:
            return None
        from kvbm.tiers.disk import ALIGNMENT, DiskTier

        slot = -(-self.block_bytes // ALIGNMENT) * ALIGNMENT
        return DiskTier(
            c.disk_path,
            slot_bytes=slot,
            capacity_bytes=c.disk_capacity_bytes,
            namespace=self.namespace_digest,  # the one digest (remote gets the same)
            io_threads=c.disk_io_threads,
            o_direct=c.disk_o_direct,
            durability=c.disk_durability,
            verify_checksums=c.checksums,
            eviction=c.eviction_policy,
        )

    def _write_through_storing(self, keys: list[bytes], slots: np.ndarray) -> None:
        """Engine offloads with a write_through disk or remote tier: queue host blocks ``keys``.

        Called while ``slots`` are still Storing (before complete_store), so no other thread can
        evict and refill them first (Note [Slot lifetime]); the bytes are copied out once, then
        the disk and remote writes run asynchronously from that copy.
        """
        disk_wt = self._disk is not None and self.config.disk_write_policy == "write_through"
        remote_wt = self._remote is not None and self.config.remote_write_policy == "write_through"
        if not (disk_wt or remote_wt) or not keys or self._arena is None:
            return
        staging = np.empty((len(keys), self.block_bytes), dtype=np.uint8)
        self._arena.read(np.asarray(slots, np.int64), staging)
        if disk_wt:
            assert self._disk is not None
            self._disk.put_async(keys, list(staging), parents=_chain_parents(keys, None))
        if remote_wt:
            self._track(self._remote_pool.submit(self._remote.put, keys, staging))

    def _disk_extend_lookup(self, hashes: HashesLike, n: int, tiers: np.ndarray) -> int:
        """Continue a lookup past the index's prefix: blocks on disk (or back in the index)."""
        assert self._disk is not None
        keys = _hash_list(hashes)
        disk = self._disk
        i = n
        while i < len(keys):
            k = keys[i]
            m, t = self._index.peek([k])
            if m:
                tiers[i] = t[0]
            elif disk.contains(k):
                tiers[i] = int(Tier.DISK)
            else:
                break
            i += 1
        return i

    def _demote(self, evicted: list[tuple[bytes, bytes, int, int | None]]) -> None:
        """Write host blocks that were just evicted to disk (asynchronously), unless there already."""
        if self._remote is not None and evicted and self.config.remote_write_policy == "write_behind":
            self._remote_write([e[0] for e in evicted], np.array([e[2] for e in evicted], np.int64))
        disk = self._disk
        if disk is None or not evicted or self._arena is None:
            return
        todo = [e for e in evicted if not disk.contains(e[0])]
        if not todo:
            return
        staging = np.empty((len(todo), self.block_bytes), dtype=np.uint8)
        self._arena.read(np.array([e[2] for e in todo], dtype=np.int64), staging)
        parents = [None if e[1] == _NO_PARENT or e[1] == e[0] else e[1] for e in todo]  # never its own parent
        # The handle keeps `staging` alive; the tier commits it when done (reaped on later calls).
        disk.put_async([e[0] for e in todo], list(staging), parents=parents)

    def promote(self, hashes: HashesLike) -> int:
        """Bring blocks that are on disk but not in the host tier into host slots; returns how many.

        Synchronous :meth:`promote_async`. Raises CapacityError when the host tier has no
        evictable room.
        """
        hashes = self._hashes(hashes)
        return self.promote_async(hashes).wait()

    def promote_async(self, hashes: HashesLike) -> PromoteHandle:
        """Start bringing disk-only blocks into host slots; returns a handle to poll or wait on.

        Host slots are reserved (state Storing; evicting, and demoting, as the policy says), the
        disk reads go straight into them with CRC32C verification, and when the handle completes
        the blocks that verified become Ready in the host tier; a block that failed is a counted
        miss and stays absent. The handle must be polled or waited on until done (until then the
        reserved slots stay in flight). Blocks already in the host tier, or not on disk, are
        skipped. Raises CapacityError when the host tier has no evictable room.
        """
        hashes = self._hashes(hashes)
        disk, arena = self._disk, self._need_arena()
        if disk is None:
            return PromoteHandle(self, [], None)
        want: list[bytes] = []
        seen: set[bytes] = set()
        for k in _hash_list(hashes):
            if k in seen:
                continue
            seen.add(k)
            if not self._index.peek([k])[0] and disk.contains(k):
                want.append(k)
        if not want:
            return PromoteHandle(self, [], None)
        plan = self.prepare_store(want)
        self._demote(plan.evicted)  # copies evicted bytes out before the reads land in their slots
        idx = [i for i, s in enumerate(plan.slots.tolist()) if s >= 0]
        new = [want[i] for i in idx]
        try:
            h = disk.get_async(new, [arena.view(int(plan.slots[i])) for i in idx])
        except BaseException:
            if new:
                self._index.complete_store(int(Tier.HOST), new, np.zeros(len(new), np.uint8))
            raise
        return PromoteHandle(self, new, h)

    def _load_via_disk(self, hashes: HashesLike, out: Any) -> None:
        arena = self._need_arena()
        keys = _hash_list(hashes)
        self._host_or_disk(keys)  # BlockNotFoundError before anything is copied
        if len(keys) <= max(1, self.host_slots // 2):
            chunks = [(0, keys, out)]
        else:  # more than the host tier comfortably holds: disk -> host -> out chunk by chunk
            rows = _rows(out, len(keys), self.block_bytes, writable=True)
            step = max(1, self.host_slots // 2)
            chunks = [(c, keys[c : c + step], rows[c : c + step]) for c in range(0, len(keys), step)]
        for _, ck, dst in chunks:
            slots = self._pin_in_host(ck)
            try:
                arena.read(slots, dst)
            finally:
                self._index.complete_load(int(Tier.HOST), ck)

    def _pin_in_host(self, keys: list[bytes]) -> np.ndarray:
        """Pin ``keys`` in the host tier (as prepare_load does), promoting disk-only ones first.

        Blocks already in the host tier are pinned while the others are promoted, so the
        promotion cannot evict them. Returns the slots; the caller calls complete_load(keys).
        Raises BlockNotFoundError for a block in neither tier or one that failed verification.
        """
        in_host = self._host_or_disk(keys)
        hosted = [k for k, h in zip(keys, in_host, strict=True) if h]
        others = [k for k, h in zip(keys, in_host, strict=True) if not h]
        if not others:
            return self._index.prepare_load(int(Tier.HOST), keys)
        if hosted:
            self._index.prepare_load(int(Tier.HOST), hosted)
        try:
            self.promote(others)
            return self._index.prepare_load(int(Tier.HOST), keys)
        finally:
            if hosted:
                self._index.complete_load(int(Tier.HOST), hosted)

    def _host_or_disk(self, keys: list[bytes]) -> list[bool]:
        """Per key: True in the host tier, False on disk. BlockNotFoundError when in neither."""
        from kvbm.errors import BlockNotFoundError

        disk = self._disk
        assert disk is not None
        in_host = [bool(self._index.peek([k])[0]) for k in keys]
        flushed = False
        for k, h in zip(keys, in_host, strict=True):
            if h or disk.contains(k):
                continue
            if not flushed:  # a demotion may still be in flight: let it land, then look again
                disk.flush()
                flushed = True
                if disk.contains(k):
                    continue
            raise BlockNotFoundError(f"block {k.hex()} is in neither the host nor the disk tier")
        return in_host

    def _disk_stats(self) -> dict[str, Any]:
        assert self._disk is not None
        d = self._disk.stats()
        io = d.pop("io")
        totals = d.pop("totals")
        d.update(
            capacity_blocks=d["slots_total"],
            used_blocks=d["blocks"],
            block_bytes=d["slot_bytes"],
            used_bytes=d["bytes_used"],
            policy=self.config.eviction_policy,
            bytes_stored=d["stored_bytes"],
            bytes_loaded=d["loaded_bytes"],
            bytes_written=io["bytes_written"],
            bytes_read=io["bytes_read"],
            lifetime=totals,
        )
        return d

    # ---- remote tier (kvbm.tiers.remote) ------------------------------------------------------
    # After GPU, host and disk, lookups continue into the remote tier (Redis or kvbm serve).
    # Remote blocks come into host slots asynchronously (prefetch) or on demand (load); new host
    # blocks (write_through) or host evictions (write_behind) are put to it in the background.
    # Bytes are staged out of the arena synchronously, so a slot reused later cannot leak in.
    # A remote store that is down only turns into misses (see kvbm/tiers/remote.py).

    def _open_remote(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from kvbm.tiers.remote import open_remote_tier

        c = self.config
        self._remote = open_remote_tier(
            c.remote_url,
            block_bytes=self.block_bytes,
            namespace=self.namespace_digest,  # binds the Namespace, block_bytes and the tenant
            token=c.remote_token,
            timeout_s=c.remote_timeout_s,
        )
        self._remote_pool = ThreadPoolExecutor(c.remote_threads, thread_name_prefix="kvbm-remote")

    @property
    def remote(self) -> RemoteTier | None:
        """The remote tier (``config.remote_url``), or None."""
        return self._remote

    def _remote_extend_lookup(self, hashes: HashesLike, n: int, tiers: np.ndarray) -> int:
        """Continue a lookup past host and disk: blocks the remote tier holds, then local ones again.

        One remote round trip per stretch of blocks missing locally (usually one in all).
        """
        assert self._remote is not None
        keys = _hash_list(hashes)
        disk = self._disk
        i = n
        while i < len(keys):
            m, t = self._index.peek([keys[i]])
            if m:
                tiers[i] = t[0]
            elif disk is not None and disk.contains(keys[i]):
                tiers[i] = int(Tier.DISK)
            else:
                r = self._remote.lookup_prefix(keys[i:])
                if r == 0:
                    break
                for j in range(i, i + r):
                    m, t = self._index.peek([keys[j]])
                    tiers[j] = t[0] if m else int(Tier.REMOTE)
                i += r
                continue
            i += 1
        return i

    def _remote_write(self, keys: list[bytes], slots: np.ndarray) -> None:
        """Stage host slots now, put them to the remote tier in the background."""
        if self._arena is None or not len(keys):
            return
        staging = np.empty((len(keys), self.block_bytes), np.uint8)
        self._arena.read(slots, staging)
        self._track(self._remote_pool.submit(self._remote.put, keys, staging))

    def _track(self, fut: Any, prefetch: bool = False) -> Any:
        with self._lock:
            self._remote_pending = [f for f in self._remote_pending if not f.done()]
            self._remote_pending.append(fut)
            if prefetch:
                self._prefetch_pending = [f for f in self._prefetch_pending if not f.done()]
                self._prefetch_pending.append(fut)
        return fut

    def flush_remote(self, timeout: float | None = None) -> None:
        """Wait until the remote writes and prefetches issued so far have finished.

        Raises TransferTimeoutError when ``timeout`` (seconds) passes first.
        """
        self._check_open()
        timeout = float_arg(timeout, "timeout", 0.0, 1e9, allow_none=True)
        from concurrent.futures import wait

        from kvbm.errors import TransferTimeoutError

        with self._lock:
            pending = list(self._remote_pending)
        _done, not_done = wait(pending, timeout)
        if not_done:
            raise TransferTimeoutError(f"{len(not_done)} remote operations still running after {timeout} s")

    def prefetch(self, hashes: HashesLike) -> PrefetchHandle:
        """Start bringing blocks that only the remote tier holds into the host tier.

        Returns at once; a thread fetches the blocks and :meth:`PrefetchHandle.wait` gives how
        many entered the host tier. Blocks already in host (or on disk), missing remotely, or
        failing verification are skipped (the latter counted in ``stats()["remote"]``). With a
        disk tier (driven from one thread only), the fetched blocks enter the host tier in
        ``wait()``, on the caller's thread; without one, in the background. Without a remote tier
        the handle is done with 0.
        """
        from concurrent.futures import Future

        keys = normalize_hashes(self._hashes(hashes))
        if self._remote is None or self._arena is None:
            f: Future = Future()
            f.set_result(0)
            return PrefetchHandle(f)
        if self._disk is None:
            fut = self._track(self._remote_pool.submit(self._onboard_remote, keys), prefetch=True)
            return PrefetchHandle(fut)
        fut = self._track(self._remote_pool.submit(self._fetch_remote, keys, False))
        return PrefetchHandle(fut, self._install_remote)

    def _fetch_remote(self, keys: list[bytes], check_disk: bool) -> tuple[list[bytes], np.ndarray]:
        """Get the blocks missing from host (and, with ``check_disk``, from disk) from the remote
        tier into a staging array. Touches neither the arena nor the disk tier: safe on any thread."""
        remote = self._remote
        want: list[bytes] = []
        seen: set[bytes] = set()
        for k in keys:
            if k in seen or self._index.peek([k])[0]:
                continue
            if check_disk and self._disk is not None and self._disk.contains(k):
                continue
            seen.add(k)
            want.append(k)
        if remote is None or not want:
            return [], np.empty((0, self.block_bytes), np.uint8)
        staging = np.empty((len(want), self.block_bytes), np.uint8)
        got = remote.get(want, staging)
        return [want[i] for i in np.flatnonzero(got)], staging[got]

    def _install_remote(self, fetched: tuple[list[bytes], np.ndarray]) -> int:
        """Put fetched blocks into host slots (evicting, and demoting, as the policy says)."""
        from kvbm.errors import CapacityError

        keys, rows = fetched
        if not keys or self._arena is None:
            return 0
        try:
            plan = self.prepare_store(keys)
        except CapacityError:
            return 0  # everything pinned: the prefetch brings nothing, the load will say so
        self._demote(plan.evicted)
        new = plan.new_hashes(keys)
        try:
            self._arena.write(plan.slots, rows)
        except BaseException:
            self._index.complete_store(int(Tier.HOST), new, np.zeros(len(new), np.uint8))
            raise
        self._index.complete_store(int(Tier.HOST), new)
        return len(new)

    def _onboard_remote(self, keys: list[bytes]) -> int:
        return self._install_remote(self._fetch_remote(keys, True))

    def _remote_fill(self, hashes: HashesLike) -> None:
        """For load: fetch the blocks that only the remote tier holds (nothing when all are in host).

        Waits first for prefetches in flight (not for background writes), so a block being
        prefetched is not fetched twice.
        """
        keys = _hash_list(hashes)
        missing = [k for k in keys if not self._index.peek([k])[0]]
        if not missing:
            return
        with self._lock:
            pending = [f for f in self._prefetch_pending if not f.done()]
        for f in pending:
            f.result()
        self._onboard_remote(missing)


class PrefetchHandle:
    """Completion of :meth:`BlockManager.prefetch`."""

    __slots__ = ("_count", "_finish", "_fut")

    def __init__(self, fut: Any, finish: Any = None) -> None:
        self._fut = fut
        self._finish = finish
        self._count: int | None = None

    @property
    def done(self) -> bool:
        """True once the fetch finished (with a disk tier, ``wait()`` still installs the blocks)."""
        return bool(self._fut.done())

    def wait(self, timeout: float | None = None) -> int:
        """Blocks brought into the host tier. Raises TransferTimeoutError after ``timeout`` seconds."""
        from concurrent.futures import TimeoutError as FutTimeout

        from kvbm.errors import TransferTimeoutError

        timeout = float_arg(timeout, "timeout", 0.0, 1e9, allow_none=True)
        if self._count is not None:
            return self._count
        try:
            r = self._fut.result(timeout)
        except FutTimeout:
            raise TransferTimeoutError(f"prefetch still running after {timeout} s") from None
        self._count = int(self._finish(r) if self._finish is not None else r)
        return self._count


class PromoteHandle:
    """A disk -> host promotion in flight (from :meth:`BlockManager.promote_async`).

    ``poll()`` is True once done (the verified blocks are then Ready in the host tier);
    ``wait(timeout=None)`` blocks and returns how many blocks were onboarded.
    """

    def __init__(self, manager: BlockManager, hashes: list[bytes], disk_handle: Any) -> None:
        self._m = manager
        self.hashes = hashes
        self._h = disk_handle
        self._count: int | None = None if hashes else 0

    def poll(self) -> bool:
        """True once finished (and published to the host tier)."""
        if self._count is not None:
            return True
        if not self._h.poll():
            return False
        self._finish()
        return True

    def wait(self, timeout: float | None = None) -> int:
        """Block until done; returns the number of blocks onboarded. TransferTimeoutError after ``timeout`` s."""
        timeout = float_arg(timeout, "timeout", 0.0, 1e9, allow_none=True)
        if self._count is None:
            self._h.wait(timeout)
            self._finish()
        return int(self._count or 0)

    def _finish(self) -> None:
        if self._count is not None:
            return
        ok = np.asarray(self._h.result(), dtype=np.uint8)
        self._m._index.complete_store(int(Tier.HOST), self.hashes, ok)
        self._count = int(ok.sum())


_hash_list = normalize_hashes  # the one hash normaliser (kvbm.hashing)


def _parent_arg(parent: Any) -> bytes | None:
    return None if parent is None else hash_key(parent, "parent")


def _tier_arg(tier: Any) -> Tier:
    return enum_arg(tier, Tier, "tier")


def _rows(data: Any, n: int, block_bytes: int, writable: bool = False) -> list[Any]:
    """Per-block buffers of ``data`` (a sequence of n buffers, or one buffer of n rows)."""
    if isinstance(data, (list, tuple)):
        return list(data)
    mv = memoryview(data).cast("B")
    if writable and mv.readonly:
        raise InvalidArgumentError("out: buffer must be writable")
    if mv.nbytes != n * block_bytes:
        raise InvalidArgumentError(f"data: {mv.nbytes} bytes for {n} blocks of {block_bytes}")
    return [mv[i * block_bytes : (i + 1) * block_bytes] for i in range(n)]


def _chain_parents(keys: list[bytes], parent: bytes | None) -> list[bytes | None]:
    return [parent if i == 0 else keys[i - 1] for i in range(len(keys))]
