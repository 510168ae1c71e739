"""The router's block index: block key -> which instances hold it, in which tier.

The index is native (``kvbm._native.RouterIndex``, ``csrc/router_index.{h,cpp}``; its layout is
Note [Native router index] there); this module is its Python face and states its semantics.

Note [Router block keys]
------------------------
Engines name blocks with their own hashes (vLLM: 64-bit ints from sha256 of its own encoding;
kvbm: chained 128+-bit digests), which the router cannot compute from a request. So the router
keys blocks by its *own* chained hash of the tokens, ``key_i = H(key_{i-1}, tokens_i)`` from a
root ``H(block_size, extra)``, computed both for event blocks (from the event's ``token_ids``) and
for requests (from their token ids), with the block size of the instance that published the
event. Both go through one native function (:func:`chain_keys`), so they cannot disagree. An engine hash is
mapped to its key per instance (``_emap``) so that a ``BlockRemoved`` (hashes only), a tokenless
``BlockStored`` of a known block, and a child's ``parent_block_hash`` resolve.

``H`` is kvbm's fast128 (64 bits of it) over the token ids as little-endian uint32 (ids must be
in 0..2**32-1, as for kvbm's block hashes), deterministic across processes. It is not collision
resistant against chosen tokens: a collision costs at most a misrouted request, never wrong KV
(engines verify their own hashes). Engine hashes are ints (vLLM: 64-bit, signed or not) or
bytes (kvbm); the native side normalises them to 128-bit keys once, as they arrive.

Residency is a bit mask per key: bit ``4 * slot + tier`` (tiers GPU, CPU, DISK, REMOTE), slots
assigned per instance (0..255). The index is bounded: at most ``max_blocks`` keys in LRU order
(a store or a hit refreshes a key), and each instance's engine-hash map is bounded the same
way; past the bound the oldest keys go in bulk (1/16 of the bound more than needed, so the cost
is paid rarely); an evicted key is simply forgotten (the router then
under-estimates a hit, it never invents one).

Events come from sockets: a malformed event (wrong types, a token id out of range) is counted in
``stats.unresolved`` and skipped, never raised; only the caller's own arguments (a slot outside
0..255, a tier outside 0..3) raise :class:`kvbm.errors.OutOfRangeError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvbm import _native

#: Tier numbers (bit offsets within an instance's 4 bits), best first.
GPU, CPU, DISK, REMOTE = 0, 1, 2, 3
TIER_NAMES = ("GPU", "CPU", "DISK", "REMOTE")
ALL_TIERS = (GPU, CPU, DISK, REMOTE)


def chain_keys(tokens: Sequence[int], block_size: int, extra: str | bytes | None = None, parent: int | None = None,
               limit: int | None = None) -> list[int]:
    """Router keys of the full blocks of ``tokens`` (at most ``limit``), chained from ``parent``
    (a router key) or from the root of ``(block_size, extra)``: exactly the keys a ``BlockStored``
    of those tokens gets.

    Raises:
        kvbm.errors.InvalidArgumentError: ``block_size < 1``, a token outside 0..2**32-1, or
            ``extra`` not None, str or bytes.
    """
    return _native.router_chain_keys(tokens, block_size, extra, parent, limit)


@dataclass
class IndexStats:
    stored: int = 0  # block stores applied
    removed: int = 0
    unresolved: int = 0  # blocks whose parent or tokens are unknown, or whose event was malformed
    evicted: int = 0  # keys dropped by the bound
    events: int = 0
    clears: int = 0


class BlockIndex:
    """Bounded key -> residency mask index over many instances (single-threaded; see the note).

    Raises:
        kvbm.errors.ConfigError: ``max_blocks`` is not in 1..2**30.
    """

    def __init__(self, max_blocks: int = 2_000_000) -> None:
        self._index = _native.RouterIndex(max_blocks)
        self.max_blocks = max_blocks

    def __len__(self) -> int:
        return len(self._index)

    @property
    def stats(self) -> IndexStats:
        """A snapshot of the counters."""
        return IndexStats(**self._index.stats())

    def memory_bytes(self) -> int:
        """Bytes held by the index's tables (their capacity)."""
        return self._index.memory_bytes()

    # -- events ----------------------------------------------------------------------------
    def apply(self, slot: int, events: Iterable[Any], clears: Iterable[int] = (GPU,)) -> None:
        """Apply one batch of decoded events (``BlockStored``, ``BlockRemoved``,
        ``AllBlocksCleared``; others are counted and ignored) published by instance ``slot``.

        ``clears``: the tiers an ``AllBlocksCleared`` on this stream empties (vLLM's stream: its
        GPU prefix cache; a kvbm stream: the tiers it publishes). Malformed events are counted
        in ``stats.unresolved``.

        Raises:
            kvbm.errors.OutOfRangeError: ``slot`` not in 0..255 or a tier not in 0..3.
        """
        self._index.apply(slot, events, clears)

    def store(self, slot: int, tier: int, hashes: Sequence[Any], parent: Any, token_ids: Sequence[int],
              block_size: int, extra: str | bytes | None = None) -> None:
        """Record ``hashes`` (engine hashes of consecutive blocks) as held by ``slot`` in ``tier``.

        With the tokens of every block (``len(token_ids) >= len(hashes) * block_size > 0``) the
        keys chain from ``parent``'s (all unresolved if the slot never reported ``parent``) or
        from the root; without, only hashes the slot reported before resolve.

        Raises:
            kvbm.errors.OutOfRangeError: bad ``slot`` or ``tier``.
            kvbm.errors.InvalidArgumentError: a hash that is not an int, bytes or str, a token
                outside 0..2**32-1, or ``extra`` not None, str or bytes (nothing is applied).
        """
        self._index.store(slot, tier, hashes, parent, token_ids, block_size, extra)

    def remove(self, slot: int, tier: int, hashes: Iterable[Any]) -> None:
        """``slot`` no longer holds these engine hashes in ``tier`` (unknown ones are ignored).

        Raises:
            kvbm.errors.OutOfRangeError: bad ``slot`` or ``tier``.
        """
        self._index.remove(slot, tier, hashes)

    def clear(self, slot: int, tiers: Iterable[int] = ALL_TIERS) -> None:
        """Forget every block ``slot`` holds in ``tiers`` (an instance reset, dropped or restarted);
        all four tiers also forget its engine hashes.

        Raises:
            kvbm.errors.OutOfRangeError: bad ``slot`` or tier.
        """
        self._index.clear(slot, tiers)

    # -- queries ---------------------------------------------------------------------------
    def overlap(self, keys: Sequence[int], slots: Sequence[int]) -> dict[int, list[int]]:
        """Per slot, the best tier of each block of the longest prefix of ``keys`` it can use.

        A block in a REMOTE tier (a shared store) counts for every slot, as REMOTE. A hit
        refreshes the key.

        Raises:
            kvbm.errors.OutOfRangeError: a slot not in 0..255.
            kvbm.errors.InvalidArgumentError: a key that is not an int in 0..2**64-1.
        """
        return self._index.overlap(keys, slots)

    def holders(self, key: int) -> dict[int, list[str]]:
        """slot -> tier names holding ``key`` (for tests and ``/debug``)."""
        return {s: [TIER_NAMES[t] for t in range(4) if bits >> t & 1] for s, bits in self._index.holders(key).items()}
