"""The local SSD tier: a persistent LMDB catalog over fixed-size slots in slab files.

Note [Disk tier design]
-----------------------
Two halves, so that vLLM's scheduler (decides) and worker (moves bytes) can run them apart:

* ``kvbm._native.DiskStore`` moves bytes: slot ``s`` lives in ``slab-NNNNN.kvbm`` number
  ``s // slots_per_slab`` at offset ``(s % slots_per_slab) * (RECORD_HEADER + slot_bytes)``: a
  4096-byte record header naming the block (hash, namespace digest, slot, length, CRC32C; Note
  [Records name themselves] in tiers/disk_store.h), then the bytes. O_DIRECT IO on a pool of
  threads; CRC32C computed on every write; on every read the header is checked against what the
  catalog says (a catalog key with a flipped bit is a miss, never another block's bytes) and the
  bytes against the CRC.
* :class:`DiskCatalog` (here) keeps the books: block hash -> record in LMDB, the free-slot map,
  pins of slots being read, and the eviction policy over slot numbers.
* :class:`DiskTier` joins both for single-process use (``put`` / ``get`` / ``lookup`` and
  async handles).

Directory layout::

    DIR/LOCK              flock'ed by the one process that may write (holds its pid)
    DIR/catalog/          LMDB environment: named DBs "meta", "blocks", "stats"
    DIR/slab-00000.kvbm   slab files (sparse; they grow as slots are written)

Record format (LMDB db "blocks"): key = the block hash as bytes (an int hash is stored as 16
big-endian bytes, or 32 when it needs more than 128 bits); value = 56 bytes little-endian::

    u8  version (=1)      u8 flags (0)        u16 reserved
    u32 crc32c of the block's bytes
    u64 slot              u64 length (bytes, <= slot_bytes)
    u64 namespace fingerprint
    u64 created (us since the epoch)   u64 last access (us)   u64 hit count

"meta" holds ``format`` (``kvbm-disk/2``; a ``/1`` catalog, from before record headers, is moved
aside like a damaged one and its header-less slots read as nothing) and ``geometry`` (JSON: slot_bytes, slots_per_slab;
for a sharded catalog also ``shards`` and ``shard_dirs``);
"stats" holds cumulative counters (checksum failures, drops, ...) that ``kvbm inspect`` shows.

Sharded catalogs (``shards > 1``, the vLLM connector with tensor parallelism): every block has one
shard per rank, each written by its own process into its own directory of slab files, at the same
slot. The record's ``crc`` is shard 0's; db "shards" holds, per key, the CRC32C of every shard
(``shards`` little-endian u32), written in the same txn as the record. A record without its
shard CRCs is dropped at open.

Write ordering (the durability contract):

1. *Evict first.* Slots taken from victims are deleted from the catalog in a committed txn
   before any new byte is written into them, so a crash can never leave a record pointing at
   another block's bytes.
2. *Data next.* The block is written into its (free) slot. With ``durability="batch"``
   (default) the write handle completes only after ``fdatasync`` of every slab touched
   (``"always"``: after each block), and LMDB syncs its data on commit (``"always"``: its meta
   page too); with ``"none"`` neither is synced: safe against a killed
   process (the OS holds the data), not against power loss — after which the CRC still turns
   any torn block into a counted miss.
3. *Catalog last.* One LMDB txn per batch inserts the records of the writes that succeeded. A
   block is visible to lookups only after this commit; a write that failed is never visible.

At start-up the catalog is reopened and the free-slot map rebuilt from it. Records whose data
cannot be complete are dropped in one txn: a slot out of range, a length of 0 or above the slot
size, a slot claimed twice (the newest record wins), a slab file missing or too short to hold the
block. Every remaining record's bytes are still CRC-checked when read. A malformed record (a
value that is not 56 bytes) is dropped the same way.

A catalog that cannot be used at all (a ``data.mdb`` shorter than its meta pages say, which would
SIGBUS on mapping; LMDB refusing it; a damaged meta DB) is moved aside to
``catalog.damaged-<time>-<pid>`` (one log line names it) and rebuilt from the slab record headers;
so is a missing catalog next to existing slabs (Note [Damaged catalog] in kvbm.tiers.disk_recovery).

Last-access times and hit counts are kept in memory and written with the next catalog txn (and
at close): after a crash they may be slightly stale; they never affect correctness.

One process writes a directory at a time: ``DIR/LOCK`` is ``flock``'ed (released by the kernel
if the process dies); a second writer gets :class:`~kvbm.errors.StorageIOError`. Readers that
only inspect (``kvbm inspect``) open the LMDB environment read-only without the lock; LMDB's
MVCC gives them a consistent snapshot while the writer runs.

Errors: a full disk (ENOSPC, EFBIG, EDQUOT) or another IO error on store degrades to "not
stored" with a counted error and a log line. A checksum mismatch, short read, wrong length or
other namespace on load is a miss, counted, and the record is dropped. Neither raises.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import lmdb
import numpy as np

from kvbm.errors import ConfigError, InvalidArgumentError
from kvbm.tiers.disk_catalog import (  # noqa: F401 - re-exported: the tier's public names stay here
    _SYNC_MODE,
    ALIGNMENT,
    CATALOG_SUBDIR,
    DURABILITY,
    FORMAT,
    LOCK_NAME,
    NAMESPACE_BYTES,
    PERSISTED_COUNTERS,
    RECORD,
    RECORD_DTYPE,
    RECORD_HEADER,
    DiskCatalog,
    DiskGeometry,
    HashLike,
    _check_dir,
    _is_space_error,
    _map_size_for,
    _now_us,
    _take_lock,
    hash_key,
    namespace_digest,
    namespace_fingerprint,
    slab_path,
)

log = logging.getLogger("kvbm.disk")


def _nbytes(obj: Any) -> int:
    if isinstance(obj, (int, np.integer)):
        return -1
    try:
        return memoryview(obj).nbytes
    except TypeError as e:
        raise InvalidArgumentError(
            f"expected a buffer (numpy array, bytes, bytearray, memoryview) or an int address, "
            f"got {type(obj).__name__}"
        ) from e


class DiskHandle:
    """An asynchronous disk put or get.

    ``poll()`` returns True once done (and then applies the outcome to the catalog), ``wait()``
    blocks and returns the per-block outcome (True = stored / loaded), ``error`` is the first
    per-block error message or None. A handle keeps the buffers it reads or writes alive.
    """

    def __init__(self, tier: DiskTier, kind: str, n: int) -> None:
        self._tier = tier
        self.kind = kind
        self._result = [False] * n
        self._native: Any = None
        self._finalize: Any = None
        self._done = False
        self.error: str | None = None

    def poll(self) -> bool:
        """True when the operation has finished and its outcome is applied."""
        if self._done:
            return True
        if self._native is not None and not self._native.done():
            return False
        self._tier._finish(self)
        return True

    def wait(self, timeout: float | None = None) -> list[bool]:
        """Block until done; returns one bool per block. TransferTimeoutError after ``timeout`` s."""
        if not self._done and self._native is not None:
            self._native.wait(timeout)
        self.poll()
        return list(self._result)

    def result(self) -> list[bool]:
        """The per-block outcome of a finished operation (StateError before it is done)."""
        if not self.poll():
            from kvbm.errors import StateError

            raise StateError(f"disk {self.kind} is still in flight")
        return list(self._result)

    def __len__(self) -> int:
        return len(self._result)


class DiskTier:
    """The local SSD tier for single-process use: DiskCatalog + native DiskStore.

    Blocks are byte strings of at most ``slot_bytes`` keyed by their hash (bytes or int).
    ``capacity_bytes // slot_bytes`` slots; when full, the eviction policy picks victims.
    Not thread-safe beyond an internal lock around catalog updates: drive it from one thread.

    Args: ``namespace`` is stored with every block and checked on load (another namespace is a
    miss); ``io_threads`` IO worker threads; ``o_direct`` try O_DIRECT (falls back with a
    RuntimeWarning where refused); ``durability`` "none" | "batch" | "always" (see the module
    note); ``verify_checksums`` check CRC32C on every load; ``eviction`` a name from
    ``kvbm.eviction_policies()`` (None: the default, its first); ``slab_bytes`` slab file size for a new directory;
    ``preallocate`` fallocate slabs at open (best effort).

    Raises ConfigError for a bad configuration (missing or unwritable directory, capacity below
    one slot, slot size not a multiple of 4096, unknown durability) and StorageIOError when
    another process holds the directory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        slot_bytes: int,
        capacity_bytes: int,
        namespace: int | bytes | str = 0,
        io_threads: int = 4,
        o_direct: bool = True,
        durability: str = "batch",
        verify_checksums: bool = True,
        eviction: str | None = None,
        slab_bytes: int = 1 << 30,
        preallocate: bool = True,
    ) -> None:
        from kvbm import _native

        self.path = os.fspath(path)
        if not isinstance(slot_bytes, int) or slot_bytes <= 0 or slot_bytes % ALIGNMENT:
            raise ConfigError(
                f"disk slot size {slot_bytes} must be a positive multiple of {ALIGNMENT} (the O_DIRECT alignment)"
            )
        if not isinstance(capacity_bytes, int) or capacity_bytes < slot_bytes:
            raise ConfigError(
                f"disk_capacity_bytes {capacity_bytes} is less than one slot of {slot_bytes} bytes"
            )
        if not isinstance(io_threads, int) or not 1 <= io_threads <= 256:
            raise ConfigError(f"disk_io_threads {io_threads} must be in [1, 256]")
        self.namespace_digest = namespace_digest(namespace)
        self.namespace = namespace_fingerprint(self.namespace_digest)
        self.verify_checksums = bool(verify_checksums)
        self.durability = durability
        self._lock = threading.RLock()
        self._inflight: list[DiskHandle] = []
        self.catalog = DiskCatalog(
            self.path,
            slot_bytes=slot_bytes,
            num_slots=capacity_bytes // slot_bytes,
            slab_bytes=slab_bytes,
            durability=durability,
            eviction=eviction,
            slab_namespaces=[self.namespace_digest],
            record_ns=self.namespace,
        )
        try:
            geo = self.catalog.geometry
            self.store = _native.DiskStore(
                self.path, geo.slot_bytes, geo.num_slots, geo.slots_per_slab, io_threads, bool(o_direct),
                False, bool(preallocate), namespace=self.namespace_digest,
            )  # fmt: skip
        except BaseException:
            self.catalog.close()
            raise
        if o_direct and not self.store.o_direct_active:
            msg = (
                f"kvbm disk tier {self.path}: the file system refused O_DIRECT "
                f"({self.store.fallback_reason}); using buffered IO (page cache) instead"
            )
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if self.store.prealloc_error:
            log.warning("disk tier %s: slabs not preallocated (%s); they grow as written", self.path,
                        self.store.prealloc_error)  # fmt: skip
        self.counters: dict[str, int] = dict.fromkeys(
            ("lookups", "hits", "misses", "stores", "stored_bytes", "loads", "loaded_bytes", "io_errors", "removals"),
            0,
        )
        self._closed = False

    # ---- geometry / queries ----

    @property
    def slot_bytes(self) -> int:
        return self.catalog.geometry.slot_bytes

    @property
    def num_slots(self) -> int:
        return self.catalog.geometry.num_slots

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def o_direct_active(self) -> bool:
        return bool(self.store.o_direct_active)

    def __len__(self) -> int:
        return len(self.catalog)

    def contains(self, h: bytes | int) -> bool:
        """True if the block is stored (committed) under this tier's namespace."""
        with self._lock:
            self._reap()
            s = self.catalog.slot_of(hash_key(h))
            return s >= 0 and int(self.catalog._ns[s]) == self.namespace

    def __contains__(self, h: bytes | int) -> bool:
        return self.contains(h)

    def lookup(self, hashes: Sequence[bytes | int]) -> int:
        """Length of the longest prefix of ``hashes`` stored here (O(prefix length))."""
        with self._lock:
            self._reap()
            n = 0
            self.counters["lookups"] += 1
            for h in hashes:
                s = self.catalog.slot_of(hash_key(h))
                if s < 0 or int(self.catalog._ns[s]) != self.namespace:
                    break
                n += 1
            return n

    def length_of(self, h: bytes | int) -> int:
        """Stored length in bytes of a block, or -1 if absent."""
        with self._lock:
            s = self.catalog.slot_of(hash_key(h))
            return -1 if s < 0 else int(self.catalog._len[s])

    def keys(self) -> list[bytes]:
        """Catalog keys of all stored blocks."""
        with self._lock:
            self._reap()
            return self.catalog.keys()

    def __iter__(self) -> Iterator[bytes]:
        """Iterate over a snapshot of the catalog keys."""
        return iter(self.keys())

    # ---- store ----

    def put_async(
        self,
        hashes: Sequence[bytes | int],
        blocks: Sequence[Any],
        *,
        lengths: Sequence[int] | None = None,
        parents: Sequence[bytes | int | None] | None = None,
    ) -> DiskHandle:
        """Start writing ``blocks[i]`` (a buffer, or an int address with ``lengths[i]``) under ``hashes[i]``.

        Blocks already stored (or being stored) are skipped. When no slot can be found (all
        pinned) a block is not stored. Returns a DiskHandle whose per-block result says whether
        the block is stored once done; IO errors and a full disk give False, a counted error and
        a log line. Raises InvalidArgumentError for mismatched argument lengths, a block larger
        than the slot size, an int address without a length, or a block that is its own parent.
        """
        n = len(hashes)
        if len(blocks) != n:
            raise InvalidArgumentError(f"put: {len(blocks)} blocks for {n} hashes")
        if lengths is not None and len(lengths) != n:
            raise InvalidArgumentError(f"put: {len(lengths)} lengths for {n} hashes")
        if parents is not None and len(parents) != n:
            raise InvalidArgumentError(f"put: {len(parents)} parents for {n} hashes")
        keys = [hash_key(h) for h in hashes]
        lens: list[int] = []
        for i, b in enumerate(blocks):
            nb = _nbytes(b)
            ln = int(lengths[i]) if lengths is not None else nb
            if ln < 0:
                raise InvalidArgumentError(f"put: blocks[{i}] is an address: give lengths")
            if nb >= 0 and ln > nb:
                raise InvalidArgumentError(f"put: lengths[{i}]={ln} exceeds the buffer's {nb} bytes")
            if not 0 < ln <= self.slot_bytes:
                raise InvalidArgumentError(f"put: block {i} has {ln} bytes; must be 1..slot_bytes={self.slot_bytes}")
            lens.append(ln)
        pkeys = [None if p is None else hash_key(p) for p in parents] if parents is not None else None
        if pkeys is not None:
            for i, (k, p) in enumerate(zip(keys, pkeys, strict=True)):
                if p == k:  # finding 7: refused here, before anything is reserved or written
                    raise InvalidArgumentError(f"put: parents[{i}]: block {k.hex()} cannot be its own parent")
        h = DiskHandle(self, "put", n)
        with self._lock:
            self._check_open()
            self._reap()
            slots = self.catalog.reserve(keys)
            idx = [i for i, s in enumerate(slots) if s >= 0]
            wkeys = [keys[i] for i in idx]
            wslots = [slots[i] for i in idx]
            try:
                h._native = self.store.write(
                    wslots, [blocks[i] for i in idx], [lens[i] for i in idx], _SYNC_MODE[self.durability], wkeys
                )
            except BaseException:
                self.catalog.abort(wkeys, wslots)
                raise
            h._finalize = ("put", keys, idx, wkeys, wslots, [lens[i] for i in idx],
                           [pkeys[i] for i in idx] if pkeys is not None else None)  # fmt: skip
            self._inflight.append(h)
        return h

    def put(
        self,
        hashes: Sequence[bytes | int],
        blocks: Sequence[Any],
        *,
        lengths: Sequence[int] | None = None,
        parents: Sequence[bytes | int | None] | None = None,
    ) -> list[bool]:
        """Synchronous :meth:`put_async`: returns, per block, whether it is stored."""
        return self.put_async(hashes, blocks, lengths=lengths, parents=parents).wait()

    # ---- load ----

    def get_async(self, hashes: Sequence[bytes | int], outs: Sequence[Any]) -> DiskHandle:
        """Start reading blocks into ``outs[i]`` (a writable buffer of exactly the stored length, or
        an int address with room for it).

        The handle's per-block result is True for a verified hit; a block that is absent, of
        another namespace, of another length than ``outs[i]``, short on disk or failing its CRC32C
        is a miss (False): counted, and a bad one is dropped from the catalog. Never serves wrong
        bytes as a hit (the buffer of a miss may hold garbage). Raises InvalidArgumentError for
        mismatched argument lengths or a read-only buffer.
        """
        n = len(hashes)
        if len(outs) != n:
            raise InvalidArgumentError(f"get: {len(outs)} output buffers for {n} hashes")
        keys = [hash_key(h) for h in hashes]
        sizes = [_nbytes(o) for o in outs]
        h = DiskHandle(self, "get", n)
        cat = self.catalog
        with self._lock:
            self._check_open()
            self._reap()
            idx: list[int] = []
            bad_ns: list[bytes] = []
            bad_len: list[bytes] = []
            for i, k in enumerate(keys):
                s = cat.slot_of(k)
                if s < 0:
                    continue
                if int(cat._ns[s]) != self.namespace:
                    bad_ns.append(k)
                    continue
                if sizes[i] >= 0 and sizes[i] != int(cat._len[s]):
                    bad_len.append(k)
                    continue
                idx.append(i)
            if bad_ns:
                log.warning("disk tier %s: %d blocks of another namespace dropped", self.path, len(bad_ns))
                cat.drop(bad_ns, "namespace_mismatches")
            if bad_len:
                log.warning("disk tier %s: %d blocks of unexpected length dropped", self.path, len(bad_len))
                cat.drop(bad_len, "length_mismatches")
            # A key asked for twice, once with a wrong-sized buffer, was just dropped: no read
            # (and no pin) for its other occurrence (finding 8: slot_of -1 pinned the last slot).
            idx = [i for i in idx if cat.slot_of(keys[i]) >= 0]
            rslots = [cat.slot_of(keys[i]) for i in idx]
            for s in rslots:
                cat.pin(s)
            try:
                h._native = self.store.read(
                    rslots,
                    [outs[i] for i in idx],
                    [int(cat._len[s]) for s in rslots],
                    [int(cat._crc[s]) for s in rslots],
                    self.verify_checksums,
                    [keys[i] for i in idx],
                )
            except BaseException:
                for s in rslots:
                    cat.unpin(s)
                raise
            h._finalize = ("get", keys, idx, rslots)
            self._inflight.append(h)
        return h

    def get(self, hashes: Sequence[bytes | int], outs: Sequence[Any]) -> list[bool]:
        """Synchronous :meth:`get_async`: per block, True if ``outs[i]`` now holds its verified bytes."""
        return self.get_async(hashes, outs).wait()

    def remove(self, hashes: Sequence[bytes | int]) -> int:
        """Drop blocks from the tier; returns how many were present."""
        with self._lock:
            self._reap()
            n = self.catalog.drop([hash_key(h) for h in hashes])
            self.counters["removals"] += n
            return n

    # ---- completion ----

    def _reap(self) -> None:
        if self._inflight:
            for h in [h for h in self._inflight if h._native is None or h._native.done()]:
                self._finish(h)

    def _finish(self, h: DiskHandle) -> None:
        with self._lock:
            if h._done:
                return
            if h._native is not None and not h._native.done():
                h._native.wait(None)
            try:
                self._apply(h)
            finally:
                # Whatever happened applying it, the handle is no longer in flight (finding 7:
                # one failed commit must not make every later store, lookup and close raise).
                h._done = True
                with contextlib.suppress(ValueError):
                    self._inflight.remove(h)

    def _apply(self, h: DiskHandle) -> None:
        """Apply a finished operation's outcome to the catalog and counters."""
        kind = h._finalize[0]
        codes, crcs, errnos, msgs = h._native.results()
        cat = self.catalog
        if kind == "put":
            _, keys, idx, wkeys, wslots, wlens, wparents = h._finalize
            ok = (codes == 0).tolist()
            stored = cat.commit(wkeys, wslots, wlens, crcs.tolist(), ok, self.namespace, wparents)
            for j, i in enumerate(idx):
                h._result[i] = stored[j]
                if stored[j]:
                    self.counters["stores"] += 1
                    self.counters["stored_bytes"] += wlens[j]
            enospc = sum(1 for j, e in enumerate(errnos.tolist()) if not ok[j] and
                         e in (_errno.ENOSPC, _errno.EFBIG, _errno.EDQUOT))  # fmt: skip
            io_fail = sum(1 for x in ok if not x)
            if io_fail:
                first = next(m for m in msgs if m)
                h.error = first
                self.counters["io_errors"] += io_fail
                cat._count("store_failures", io_fail)
                if enospc:
                    cat._count("enospc", enospc)
                log.error("disk tier %s: %d of %d block writes failed (not stored): %s",
                          self.path, io_fail, len(ok), first)  # fmt: skip
            # Blocks already present (skipped, or stored by an earlier put) count as stored.
            for i, k in enumerate(keys):
                if not h._result[i] and k in cat:
                    h._result[i] = True
        else:
            _, keys, idx, rslots = h._finalize
            bad: dict[str, list[bytes]] = {}
            for j, i in enumerate(idx):
                s = rslots[j]
                c = int(codes[j])
                if c == 0:
                    h._result[i] = True
                    cat.record_hit(s)
                    self.counters["loaded_bytes"] += int(cat._len[s])
                    continue
                if h.error is None:
                    h.error = msgs[j]
                if c == _CODE_CHECKSUM:
                    reason = "checksum_failures"
                elif int(errnos[j]) == 0:
                    reason = "short_reads"
                else:
                    reason = "read_errors"
                bad.setdefault(reason, []).append(keys[i])
            for s in rslots:
                cat.unpin(s)
            for reason, ks in bad.items():
                log.warning("disk tier %s: %d blocks failed on load (%s), dropped: %s",
                            self.path, len(ks), reason, h.error)  # fmt: skip
                cat.drop(ks, reason)
            nhit = sum(h._result)
            self.counters["hits"] += nhit
            self.counters["loads"] += nhit
            self.counters["misses"] += len(keys) - nhit

    def poll_all(self) -> None:
        """Apply the outcome of every finished operation (commits finished puts)."""
        with self._lock:
            self._reap()

    def _check_open(self) -> None:
        if self._closed:
            from kvbm.errors import StateError

            raise StateError(f"disk tier {self.path} is closed")

    # ---- stats / lifetime ----

    def stats(self) -> dict[str, Any]:
        """Counters of this session plus the tier's state (blocks, bytes, free slots, totals).

        ``totals`` are cumulative over the directory's life (persisted in the catalog).
        """
        with self._lock:
            self._reap()
            cat = self.catalog
            d: dict[str, Any] = dict(self.counters)
            d.update({k: v for k, v in cat.counters.items()})
            d.update(
                blocks=len(cat),
                bytes_used=cat.bytes_used,
                capacity_bytes=self.capacity_bytes,
                slot_bytes=self.slot_bytes,
                slots_total=self.num_slots,
                slots_free=cat.free_slots,
                pinned_blocks=int((cat._pins > 0).sum()),
                o_direct=self.o_direct_active,
                io=self.store.stats(),
                totals=dict(cat.totals),
                rebuild_seconds=cat.rebuild_seconds,
            )
            return d

    def flush(self) -> None:
        """Wait for in-flight operations and write catalog metadata (access times, counters)."""
        with self._lock:
            for h in list(self._inflight):
                self._finish(h)
            self.catalog.flush()

    def close(self) -> None:
        """Finish in-flight IO, close slab files and the catalog, release the lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                for h in list(self._inflight):
                    self._finish(h)
            finally:
                self._closed = True
                self.store.close()
                self.catalog.close()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except (lmdb.Error, OSError) as e:
                log.warning("disk tier %s: close at garbage collection failed: %s", self.path, e)


def _codes() -> tuple[int, int]:
    from kvbm import _native

    return int(_native.DISK_CODE_IO), int(_native.DISK_CODE_CHECKSUM)


_CODE_IO, _CODE_CHECKSUM = _codes()
