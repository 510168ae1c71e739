"""The router's block index: block key -> which instances hold it, in which tier.

Note [Router block keys]
------------------------
Engines name blocks with their own hashes (vLLM: 64-bit ints from sha256 of its own encoding;
kvbm: chained 128+-bit digests), which the router cannot compute from a request. So the router
keys blocks by its *own* chained hash of the tokens, ``key_i = hash((key_{i-1}, tokens_i,
extra))``, computed both for event blocks (from the event's ``token_ids``) and for requests (from
their token ids), with the block size of the instance that published the event. An engine hash is
mapped to its key per instance (``_emap``) so that a ``BlockRemoved`` (hashes only), a tokenless
``BlockStored`` of a known block, and a child's ``parent_block_hash`` resolve.

Python's tuple hash of ints is deterministic (no per-process seed) and 64 bits wide: collisions
cost at most a misrouted request, never wrong KV (engines verify their own hashes). LoRA names
and other extra keys are strings, whose hash is seeded per process: keys are only ever compared
inside one router process, which is all that is needed.

Residency is a bit mask per key: bit ``4 * slot + tier`` (tiers GPU, CPU, DISK, REMOTE), slots
assigned per instance. The index is bounded: at most ``max_blocks`` keys in LRU order (a store
or a hit refreshes a key: plain dicts, re-inserted at the end), and each instance's engine-hash
map is bounded the same way; past the bound the oldest keys go in bulk (1/16 of the bound more
than needed, so the cost is paid rarely); an evicted key is simply forgotten (the router then
under-estimates a hit, it never invents one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Tier numbers (bit offsets within an instance's 4 bits), best first.
GPU, CPU, DISK, REMOTE = 0, 1, 2, 3
TIER_NAMES = ("GPU", "CPU", "DISK", "REMOTE")
_MEDIUMS = {"GPU": GPU, None: GPU, "CPU": CPU, "HOST": CPU, "DISK": DISK, "STORAGE": DISK, "REMOTE": REMOTE}
_MASK64 = (1 << 64) - 1
_MAX_SLOTS = 256
_REMOTE_ANY = sum(1 << (4 * s + REMOTE) for s in range(_MAX_SLOTS))


def tier_of(medium: str | None) -> int:
    """Tier number of an event's ``medium`` (None is vLLM's GPU); unknown mediums count as DISK."""
    t = _TIER_OF.get(medium)
    if t is None:
        t = _MEDIUMS.get(medium.upper() if isinstance(medium, str) else medium, DISK)
        if len(_TIER_OF) < 64:  # mediums seen (a handful), not an unbounded cache of hostile strings
            _TIER_OF[medium] = t
    return t


_TIER_OF: dict[Any, int] = {}


def chain_keys(tokens: Sequence[int], block_size: int, extra: Any = None, parent: int | None = None,
               limit: int | None = None) -> list[int]:
    """Router keys of the full blocks of ``tokens`` (at most ``limit``), chained from ``parent``."""
    n = len(tokens) // block_size
    if limit is not None:
        n = min(n, limit)
    out: list[int] = []
    k = parent if parent is not None else hash((block_size, extra)) & _MASK64
    tt = tokens if isinstance(tokens, tuple) else tuple(tokens[:n * block_size])
    for i in range(0, n * block_size, block_size):
        k = hash((k, tt[i:i + block_size])) & _MASK64
        out.append(k)
    return out


@dataclass
class IndexStats:
    stored: int = 0  # block stores applied
    removed: int = 0
    unresolved: int = 0  # events naming a block whose parent or tokens are unknown
    evicted: int = 0  # keys dropped by the bound
    events: int = 0
    clears: int = 0


@dataclass
class Overlap:
    """What one instance holds of a request's prefix: ``tiers[i]`` is the best tier of block i."""

    tiers: list[int] = field(default_factory=list)


