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
from typing import Any

import numpy as np

from kvbm import _native
from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError, InvalidArgumentError

HashesLike = Sequence[bytes] | np.ndarray


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
        return LookupResult(int(n), tiers)

    def lookup_into(self, hashes: HashesLike, tiers_out: np.ndarray) -> int:
        """Like :meth:`lookup` but writes tiers into a caller-owned uint8 array (no allocation)."""
        return int(self._index.lookup_into(hashes, tiers_out))

    def contains(self, block_hash: bytes) -> Tier | None:
        """The fastest tier holding the block (no recency update), or None."""
        n, tiers = self._index.peek([block_hash])
        return Tier(int(tiers[0])) if n else None

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
        new = plan.new_hashes(hashes)
        try:
            arena.write(plan.slots, data)
        except BaseException:
            self._index.complete_store(int(Tier.HOST), new, np.zeros(len(new), np.uint8))
            raise
        self._index.complete_store(int(Tier.HOST), new)
        return len(new)

    def load(self, hashes: HashesLike, out: Any) -> None:
        """Copy the given blocks from the host tier into ``out`` (same forms as ``store``'s data).

        Raises:
            BlockNotFoundError: a block is not in the host tier (nothing is copied then).
            StateError: a block is still being stored.
        """
        arena = self._need_arena()
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
        return [e[0] for e in self._index.evict(int(tier), int(count))]

    def remove(self, hashes: HashesLike, *, tier: Tier = Tier.HOST, ignore_missing: bool = False) -> int:
        """Drop blocks from a tier; raises StateError for pinned or in-flight ones."""
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
        self._arena = None

    def __enter__(self) -> BlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
