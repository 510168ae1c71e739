"""The disk tier's catalog: the persistent LMDB index of one disk tier directory (block hash ->
slot, length, CRC, namespace, times, hits), its free-slot map, pins and eviction, and the record
format and helpers it shares with :mod:`kvbm.tiers.disk` (the tier itself, whose module doc
describes the layout, write ordering and crash safety). Split out of kvbm/tiers/disk.py, which
re-exports every name here.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import hashlib
import heapq
import json
import logging
import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb
import numpy as np

from kvbm.errors import ConfigError, InvalidArgumentError, KvbmError, StorageIOError
from kvbm.hashing import hash_key as _hash_key  # the one hash normaliser
from kvbm.tiers.disk_recovery import (
    CATALOG_DAMAGE,
    LMDB_ENVIRONMENT_ERRORS,
    CatalogDamagedError,
    has_slabs,
    is_catalog_damage,
    lmdb_file_problem,
    quarantine,
    slab_records,
)

log = logging.getLogger("kvbm.disk")

FORMAT = b"kvbm-disk/2"  # /2: slab records carry a header (Note [Records name themselves], disk_store.h)
RECORD = struct.Struct("<BBHIQQQQQQ")
RECORD_DTYPE = np.dtype(
    [
        ("version", "<u1"),
        ("flags", "<u1"),
        ("reserved", "<u2"),
        ("crc", "<u4"),
        ("slot", "<u8"),
        ("length", "<u8"),
        ("ns", "<u8"),
        ("created_us", "<u8"),
        ("access_us", "<u8"),
        ("hits", "<u8"),
    ]
)
assert RECORD_DTYPE.itemsize == RECORD.size == 56
ALIGNMENT = 4096
RECORD_HEADER = 4096  # bytes of the record header before every slot's data in its slab
NAMESPACE_BYTES = 16
DURABILITY = ("none", "batch", "always")
_SYNC_MODE = {"none": 0, "batch": 1, "always": 2}
CATALOG_SUBDIR = "catalog"
LOCK_NAME = "LOCK"

# Counters persisted in the "stats" db (cumulative over the directory's life).
PERSISTED_COUNTERS = (
    "checksum_failures",
    "short_reads",
    "read_errors",
    "length_mismatches",
    "namespace_mismatches",
    "dropped_at_open",
    "store_failures",
    "enospc",
    "evictions",
    "record_mismatches",
    "catalog_rebuilds",
)

HashLike = "bytes | int"


def hash_key(h: bytes | bytearray | memoryview | int | np.integer) -> bytes:
    """The catalog key of a block hash: :func:`kvbm.hashing.hash_key` with 1..256-byte keys
    kept as given and ints as 16 (or 32) big-endian bytes. Raises InvalidArgumentError."""
    return _hash_key(h, "block hash", variable_length=True)


def namespace_digest(namespace: int | bytes | str) -> bytes:
    """The 16-byte namespace digest stamped into every slab record.

    A 16-byte ``bytes`` (e.g. a ``Namespace.digest``) is used as is, an int as 16 little-endian
    bytes (mod 2**128), any other bytes or str is hashed (BLAKE2b-128).
    """
    if isinstance(namespace, (int, np.integer)):
        return (int(namespace) % (1 << 128)).to_bytes(NAMESPACE_BYTES, "little")
    if isinstance(namespace, str):
        namespace = namespace.encode()
    if isinstance(namespace, (bytes, bytearray, memoryview)):
        b = bytes(namespace)
        return b if len(b) == NAMESPACE_BYTES else hashlib.blake2b(b, digest_size=NAMESPACE_BYTES).digest()
    raise InvalidArgumentError(f"namespace must be an int, bytes or str, got {type(namespace).__name__}")


def namespace_fingerprint(namespace: int | bytes | str) -> int:
    """The 64-bit fingerprint of a namespace kept in catalog records: the first 8 bytes (little
    endian) of :func:`namespace_digest` (so an int below 2**64 is its own fingerprint)."""
    return int.from_bytes(namespace_digest(namespace)[:8], "little")


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class DiskGeometry:
    """Slot layout of a disk tier directory."""

    slot_bytes: int
    slots_per_slab: int
    num_slots: int

    def slot_offset(self, slot: int) -> tuple[int, int]:
        """(slab number, byte offset of its record header in that slab) of ``slot``."""
        return slot // self.slots_per_slab, (slot % self.slots_per_slab) * self.slot_stride

    @property
    def slot_stride(self) -> int:
        """Bytes a slot occupies in its slab: record header + slot_bytes."""
        return self.slot_bytes + RECORD_HEADER


def slab_path(path: str, slab: int) -> str:
    """Path of slab file number ``slab`` in directory ``path`` (same naming as the native store)."""
    return os.path.join(path, f"slab-{slab:05d}.kvbm")


def _map_size_for(num_slots: int) -> int:
    # ~100-250 bytes per record in the B-tree; the map is virtual (the file grows as needed).
    return max(256 << 20, num_slots * 1024)


class DiskCatalog:
    """Persistent block catalog of one disk tier directory (the bookkeeping half).

    Holds hash -> slot records in LMDB and, in memory, the free-slot map, pins and the eviction
    policy over slot numbers. It never touches slab data except to stat slab sizes at open.
    Not thread-safe: one thread (or a caller-held lock) drives it.

    Raises ConfigError for a bad geometry (slot size not a multiple of 4096, zero slots, or one
    that disagrees with the directory), StorageIOError when another process holds the directory
    or the catalog cannot be opened.
    """

    def __init__(
        self,
        path: str,
        *,
        slot_bytes: int,
        num_slots: int,
        slab_bytes: int = 1 << 30,
        durability: str = "batch",
        eviction: str | None = None,
        shards: int = 1,
        slab_dirs: Sequence[str] | None = None,
        slab_namespaces: Sequence[bytes] | None = None,
        record_ns: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        # Namespace digest of each slab directory's records (for a rebuild from the slab headers)
        # and the namespace fingerprint rebuilt records get; None: a damaged catalog restarts empty.
        self._slab_ns = [namespace_digest(x) for x in slab_namespaces] if slab_namespaces is not None else None
        self._record_ns = record_ns
        if not isinstance(shards, int) or shards < 1:
            raise ConfigError(f"disk catalog shards must be an int >= 1, got {shards!r}")
        if slab_dirs is not None and len(slab_dirs) != shards:
            raise ConfigError(f"disk catalog: {len(slab_dirs)} slab directories for {shards} shards")
        self.shards = shards
        # Where each shard's slab files live (checked at open: a block needs all of them).
        self.slab_dirs = [os.fspath(d) for d in slab_dirs] if slab_dirs is not None else [self.path]
        if durability not in DURABILITY:
            raise ConfigError(f"disk_durability must be one of {DURABILITY}, got {durability!r}")
        if not isinstance(slot_bytes, int) or slot_bytes <= 0 or slot_bytes % ALIGNMENT:
            raise ConfigError(
                f"disk slot size {slot_bytes} must be a positive multiple of {ALIGNMENT} (the O_DIRECT alignment)"
            )
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise ConfigError(f"disk capacity holds {num_slots} slots of {slot_bytes} bytes: need at least one")
        _check_dir(self.path, writable=True)
        self.durability = durability
        self._lock_fd = _take_lock(self.path)
        try:
            try:
                self._open(slot_bytes, num_slots, slab_bytes, eviction)
            except CATALOG_DAMAGE as e:
                if not is_catalog_damage(e):
                    raise  # e.g. a ConfigError: the configuration disagrees with an intact catalog
                # Note [Damaged catalog] (disk_recovery): the catalog is an index over self-describing slab
                # records, so a catalog LMDB refuses (or that fails our pre-map check) is moved
                # aside and rebuilt from the record headers; the engine never stops for it.
                self._close_env()
                moved = quarantine(os.path.join(self.path, CATALOG_SUBDIR))
                self._open(slot_bytes, num_slots, slab_bytes, eviction)
                n = self._recover_from_slabs()
                self._count("catalog_rebuilds")
                self._save_totals()
                log.warning("disk tier %s: catalog damaged or of another format (%s: %s); moved aside to %s and "
                            "rebuilt from the slab record headers: %d blocks recovered",
                            self.path, type(e).__name__, e, moved, n)  # fmt: skip
            else:
                if self._fresh and any(has_slabs(d) for d in self.slab_dirs):
                    # A new catalog over existing slabs (the catalog was deleted): rebuild it.
                    n = self._recover_from_slabs()
                    self._count("catalog_rebuilds")
                    self._save_totals()
                    log.warning("disk tier %s: no catalog next to existing slab files; rebuilt it from the slab "
                                "record headers: %d blocks recovered", self.path, n)
        except BaseException:
            self._close_env()
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise

    # ---- opening ----

    def _close_env(self) -> None:
        env = getattr(self, "env", None)
        if env is not None:
            with contextlib.suppress(lmdb.Error):
                env.close()
            self.env = None

    def _recover_from_slabs(self) -> int:
        """Insert a record for every block whose slab record header is valid (in every shard); returns
        how many blocks the catalog then holds."""
        if self._slab_ns is None or len(self._slab_ns) != len(self.slab_dirs):
            return 0
        found = slab_records(self.slab_dirs, self._slab_ns, self.geometry)
        if not found:
            return 0
        ns = self._record_ns if self._record_ns is not None else int.from_bytes(self._slab_ns[0][:8], "little")
        with self.env.begin(write=True) as txn:
            for key, (slot, length, crcs, written) in found.items():
                us = written or _now_us()
                txn.put(key, RECORD.pack(1, 0, 0, crcs[0], slot, length, ns, us, us, 0), db=self._db_blocks)
                if self._db_shards is not None:
                    txn.put(key, np.asarray(crcs, "<u4").tobytes(), db=self._db_shards)
        self._rebuild()
        return len(self._index)

    def _open(self, slot_bytes: int, num_slots: int, slab_bytes: int, eviction: str) -> None:
        # "batch": one fsync per commit (MDB_NOMETASYNC: a system crash may undo the last
        # commit, never corrupt the catalog; undone records only make their slots free again).
        # "always": LMDB's full sync. "none": no sync (a killed process loses nothing).
        cat_dir = os.path.join(self.path, CATALOG_SUBDIR)
        problem = lmdb_file_problem(cat_dir)
        if problem:
            raise CatalogDamagedError(problem)
        try:
            self.env = lmdb.open(
                os.path.join(self.path, CATALOG_SUBDIR),
                map_size=_map_size_for(num_slots),
                subdir=True,
                max_dbs=4,
                sync=self.durability != "none",
                metasync=self.durability == "always",
                readahead=False,
                lock=True,
            )
        except LMDB_ENVIRONMENT_ERRORS as e:
            raise StorageIOError(f"cannot open the disk catalog in {self.path}: {e}") from e
        except lmdb.Error as e:
            raise CatalogDamagedError(f"cannot open the disk catalog in {self.path}: {e}") from e
        self.env.reader_check()
        with self.env.begin(write=True) as txn:
            try:
                self._db_meta = self.env.open_db(b"meta", txn=txn, create=False)
                existing = True
            except lmdb.NotFoundError:
                self._db_meta = self.env.open_db(b"meta", txn=txn)
                existing = False

            def open_db(name: bytes) -> Any:
                try:  # an existing catalog lacking one of its databases is damaged (a name flipped)
                    return self.env.open_db(name, txn=txn, create=not existing)
                except lmdb.NotFoundError:
                    raise CatalogDamagedError(f"the catalog lacks its {name.decode()!r} database") from None

            self._db_blocks, self._db_stats = open_db(b"blocks"), open_db(b"stats")
            fmt = txn.get(b"format", db=self._db_meta)
            geo_raw = txn.get(b"geometry", db=self._db_meta)
            if fmt is not None and fmt != FORMAT:
                raise CatalogDamagedError(f"catalog format {fmt!r}, this kvbm reads {FORMAT!r}")
            if geo_raw is not None:
                geo = json.loads(geo_raw)
                if geo["slot_bytes"] != slot_bytes:
                    raise ConfigError(
                        f"disk dir {self.path} was created with slot size {geo['slot_bytes']} bytes, "
                        f"the configuration asks for {slot_bytes}: use another directory or the old slot size"
                    )
                slots_per_slab = int(geo["slots_per_slab"])
                if int(geo.get("shards", 1)) != self.shards:
                    raise ConfigError(
                        f"disk dir {self.path} was created with {geo.get('shards', 1)} shard(s) per block, "
                        f"the configuration asks for {self.shards}: use another directory"
                    )
            else:
                slots_per_slab = max(1, int(slab_bytes) // slot_bytes)
                txn.put(b"format", FORMAT, db=self._db_meta)
                g: dict[str, Any] = {"slot_bytes": slot_bytes, "slots_per_slab": slots_per_slab}
                if self.shards > 1:
                    g["shards"] = self.shards
                if self.slab_dirs != [self.path]:
                    g["shard_dirs"] = [os.path.relpath(d, self.path) for d in self.slab_dirs]
                txn.put(b"geometry", json.dumps(g).encode(), db=self._db_meta)
            self._db_shards = open_db(b"shards") if self.shards > 1 else None  # after the shards check
            raw_stats = txn.get(b"counters", db=self._db_stats)
        self._fresh = fmt is None
        self.geometry = DiskGeometry(slot_bytes, slots_per_slab, num_slots)
        self.totals: dict[str, int] = dict.fromkeys(PERSISTED_COUNTERS, 0)
        if raw_stats is not None:
            self.totals.update({k: int(v) for k, v in json.loads(raw_stats).items() if k in self.totals})
        self.counters: dict[str, int] = dict.fromkeys(PERSISTED_COUNTERS, 0)  # this session

        n = num_slots
        self._index: dict[bytes, int] = {}
        self._slot_key = np.full(n, None, dtype=object)  # slot -> key (None when free)
        self._len = np.zeros(n, np.uint64)
        self._crc = np.zeros(n, np.uint32)
        self._ns = np.zeros(n, np.uint64)
        self._created = np.zeros(n, np.uint64)
        self._access = np.zeros(n, np.uint64)
        self._hits = np.zeros(n, np.uint64)
        self._pins = np.zeros(n, np.int32)
        self._shard_crc = np.zeros((n, self.shards), np.uint32) if self.shards > 1 else None
        self._pending: dict[bytes, int] = {}  # reserved for a write, not committed yet
        self._doomed: set[int] = set()  # dropped while pinned: freed at the last unpin
        self._dirty: set[int] = set()  # access/hits changed since the last txn
        from kvbm import _native

        self._policy = _native.EvictionPolicy(eviction or _native.eviction_policy_names()[0], n)
        # Slots [0, _limit) may be handed out (a share of a disk_path's space, kvbm.tiers.disk_space);
        # _grow asks for a larger share when they are all taken (None: the whole geometry is ours).
        self._limit = n
        self._grow: Any = None
        self._release: Any = None
        self._grow_retry_at = 0.0
        t0 = time.perf_counter()
        self._rebuild()
        self.rebuild_seconds = time.perf_counter() - t0

    def _rebuild(self) -> None:
        geo = self.geometry
        with self.env.begin(db=self._db_blocks) as txn:
            items = list(txn.cursor().iternext(keys=True, values=True))
            shard_raw: dict[bytes, bytes] = {}
            if self._db_shards is not None:
                shard_raw = dict(txn.cursor(db=self._db_shards).iternext(keys=True, values=True))
        # A malformed record (wrong value size) is dropped, never a reason to refuse to start.
        malformed = [k for k, v in items if len(v) != RECORD.size]
        if malformed:
            m = set(malformed)
            items = [(k, v) for k, v in items if k not in m]
        keys = [k for k, _ in items]
        vals = b"".join(v for _, v in items)
        recs = np.frombuffer(vals, dtype=RECORD_DTYPE) if keys else np.zeros(0, RECORD_DTYPE)
        bad = (recs["version"] != 1) | (recs["slot"] >= geo.num_slots)
        bad |= (recs["length"] == 0) | (recs["length"] > geo.slot_bytes)
        # Slab file sizes: a block whose end lies past its slab's end was never fully written.
        slot = np.minimum(recs["slot"], max(geo.num_slots - 1, 0)).astype(np.int64)
        slab = slot // geo.slots_per_slab
        end = (slot % geo.slots_per_slab) * geo.slot_stride + RECORD_HEADER + recs["length"].astype(np.int64)
        nslabs = (geo.num_slots + geo.slots_per_slab - 1) // geo.slots_per_slab
        sizes = np.zeros(nslabs, np.int64)
        for i in np.unique(slab).tolist():
            shard_sizes = []
            for d in self.slab_dirs:  # a block needs its bytes in every shard's slab
                try:
                    shard_sizes.append(os.stat(slab_path(d, i)).st_size)
                except FileNotFoundError:
                    shard_sizes.append(-1)
            sizes[i] = min(shard_sizes)
        bad |= end > sizes[slab]
        if self._db_shards is not None:
            want = 4 * self.shards
            bad |= np.array([len(shard_raw.get(k, b"")) != want for k in keys], dtype=bool)
        # Duplicate slots: keep the newest record of each slot.
        order = np.lexsort((-recs["created_us"].astype(np.int64), slot))
        dup = np.zeros(len(recs), bool)
        vs = np.flatnonzero(~bad[order])  # valid records, by slot then newest first
        if len(vs) > 1:
            s_sorted = slot[order]
            same = s_sorted[vs[1:]] == s_sorted[vs[:-1]]  # same slot as the newer one before it
            dup[order[vs[1:][same]]] = True
        bad |= dup
        good = np.flatnonzero(~bad)
        drop = np.flatnonzero(bad)
        ndrop = len(drop) + len(malformed)
        if ndrop or (self._db_shards is not None and len(shard_raw) > len(good)):
            good_set = {keys[i] for i in good.tolist()}
            with self.env.begin(write=True, db=self._db_blocks) as txn:
                for i in drop.tolist():
                    txn.delete(keys[i])
                for k in malformed:
                    txn.delete(k)
                if self._db_shards is not None:  # also shard entries without a (valid) record
                    for k in shard_raw:
                        if k not in good_set:
                            txn.delete(k, db=self._db_shards)
            self._count("dropped_at_open", ndrop)
            log.warning("disk tier %s: dropped %d incomplete or invalid catalog records at open", self.path, ndrop)
        g = recs[good]
        gs = g["slot"].astype(np.int64)
        self._len[gs] = g["length"]
        self._crc[gs] = g["crc"]
        self._ns[gs] = g["ns"]
        self._created[gs] = g["created_us"]
        self._access[gs] = g["access_us"]
        self._hits[gs] = g["hits"]
        if self._shard_crc is not None and len(good):
            self._shard_crc[gs] = np.frombuffer(
                b"".join(shard_raw[keys[i]] for i in good.tolist()), dtype="<u4"
            ).reshape(len(good), self.shards)
        good_keys = [keys[i] for i in good.tolist()]
        slots_list = gs.tolist()
        self._index = dict(zip(good_keys, slots_list, strict=True))
        if good_keys:
            self._slot_key[gs] = good_keys
        used = np.zeros(geo.num_slots, bool)
        used[gs] = True
        self._free: list[int] = np.flatnonzero(~used).tolist()  # sorted: a valid min-heap
        for s in gs[np.argsort(g["access_us"], kind="stable")].tolist():  # oldest access first
            self._policy.insert(s, -1)
        if ndrop:
            self._save_totals()

    # ---- counters ----

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
        self.totals[name] += n

    def _save_totals(self, txn: Any = None) -> None:
        raw = json.dumps(self.totals).encode()
        if txn is not None:
            txn.put(b"counters", raw, db=self._db_stats)
            return
        try:
            with self.env.begin(write=True) as t:
                t.put(b"counters", raw, db=self._db_stats)
        except (lmdb.Error, OSError) as e:  # a full disk must not take the engine down
            log.warning("disk tier %s: cannot save counters: %s", self.path, e)

    def _flush_dirty(self, txn: Any) -> None:
        for s in self._dirty:
            k = self._slot_key[s]
            if k is not None:
                txn.put(k, self._pack(s), db=self._db_blocks)
        self._dirty.clear()
        txn.put(b"counters", json.dumps(self.totals).encode(), db=self._db_stats)

    def _delete_records(self, keys: Iterator[bytes]) -> None:
        """Delete the records of ``keys`` (and their shard CRCs) in one committed txn that also
        writes pending metadata. Raises lmdb.Error / OSError; then nothing was deleted."""
        with self.env.begin(write=True) as txn:
            for k in keys:
                txn.delete(k, db=self._db_blocks)
                if self._db_shards is not None:
                    txn.delete(k, db=self._db_shards)
            self._flush_dirty(txn)

    def _pack(self, s: int) -> bytes:
        return RECORD.pack(
            1, 0, 0, int(self._crc[s]), s, int(self._len[s]), int(self._ns[s]),
            int(self._created[s]), int(self._access[s]), int(self._hits[s]),
        )  # fmt: skip

    # ---- queries ----

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def slot_of(self, key: bytes) -> int:
        """Slot of a committed block, or -1."""
        return self._index.get(key, -1)

    def record(self, slot: int) -> dict[str, int]:
        """The in-memory record of an occupied slot (length, crc, ns, times, hits)."""
        return {
            "slot": slot,
            "length": int(self._len[slot]),
            "crc": int(self._crc[slot]),
            "ns": int(self._ns[slot]),
            "created_us": int(self._created[slot]),
            "access_us": int(self._access[slot]),
            "hits": int(self._hits[slot]),
        }

    def shard_crcs(self, slot: int) -> list[int]:
        """CRC32C of each shard of the block in an occupied ``slot`` (one value when not sharded)."""
        if self._shard_crc is None:
            return [int(self._crc[slot])]
        return self._shard_crc[slot].tolist()

    def is_reserved(self, key: bytes) -> bool:
        """True while ``key`` holds a slot from :meth:`reserve` not yet committed or aborted."""
        return key in self._pending

    @property
    def reserved(self) -> int:
        """Slots reserved and not yet committed or aborted."""
        return len(self._pending)

    def keys(self) -> list[bytes]:
        """Hashes of all committed blocks."""
        return list(self._index)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def bytes_used(self) -> int:
        return int(self._len.sum())

    @property
    def high_water(self) -> int:
        """One past the highest slot holding a block, reserved or pinned (0 when empty)."""
        used = [s for s in self._pending.values()]
        occupied = np.flatnonzero(self._slot_key != None)  # noqa: E711 (elementwise on an object array)
        if occupied.size:
            used.append(int(occupied[-1]))
        used.extend(self._doomed)
        return max(used) + 1 if used else 0

    @property
    def limit(self) -> int:
        """Slots ``[0, limit)`` may be handed out by :meth:`reserve`."""
        return self._limit

    def set_space(self, limit: int, grow: Any = None, release: Any = None) -> None:
        """Hand out slots below ``limit`` only (at least :attr:`high_water`); when they are all
        taken, ``grow(limit)`` may return a larger limit before a block of ours is evicted;
        ``release()`` runs when the catalog closes (kvbm.tiers.disk_space)."""
        self._limit = max(min(int(limit), self.geometry.num_slots), self.high_water)
        self._grow = grow
        self._release = release

    def _free_slot(self) -> int:
        """The lowest free slot under the limit (asking for more space once in a while), or -1."""
        if self._free and self._free[0] < self._limit:
            return heapq.heappop(self._free)
        if self._grow is None or self._limit >= self.geometry.num_slots or time.monotonic() < self._grow_retry_at:
            return -1
        try:
            new = min(int(self._grow(self._limit)), self.geometry.num_slots)
        except (OSError, KvbmError) as e:  # the shared ledger is unusable: keep to our share
            log.warning("disk tier %s: cannot ask for more disk space: %s", self.path, e)
            new = self._limit
        if new <= self._limit:
            self._grow_retry_at = time.monotonic() + 2.0  # the disk_path is full: evict our own for a while
            return -1
        self._limit = new
        return heapq.heappop(self._free) if self._free and self._free[0] < self._limit else -1

    def evict_oldest(self, nslots: int) -> list[int]:
        """Evict up to ``nslots`` blocks the policy would evict first (one committed txn); their
        slots, now free. Used to give a disk_path's space to another namespace."""
        victims: list[tuple[int, bytes]] = []
        while len(victims) < nslots:
            s = self._policy.victim()
            if s < 0:
                break
            self._policy.remove(s)
            self._dirty.discard(s)  # the txn below must not write the record back
            victims.append((s, self._slot_key[s]))
        if not victims:
            return []
        try:
            self._delete_records(vk for _, vk in victims)
        except (lmdb.Error, OSError) as e:
            log.error("disk tier %s: cannot commit %d evictions (%s)", self.path, len(victims), e)
            for s, _ in victims:
                self._policy.insert(s, -1)
            return []
        for s, vk in victims:
            self._index.pop(vk, None)
            self._slot_key[s] = None
            self._len[s] = 0
            heapq.heappush(self._free, s)
        self._count("evictions", len(victims))
        return [s for s, _ in victims]

    # ---- storing ----

    def reserve(self, keys: Sequence[bytes], evicted: list[bytes] | None = None) -> list[int]:
        """Pick a free slot for each key, evicting (and durably un-listing) victims as needed.

        Returns one slot per key, or -1 where the key is already stored or being stored, repeats
        an earlier key of the batch, or no slot can be freed (everything pinned or in flight).
        Victims' records are deleted in one committed txn before this returns (write ordering);
        if that txn fails the victims stay listed and their slots are not handed out.
        Every slot returned must later go to :meth:`commit` or :meth:`abort`. The keys of the
        victims whose eviction was committed are appended to ``evicted`` when given.
        """
        out: list[int] = []
        victims: list[tuple[int, bytes]] = []
        seen: set[bytes] = set()
        for k in keys:
            if k in self._index or k in self._pending or k in seen:
                out.append(-1)
                continue
            seen.add(k)
            s = self._free_slot()
            if s < 0:
                s = self._policy.victim()
                if s < 0:
                    out.append(-1)
                    continue
                vk = self._slot_key[s]
                self._policy.remove(s)
                self._index.pop(vk, None)
                self._slot_key[s] = None
                self._dirty.discard(s)
                victims.append((s, vk))
            self._pending[k] = s
            out.append(s)
        if victims:
            try:
                self._delete_records(vk for _, vk in victims)
            except (lmdb.Error, OSError) as e:
                log.error("disk tier %s: cannot commit %d evictions (%s): not storing over them",
                          self.path, len(victims), e)
                for s, vk in victims:  # data untouched: the blocks stay valid and listed
                    self._index[vk] = s
                    self._slot_key[s] = vk
                    self._policy.insert(s, -1)
                vs = {s for s, _ in victims}
                for i, s in enumerate(out):
                    if s in vs:
                        del self._pending[keys[i]]
                        out[i] = -1
                self._count("store_failures", len(vs))
            else:
                self._count("evictions", len(victims))
                for s, _ in victims:
                    self._len[s] = 0
                if evicted is not None:
                    evicted.extend(vk for _, vk in victims)
        return out

    def commit(
        self,
        keys: Sequence[bytes],
        slots: Sequence[int],
        lengths: Sequence[int],
        crcs: Sequence[int],
        ok: Sequence[bool],
        ns: int,
        parents: Sequence[bytes | None] | None = None,
        shard_crcs: Sequence[Sequence[int]] | None = None,
    ) -> list[bool]:
        """Publish the writes that succeeded (one txn) and free the slots of those that did not.

        A sharded catalog needs ``shard_crcs``: per key, the CRC32C of each shard (``crcs`` is then
        ignored: the record holds shard 0's).

        Returns, per key, whether it is now stored. A catalog commit failure (disk full, map
        full) makes every write of the batch "not stored", counted and logged; it never raises.
        """
        n = len(keys)
        okm = np.asarray(ok, dtype=bool).reshape(n)
        good = np.flatnonzero(okm)
        sl = np.asarray(slots, dtype=np.int64).reshape(n)
        gs = sl[good]
        shard = None
        if self._shard_crc is not None:
            if shard_crcs is None or len(shard_crcs) != n:
                raise InvalidArgumentError(f"commit: a catalog of {self.shards} shards needs shard_crcs per key")
            shard = np.asarray(shard_crcs, dtype=np.uint32).reshape(n, self.shards)[good]
            crcs = np.zeros(n, np.uint32)
            crcs[good] = shard[:, 0]
        recs = np.zeros(len(good), RECORD_DTYPE)
        recs["version"] = 1
        recs["crc"] = np.asarray(crcs, dtype=np.uint32).reshape(n)[good]
        recs["slot"] = gs
        recs["length"] = np.asarray(lengths, dtype=np.uint64).reshape(n)[good]
        recs["ns"] = ns
        recs["created_us"] = recs["access_us"] = _now_us()
        raw = recs.tobytes()
        sz = RECORD.size
        gl = good.tolist()
        committed = False
        try:
            with self.env.begin(write=True) as txn:
                if gl:
                    txn.cursor(db=self._db_blocks).putmulti(
                        [(keys[i], raw[j * sz : (j + 1) * sz]) for j, i in enumerate(gl)]
                    )
                    if shard is not None:
                        txn.cursor(db=self._db_shards).putmulti(
                            [(keys[i], shard[j].astype("<u4").tobytes()) for j, i in enumerate(gl)]
                        )
                self._flush_dirty(txn)
            committed = True
        except (lmdb.Error, OSError) as e:
            log.error("disk tier %s: catalog commit of %d blocks failed (not stored): %s", self.path, len(gl), e)
            self._count("store_failures", len(gl))
            if _is_space_error(e):
                self._count("enospc", len(gl))
        stored = [False] * n
        if committed and gl:
            self._len[gs] = recs["length"]
            self._crc[gs] = recs["crc"]
            self._ns[gs] = recs["ns"]
            self._created[gs] = recs["created_us"]
            self._access[gs] = recs["access_us"]
            self._hits[gs] = 0
            if shard is not None:
                self._shard_crc[gs] = shard
            for i in gl:
                stored[i] = True
        for i, k in enumerate(keys):
            s = int(sl[i])
            self._pending.pop(k, None)
            if stored[i]:
                self._index[k] = s
                self._slot_key[s] = k
                p = parents[i] if parents is not None else None
                ps = self._index.get(p, -1) if p is not None else -1
                if ps == s or (ps >= 0 and self._slot_key[ps] is None):
                    ps = -1  # a block cannot be its own parent (finding 7)
                try:
                    self._policy.insert(s, ps)
                except Exception:  # noqa: BLE001 - the policy refused the parent link: keep the block unlinked
                    self._policy.insert(s, -1)
            else:
                self._len[s] = 0
                heapq.heappush(self._free, s)
        return stored

    def abort(self, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        """Release reservations made by :meth:`reserve` without storing anything."""
        for k, s in zip(keys, slots, strict=False):
            if s >= 0 and self._pending.get(k) == s:
                del self._pending[k]
                heapq.heappush(self._free, s)

    # ---- loading ----

    def pin(self, slot: int) -> None:
        """Keep ``slot`` from eviction and reuse while a read of it is in flight."""
        if not 0 <= slot < len(self._pins):  # a -1 would silently pin the last slot for good
            raise InvalidArgumentError(f"pin: slot {slot} out of range [0, {len(self._pins)})")
        if self._pins[slot] == 0:
            self._policy.set_pinned(slot, True)
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        """Undo one :meth:`pin`; a slot dropped meanwhile is freed at its last unpin."""
        self._pins[slot] -= 1
        if self._pins[slot] > 0:
            return
        if slot in self._doomed:
            self._doomed.discard(slot)
            heapq.heappush(self._free, slot)
        elif self._slot_key[slot] is not None:
            self._policy.set_pinned(slot, False)

    def record_hit(self, slot: int) -> None:
        """Note a successful load of ``slot`` (last access, hit count, policy touch)."""
        if not 0 <= slot < self.geometry.num_slots or self._slot_key[slot] is None:
            return  # not a slot, or removed while the read was in flight
        self._access[slot] = _now_us()
        self._hits[slot] += 1
        self._dirty.add(slot)
        self._policy.touch(slot)

    def drop(self, keys: Sequence[bytes], reason: str | None = None) -> int:
        """Delete blocks from the catalog (one txn) and free their slots; returns how many.

        ``reason`` names a persisted counter to add to (e.g. ``"checksum_failures"``).
        """
        slots = []
        for k in keys:
            s = self._index.get(k, -1)
            if s < 0:
                continue
            slots.append((k, s))
        if not slots:
            return 0
        if reason:
            self._count(reason, len(slots))
        for k, s in slots:
            self._index.pop(k, None)
            self._slot_key[s] = None
            self._len[s] = 0
            self._dirty.discard(s)
            self._policy.remove(s)
            if self._pins[s] > 0:
                self._doomed.add(s)
            else:
                heapq.heappush(self._free, s)
        try:
            self._delete_records(k for k, _ in slots)
        except (lmdb.Error, OSError) as e:
            # The records stay on disk; their slots may be rewritten: the CRC check on a later
            # load (after a restart) turns any such stale record into a counted miss.
            log.error("disk tier %s: cannot delete %d records: %s", self.path, len(slots), e)
        return len(slots)

    # ---- closing ----

    def flush(self) -> None:
        """Write pending access times, hit counts and counters to the catalog."""
        try:
            with self.env.begin(write=True) as txn:
                self._flush_dirty(txn)
        except (lmdb.Error, OSError) as e:
            log.warning("disk tier %s: cannot flush catalog metadata: %s", self.path, e)

    def close(self) -> None:
        """Flush, sync and close the catalog and release the directory lock. Idempotent."""
        if getattr(self, "_lock_fd", -1) < 0:
            return
        if getattr(self, "env", None) is None:
            os.close(self._lock_fd)
            self._lock_fd = -1
            return
        try:
            self.flush()
            try:
                self.env.sync(True)
            except (lmdb.Error, OSError) as e:
                log.warning("disk tier %s: catalog sync at close failed: %s", self.path, e)
            self.env.close()
        finally:
            os.close(self._lock_fd)
            self._lock_fd = -1
            release, self._release = self._release, None
            if release is not None:
                release()


def _is_space_error(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (_errno.ENOSPC, _errno.EFBIG, _errno.EDQUOT):
        return True
    text = str(e)
    return "No space left" in text or "File too large" in text or "MDB_MAP_FULL" in text


def _check_dir(path: str, writable: bool) -> None:
    if not path:
        raise ConfigError("disk_path is empty")
    if not os.path.exists(path):
        raise ConfigError(f"disk_path {path!r} does not exist (create it first)")
    if not os.path.isdir(path):
        raise ConfigError(f"disk_path {path!r} is not a directory")
    if writable:
        probe = os.path.join(path, f".kvbm-probe-{os.getpid()}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"disk_path {path!r} is not writable: {e.strerror}") from e


def _take_lock(path: str) -> int:
    lock_path = os.path.join(path, LOCK_NAME)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StorageIOError(f"cannot create the disk tier lock file {lock_path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        raise StorageIOError(
            f"disk tier directory {path} is in use by another kvbm process (pid {holder}); "
            f"use another disk_path, or `kvbm inspect {path}` to look at it read-only"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
