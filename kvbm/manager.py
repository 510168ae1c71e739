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
from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError, InvalidArgumentError

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


class BlockManager:
    """Keeps KV blocks across tiers with prefix-hash reuse and eviction.

    Args:
        config: the configuration (default: ``KvbmConfig()``). ``block_bytes`` must be set
            unless given here.
        block_bytes: overrides ``config.block_bytes`` (engines learn it from their layout).
        allocate_memory: False makes a bookkeeping-only manager (no host memory), for an
            engine's scheduler process whose workers hold the bytes.

    Raises:
        ConfigError: block_bytes unset or capacity too small for one block.
        CudaError / CapacityError: host memory could not be allocated (or pinned when
            ``host_pinned=True``).
    """

    def __init__(
        self,
        config: KvbmConfig | None = None,
        *,
        block_bytes: int | None = None,
        allocate_memory: bool = True,
    ) -> None:
        self.config = config if config is not None else KvbmConfig()
        bb = int(block_bytes if block_bytes is not None else self.config.block_bytes)
        if bb <= 0:
            raise ConfigError("block_bytes: must be positive (set it in KvbmConfig or pass block_bytes=)")
        self.block_bytes = bb
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
        for malformed hashes.
        """
        n, tiers = self._index.lookup(hashes)
        if self._disk is not None and n < len(tiers):
            n = self._disk_extend_lookup(hashes, int(n), tiers)
        if self._remote is not None and n < len(tiers):
            n = self._remote_extend_lookup(hashes, int(n), tiers)
        return LookupResult(int(n), tiers)

    def lookup_into(self, hashes: HashesLike, tiers_out: np.ndarray) -> int:
        """Like :meth:`lookup` but writes tiers into a caller-owned uint8 array (no allocation)."""
        n = int(self._index.lookup_into(hashes, tiers_out))
        if self._disk is not None and n < len(hashes):
            n = self._disk_extend_lookup(hashes, n, tiers_out)
        if self._remote is not None and n < len(hashes):
            n = self._remote_extend_lookup(hashes, n, tiers_out)
        return n

    def contains(self, block_hash: bytes) -> Tier | None:
        """The fastest tier holding the block (no recency update), or None."""
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
            InvalidArgumentError: wrong buffer sizes or malformed hashes; nothing is stored.
        """
        arena = self._need_arena()
        plan = self.prepare_store(hashes, parent=parent)
        self._demote(plan.evicted)  # disk tier write-behind: evicted bytes leave before being overwritten
        new = plan.new_hashes(hashes)
        try:
            arena.write(plan.slots, data)
        except BaseException:
            self._index.complete_store(int(Tier.HOST), new, np.zeros(len(new), np.uint8))
            raise
        self._index.complete_store(int(Tier.HOST), new)
        if self._disk is not None and self.config.disk_write_policy == "write_through":
            keys = _hash_list(hashes)
            self._disk.put(keys, _rows(data, len(keys), self.block_bytes), parents=_chain_parents(keys, parent))
        if self._remote is not None and new and self.config.remote_write_policy == "write_through":
            self._remote_write(new, plan.slots[plan.slots >= 0])
        return len(new)

    def load(self, hashes: HashesLike, out: Any) -> None:
        """Copy the given blocks from the host tier into ``out`` (same forms as ``store``'s data).

        With a disk tier, blocks found only on disk are first brought into the host tier
        (:meth:`onboard`), so disk -> host -> ``out`` is one call. More blocks than half the host
        tier are then moved in chunks; a verification failure on disk discovered in a later
        chunk raises after earlier chunks were copied.

        Raises:
            BlockNotFoundError: a block is in neither the host nor the disk tier (nothing is
                copied then), or failed verification on disk (counted; it is dropped).
            StateError: a block is still being stored.
        """
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

    # ---- split-process primitives -------------------------------------------------------------
    def prepare_store(self, hashes: HashesLike, *, parent: bytes | None = None, tier: Tier = Tier.HOST) -> StorePlan:
        """Reserve slots (state Storing) for the blocks not yet present; see :class:`StorePlan`."""
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
        """Publish stored blocks (Storing -> Ready), or drop the ones whose ``ok`` flag is false."""
        self._index.complete_store(int(tier), hashes, ok, checksums)

    def prepare_load(self, hashes: HashesLike, *, tier: Tier = Tier.HOST) -> np.ndarray:
        """Pin Ready blocks for reading and return their slots (int64)."""
        return self._index.prepare_load(int(tier), hashes)

    def complete_load(self, hashes: HashesLike, *, tier: Tier = Tier.HOST) -> None:
        """Unpin blocks pinned by :meth:`prepare_load`."""
        self._index.complete_load(int(tier), hashes)

    def touch(self, hashes: HashesLike) -> int:
        """Mark cached blocks as used (same as a lookup); returns the hit prefix length."""
        return self.lookup(hashes).num_hits

    # ---- eviction -----------------------------------------------------------------------------
    def evict(self, count: int, *, tier: Tier = Tier.HOST) -> list[bytes]:
        """Evict up to ``count`` blocks chosen by the policy; returns their hashes."""
        if count < 0:
            raise InvalidArgumentError(f"count: must be >= 0, got {count}")
        ev = self._index.evict(int(tier), int(count))
        if tier == Tier.HOST:
            self._demote(ev)
        return [e[0] for e in ev]

    def remove(self, hashes: HashesLike, *, tier: Tier = Tier.HOST, ignore_missing: bool = False) -> int:
        """Drop blocks from a tier; raises StateError for pinned or in-flight ones."""
        if tier == Tier.DISK and self._disk is not None:
            return self._disk.remove(_hash_list(hashes))
        return len(self._index.remove(int(tier), hashes, ignore_missing))

    # ---- stats --------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-tier counters and occupancy, e.g. ``stats()["host"]["hits"]``."""
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
        from kvbm.tiers.disk import ALIGNMENT, DiskTier, namespace_fingerprint

        slot = -(-self.block_bytes // ALIGNMENT) * ALIGNMENT
        return DiskTier(
            c.disk_path,
            slot_bytes=slot,
            capacity_bytes=c.disk_capacity_bytes,
            namespace=namespace_fingerprint(f"kvbm-block-bytes:{self.block_bytes}"),
            io_threads=c.disk_io_threads,
            o_direct=c.disk_o_direct,
            durability=c.disk_durability,
            verify_checksums=c.checksums,
            eviction=c.eviction_policy,
        )

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
        parents = [None if e[1] == _NO_PARENT else e[1] for e in todo]
        # The handle keeps `staging` alive; the tier commits it when done (reaped on later calls).
        disk.put_async([e[0] for e in todo], list(staging), parents=parents)

    def onboard(self, hashes: HashesLike) -> int:
        """Bring blocks that are on disk but not in the host tier into host slots; returns how many.

        Host slots are reserved (evicting, and demoting, as the policy says), the disk reads go
        straight into them with CRC32C verification, and the blocks become Ready in the host tier.
        A block failing verification is a counted miss and stays absent. Raises CapacityError
        when the host tier has no evictable room.
        """
        disk, arena = self._disk, self._need_arena()
        if disk is None:
            return 0
        keys = _hash_list(hashes)
        want = []
        for k in keys:
            m, _ = self._index.peek([k])
            if not m and disk.contains(k) and k not in want:
                want.append(k)
        if not want:
            return 0
        plan = self.prepare_store(want)
        self._demote(plan.evicted)
        idx = [i for i, s in enumerate(plan.slots.tolist()) if s >= 0]
        new = [want[i] for i in idx]
        ok = np.zeros(len(new), dtype=np.uint8)
        try:
            res = disk.get(new, [arena.view(int(plan.slots[i])) for i in idx])
            ok[:] = res
        finally:
            if new:
                self._index.complete_store(int(Tier.HOST), new, ok)
        return int(ok.sum())

    def _load_via_disk(self, hashes: HashesLike, out: Any) -> None:
        arena, disk = self._need_arena(), self._disk
        assert disk is not None
        keys = _hash_list(hashes)
        in_host = self._host_or_disk(keys)
        if all(in_host):
            slots = self._index.prepare_load(int(Tier.HOST), keys)
            try:
                arena.read(slots, out)
            finally:
                self._index.complete_load(int(Tier.HOST), keys)
            return
        rows = _rows(out, len(keys), self.block_bytes, writable=True)
        chunk = max(1, self.host_slots // 2)
        for c0 in range(0, len(keys), chunk):
            ck = keys[c0 : c0 + chunk]
            ch = self._host_or_disk(ck)  # earlier chunks may have pushed some of these to disk
            hosted = [k for k, h in zip(ck, ch, strict=True) if h]
            pinned: list[bytes] = []
            try:
                if hosted:  # pin first, so onboarding the others cannot evict them
                    self._index.prepare_load(int(Tier.HOST), hosted)
                    pinned += hosted
                others = [k for k, h in zip(ck, ch, strict=True) if not h]
                if others:
                    self.onboard(others)
                    self._index.prepare_load(int(Tier.HOST), others)  # BlockNotFoundError if it failed
                    pinned += others
                slots = self._index.prepare_load(int(Tier.HOST), ck)  # a second pin, for the slots
                try:
                    arena.read(slots, rows[c0 : c0 + chunk])
                finally:
                    self._index.complete_load(int(Tier.HOST), ck)
            finally:
                if pinned:
                    self._index.complete_load(int(Tier.HOST), pinned)

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
            namespace=f"{c.remote_namespace}\0block_bytes={self.block_bytes}",
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

        keys = _hash_list(hashes)
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

        if self._count is not None:
            return self._count
        try:
            r = self._fut.result(timeout)
        except FutTimeout:
            raise TransferTimeoutError(f"prefetch still running after {timeout} s") from None
        self._count = int(self._finish(r) if self._finish is not None else r)
        return self._count


def _hash_list(hashes: HashesLike) -> list[bytes]:
    if isinstance(hashes, np.ndarray):
        if hashes.ndim != 2:
            raise InvalidArgumentError(f"hashes: expected an (n, 16) uint8 array, got shape {hashes.shape}")
        return [bytes(r) for r in hashes]
    return [bytes(h) for h in hashes]


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