class BlockIndex:
    """Bounded key -> residency mask index over many instances (single-threaded; see the note)."""

    def __init__(self, max_blocks: int = 2_000_000) -> None:
        if max_blocks < 1:
            from kvbm.errors import ConfigError

            raise ConfigError(f"router index: max_blocks must be >= 1, got {max_blocks!r}")
        self.max_blocks = max_blocks
        # Plain dicts in recency order: a refresh re-inserts the key at the end (pop + set), the
        # bound drops the oldest in bulk (Note [Router block keys]).
        self._blocks: dict[int, int] = {}
        self._emap: dict[int, dict[Any, int]] = {}
        self.stats = IndexStats()

    def __len__(self) -> int:
        return len(self._blocks)

    # -- events ----------------------------------------------------------------------------
    def apply(self, slot: int, events: Iterable[Any], clears: Iterable[int] = (GPU,)) -> None:
        """Apply one batch of decoded events published by instance ``slot``.

        ``clears``: the tiers an ``AllBlocksCleared`` on this stream empties (vLLM's stream: its
        GPU prefix cache; a kvbm stream: the tiers it publishes).
        """
        for ev in events:
            self.stats.events += 1
            name = type(ev).__name__
            if name == "BlockStored":
                self.store(slot, tier_of(ev.medium), ev.block_hashes, ev.parent_block_hash, ev.token_ids,
                           ev.block_size, ev.lora_name)
            elif name == "BlockRemoved":
                self.remove(slot, tier_of(ev.medium), ev.block_hashes)
            elif name == "AllBlocksCleared":
                self.clear(slot, clears)

    def _emap_of(self, slot: int) -> dict[Any, int]:
        m = self._emap.get(slot)
        if m is None:
            m = self._emap[slot] = {}
        return m

    def store(self, slot: int, tier: int, hashes: Sequence[Any], parent: Any, token_ids: Sequence[int],
              block_size: int, extra: Any = None) -> None:
        """Record ``hashes`` (engine hashes of consecutive blocks) as held by ``slot`` in ``tier``.

        The hot path of the router (one call per ``BlockStored``): the chain of router keys is
        computed inline, with exactly :func:`chain_keys`'s formula (requests are keyed by it).
        """
        emap = self._emap.get(slot)
        if emap is None:
            emap = self._emap[slot] = {}
        blocks = self._blocks
        bit = 1 << (4 * slot + tier)
        n = len(hashes)
        if len(token_ids) >= n * block_size > 0:
            if parent is None:
                k = hash((block_size, extra)) & _MASK64
            else:
                k = emap.get(parent)
                if k is None:
                    self.stats.unresolved += n
                    return
            tt = token_ids if type(token_ids) is tuple else tuple(token_ids)
            pop, epop = blocks.pop, emap.pop
            i = 0
            for h in hashes:
                k = hash((k, tt[i:i + block_size])) & _MASK64
                i += block_size
                epop(h, None)  # re-inserted at the end: most recent
                emap[h] = k
                blocks[k] = pop(k, 0) | bit
        else:  # tokenless: only blocks already known on this instance resolve
            for h in hashes:
                k = emap.get(h)
                if k is None:
                    self.stats.unresolved += 1
                    continue
                emap[h] = emap.pop(h)
                blocks[k] = blocks.pop(k, 0) | bit
        self.stats.stored += n
        if len(blocks) > self.max_blocks or len(emap) > self.max_blocks:
            self._bound(emap)

    def _bound(self, emap: dict[Any, int]) -> None:
        """Drop the oldest keys past ``max_blocks`` (and 1/16 more, so the bound is paid in bulk)."""
        import itertools

        blocks = self._blocks
        for d, count in ((blocks, True), (emap, False)):
            over = len(d) - self.max_blocks
            if over > 0:
                n = over + self.max_blocks // 16
                for k in list(itertools.islice(d, n)):
                    del d[k]
                if count:
                    self.stats.evicted += n

    def remove(self, slot: int, tier: int, hashes: Iterable[Any]) -> None:
        """``slot`` no longer holds these engine hashes in ``tier``."""
        emap = self._emap.get(slot)
        if emap is None:
            return
        blocks = self._blocks
        clear = ~(1 << (4 * slot + tier))
        inst = 0xF << (4 * slot)
        for h in hashes:
            k = emap.get(h)
            if k is None:
                continue
            m = blocks.get(k)
            self.stats.removed += 1
            if m is None:
                continue
            m &= clear
            if m:
                blocks[k] = m
            else:
                del blocks[k]
            if not m & inst:
                del emap[h]

    def clear(self, slot: int, tiers: Iterable[int] = (GPU, CPU, DISK, REMOTE)) -> None:
        """Forget every block ``slot`` holds in ``tiers`` (an instance reset, dropped or restarted)."""
        self.stats.clears += 1
        mask = 0
        for t in tiers:
            mask |= 1 << (4 * slot + t)
        keep = ~mask
        blocks = self._blocks
        for k in [k for k, m in blocks.items() if m & mask]:
            m = blocks[k] & keep
            if m:
                blocks[k] = m
            else:
                del blocks[k]
        if mask == 0xF << (4 * slot):
            self._emap.pop(slot, None)

    # -- queries ---------------------------------------------------------------------------
    def overlap(self, keys: Sequence[int], slots: Sequence[int]) -> dict[int, list[int]]:
        """Per slot, the best tier of each block of the longest prefix of ``keys`` it can use.

        A block in a REMOTE tier (a shared store) counts for every slot, as REMOTE.
        """
        out: dict[int, list[int]] = {s: [] for s in slots}
        live = set(slots)
        blocks = self._blocks
        for k in keys:
            m = blocks.get(k)
            if m is None or not live:
                break
            blocks[k] = blocks.pop(k)  # a hit refreshes the key
            shared = bool(m & _REMOTE_ANY)
            for s in list(live):
                bits = (m >> (4 * s)) & 0xF
                if bits:
                    out[s].append((bits & -bits).bit_length() - 1)
                elif shared:
                    out[s].append(REMOTE)
                else:
                    live.discard(s)
        return out

    def holders(self, key: int) -> dict[int, list[str]]:
        """slot -> tier names holding ``key`` (for tests and ``/debug``)."""
        m = self._blocks.get(key, 0)
        out: dict[int, list[str]] = {}
        s = 0
        while m:
            bits = m & 0xF
            if bits:
                out[s] = [TIER_NAMES[t] for t in range(4) if bits >> t & 1]
            m >>= 4
            s += 1
        return out
