"""Replay a request trace through the real block index and eviction policy.

The trace is JSON Lines in the Mooncake format: one object per request whose ``hash_ids`` list
holds the chained block ids of the prompt (a shared prefix shows as a shared leading run of ids;
other keys such as ``timestamp`` or ``input_length`` are ignored). Blank lines are skipped.

Semantics (those of the trace's reference figures, ``kvbm/data/README.md``): one host tier of
``round(capacity * distinct_blocks)`` slots is configured in a :class:`kvbm._native.BlockIndex`
with the chosen policy. For each request, in file order:

1. ``lookup`` of the whole chain: the hit is the leading run of blocks present (and those hit
   blocks count as used for the policy);
2. ``prepare_store`` of the whole chain, then ``complete_store`` of the blocks that got a slot
   (the missing ones, inserted as a chain: each block's parent is the block before it).
   Blocks already present are left where they are. A request longer than the whole tier stores
   only its leading ``capacity_blocks`` blocks (a prefix is what can hit later).

The prefix-hit ratio is ``hit_blocks / blocks`` over all prompt blocks. Block ids map to
16-byte keys deterministically (splitmix64 of the id, then the id + 1), so runs are
reproducible and the index's hash table sees well-spread keys.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvbm import _native
from kvbm.errors import ConfigError, InvalidArgumentError, TraceFormatError

_HOST_TIER = 1
_MAX_ID = (1 << 63) - 1


@dataclass
class Trace:
    """A parsed trace: per request, the row of each block id in ``ids``.

    Attributes:
        path: where it was read from (for messages).
        requests: one int64 array per request, indexes into ``ids``.
        ids: the distinct block ids, in order of first appearance.
    """

    path: str
    requests: list[np.ndarray]
    ids: np.ndarray

    @property
    def num_blocks(self) -> int:
        """All prompt blocks over all requests (a block counts once per request using it)."""
        return int(sum(len(r) for r in self.requests))

    @property
    def distinct_blocks(self) -> int:
        return len(self.ids)


@dataclass
class ReplayResult:
    """What a replay measured; :meth:`to_dict` gives plain data for JSON."""

    trace: str
    policy: str
    capacity_fraction: float
    capacity_blocks: int
    requests: int
    blocks: int
    distinct_blocks: int
    hit_blocks: int
    prefix_hit_ratio: float
    evictions: int
    seconds: float
    parse_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_lines(p: Path) -> list[bytes]:
    """The file's lines; ``.xz`` and ``.gz`` files are decompressed on the fly.

    Raises:
        InvalidArgumentError: unreadable, or not a valid/complete compressed file.
    """
    import gzip
    import lzma

    try:
        if p.suffix == ".xz":
            with lzma.open(p, "rb") as f:
                return f.read().splitlines()
        if p.suffix == ".gz":
            with gzip.open(p, "rb") as f:
                return f.read().splitlines()
        return p.read_bytes().splitlines()
    except (lzma.LZMAError, EOFError) as e:
        raise InvalidArgumentError(f"trace {str(p)!r}: cannot read: not a complete {p.suffix} file ({e})") from None
    except OSError as e:  # gzip.BadGzipFile is an OSError without strerror
        raise InvalidArgumentError(f"trace {str(p)!r}: cannot read: {e.strerror or e}") from None


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and check a Mooncake-format JSONL trace (plain, ``.xz`` or ``.gz``).

    Every non-blank line must be a JSON object with a ``hash_ids`` list of integers in
    0..2**63-1, and ids must be chained consistently: an id is always preceded by the same id
    (or always first), since an id names a block *and* its whole prefix.

    Raises:
        TraceFormatError: a malformed line; the message names the file and line number.
        InvalidArgumentError: the file cannot be read.
    """
    p = Path(path)
    lines = _read_lines(p)
    row_of: dict[int, int] = {}
    parent_of: list[int] = []  # row -> parent row (-1 = chain root)
    seen_at: list[int] = []  # row -> line first seen
    row_ids: list[int] = []  # row -> block id
    requests: list[np.ndarray] = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{p}: line {lineno}"
        try:
            obj = json.loads(raw)
        except RecursionError:
            raise TraceFormatError(f"{where}: JSON nests too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
            msg = str(e) if len(str(e)) <= 200 else str(e)[:200] + "..."
            raise TraceFormatError(f"{where}: not valid JSON ({msg})") from None
        if not isinstance(obj, dict):
            raise TraceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "hash_ids" not in obj:
            raise TraceFormatError(f"{where}: missing 'hash_ids'")
        ids = obj["hash_ids"]
        if not isinstance(ids, list):
            raise TraceFormatError(f"{where}: 'hash_ids' must be a list, got {type(ids).__name__}")
        rows = np.empty(len(ids), dtype=np.int64)
        parent = -1
        for i, b in enumerate(ids):
            if isinstance(b, bool) or not isinstance(b, int):
                got = repr(b) if len(repr(b)) <= 80 else f"a {type(b).__name__} value"
                raise TraceFormatError(f"{where}: hash_ids[{i}] must be an integer, got {got}")
            if not 0 <= b <= _MAX_ID:
                shown = b if b.bit_length() <= 128 else f"an integer of {b.bit_length()} bits"
                raise TraceFormatError(f"{where}: hash_ids[{i}] = {shown} is outside 0..2**63-1")
            r = row_of.get(b)
            if r is None:
                r = len(parent_of)
                row_of[b] = r
                parent_of.append(parent)
                seen_at.append(lineno)
                row_ids.append(b)
            elif parent_of[r] != parent:
                def desc(row: int) -> str:
                    return "the first block of its chain" if row < 0 else f"after block {row_ids[row]}"

                raise TraceFormatError(
                    f"{where}: hash_ids[{i}] = {b} is not chained consistently: here it comes "
                    f"{desc(parent)}, at line {seen_at[r]} it came {desc(parent_of[r])}"
                )
            rows[i] = r
            parent = r
        requests.append(rows)
    ids_arr = np.array(row_ids, dtype=np.uint64)
    return Trace(str(p), requests, ids_arr)


def block_keys(ids: np.ndarray) -> np.ndarray:
    """The 16-byte index key of each block id: a ``(n, 16)`` uint8 array.

    Bytes 0-7 are splitmix64(id), bytes 8-15 are id + 1 (little-endian), so a key is never the
    all-zero "no parent" key and distinct ids give distinct keys.
    """
    z = np.asarray(ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = z + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
        out = np.empty((len(z), 2), dtype="<u8")
        out[:, 0] = x
        out[:, 1] = z + np.uint64(1)
    return out.view(np.uint8).reshape(len(z), 16)


def resolve_policy(policy: str | None) -> str:
    """The policy name to use (None = the default, the first of ``kvbm.eviction_policies()``).

    Raises:
        ConfigError: an unknown name; the message lists the known ones.
    """
    known = list(_native.eviction_policy_names())
    if policy is None:
        return known[0]
    if policy not in known:
        raise ConfigError(f"eviction policy: unknown policy {policy!r}; known: {', '.join(known)}")
    return policy


def check_capacity(capacity: float) -> float:
    """Validate a capacity fraction: a real number in (0, 1].

    Raises:
        InvalidArgumentError: not a number, NaN, <= 0 or > 1.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
        raise InvalidArgumentError(f"capacity: expected a fraction in (0, 1], got {capacity!r}")
    c = float(capacity)
    if math.isnan(c) or not 0.0 < c <= 1.0:
        raise InvalidArgumentError(
            f"capacity: must be a fraction of the trace's distinct blocks in (0, 1], got {capacity!r}"
        )
    return c


def _open_trace(trace: str | os.PathLike | Trace, cap_frac: float) -> tuple[Trace, int, int, float]:
    """(trace, distinct blocks, capacity in blocks, parse seconds); InvalidArgumentError when empty."""
    t0 = time.perf_counter()
    tr = trace if isinstance(trace, Trace) else load_trace(trace)
    parse_seconds = time.perf_counter() - t0
    distinct = tr.distinct_blocks
    if distinct == 0:
        raise InvalidArgumentError(f"trace {tr.path!r} holds no blocks")
    return tr, distinct, max(1, round(cap_frac * distinct)), parse_seconds


def replay(
    trace: str | os.PathLike | Trace,
    capacity: float = 0.1,
    policy: str | None = None,
) -> ReplayResult:
    """Replay ``trace`` through a real :class:`kvbm._native.BlockIndex` (see the module doc).

    Args:
        trace: a path to a JSONL trace, or a :class:`Trace` from :func:`load_trace`.
        capacity: the tier's size as a fraction of the trace's distinct blocks, in (0, 1].
        policy: an eviction policy name; None = the default policy.

    Raises:
        InvalidArgumentError: bad capacity, unreadable file, or a trace with no blocks.
        ConfigError: unknown policy.
        TraceFormatError: a malformed trace line (names the line number).
    """
    cap_frac = check_capacity(capacity)
    pol = resolve_policy(policy)
    tr, distinct, cap_blocks, parse_seconds = _open_trace(trace, cap_frac)

    keys = block_keys(tr.ids)
    index = _native.BlockIndex(min(distinct, 1 << 30))
    index.configure_tier(_HOST_TIER, cap_blocks, 1, pol)
    longest = max((len(r) for r in tr.requests), default=0)
    tiers_out = np.empty(max(1, longest), dtype=np.uint8)

    t1 = time.perf_counter()
    hit_blocks = 0
    for rows in tr.requests:
        if len(rows) == 0:
            continue
        k = keys[rows]  # (n, 16), contiguous
        hit_blocks += int(index.lookup_into(k, tiers_out))
        if len(k) > cap_blocks:
            k = k[:cap_blocks]
        slots, _ = index.prepare_store(_HOST_TIER, k, None)
        new = slots >= 0
        if new.any():
            index.complete_store(_HOST_TIER, k if new.all() else k[new])
    seconds = time.perf_counter() - t1

    blocks = tr.num_blocks
    return ReplayResult(
        trace=tr.path,
        policy=pol,
        capacity_fraction=cap_frac,
        capacity_blocks=cap_blocks,
        requests=len(tr.requests),
        blocks=blocks,
        distinct_blocks=distinct,
        hit_blocks=hit_blocks,
        prefix_hit_ratio=hit_blocks / blocks if blocks else 0.0,
        evictions=int(index.counters(_HOST_TIER)["evictions"]),
        seconds=seconds,
        parse_seconds=parse_seconds,
    )


#: The policy name :func:`replay_clairvoyant` reports.
CLAIRVOYANT = "clairvoyant"


def replay_clairvoyant(trace: str | os.PathLike | Trace, capacity: float = 0.1) -> ReplayResult:
    """The same replay as :func:`replay` with an offline policy that knows the future: Belady's
    rule (evict the block whose next use is farthest; do not admit a block used later than every
    block it would displace). A reference line for the online policies, not a proven optimum for
    prefix hits (a block kept without its prefix hits nothing).

    Raises: as :func:`replay` (bad capacity, unreadable or empty trace).
    """
    import heapq

    cap_frac = check_capacity(capacity)
    tr, distinct, cap_blocks, parse_seconds = _open_trace(trace, cap_frac)
    t1 = time.perf_counter()
    reqs = [r.tolist() for r in tr.requests]
    uses: list[list[int]] = [[] for _ in range(distinct)]  # per block: the requests that store it, in order
    for t, rows in enumerate(reqs):
        for r in rows[:cap_blocks]:
            if not uses[r] or uses[r][-1] != t:
                uses[r].append(t)
    never = len(reqs)
    ptr = [0] * distinct
    nxt = [never] * distinct  # next use of a cached block (valid while cached)
    cached: set[int] = set()
    heap: list[tuple[int, int]] = []  # (-next use, block), stale entries skipped
    hit_blocks = evictions = 0
    for t, rows in enumerate(reqs):
        for r in rows:
            if r not in cached:
                break
            hit_blocks += 1
        for r in rows[:cap_blocks]:
            u, p = uses[r], ptr[r]
            while p < len(u) and u[p] <= t:
                p += 1
            ptr[r] = p
            nu = u[p] if p < len(u) else never
            if r not in cached:
                if len(cached) >= cap_blocks:
                    while heap and (heap[0][1] not in cached or nxt[heap[0][1]] != -heap[0][0]):
                        heapq.heappop(heap)
                    if not heap or nu >= -heap[0][0]:
                        continue  # used later than everything cached: not admitted
                    cached.discard(heapq.heappop(heap)[1])
                    evictions += 1
                cached.add(r)
            nxt[r] = nu
            heapq.heappush(heap, (-nu, r))
    blocks = tr.num_blocks
    return ReplayResult(trace=tr.path, policy=CLAIRVOYANT, capacity_fraction=cap_frac, capacity_blocks=cap_blocks,
                        requests=len(reqs), blocks=blocks, distinct_blocks=distinct, hit_blocks=hit_blocks,
                        prefix_hit_ratio=hit_blocks / blocks if blocks else 0.0, evictions=evictions,
                        seconds=time.perf_counter() - t1, parse_seconds=parse_seconds)
