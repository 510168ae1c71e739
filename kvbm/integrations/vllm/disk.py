"""The disk tier of the vLLM connector: kvbm's disk tier (slab files + LMDB catalog), split in two.

Note [Connector disk tier]
--------------------------
The scheduler process owns the catalog (:class:`kvbm.tiers.disk.DiskCatalog`: which block is in
which slot, free slots, eviction, the lock file); every tensor-parallel rank owns the slab files of
its shard of every block (:class:`kvbm._native.DiskStore`) and reads/writes them by slot number.
A block has the same slot on every rank. Layout under ``disk_path``::

    <ns0>/LOCK, <ns0>/catalog/   the catalog of this model and geometry (flock'ed by the scheduler)
    <ns0>/slab-NNNNN.kvbm        rank 0's shard of every block
    <nsR>/slab-NNNNN.kvbm        rank R's shard (tensor parallelism)

``<nsR>`` is the hex digest of the namespace rank R stores under (model, dtype, layout, block size,
TP size and rank, ...), so ``<ns0>`` is a standard kvbm disk tier directory (``kvbm inspect
disk_path/<ns0>``; ``kvbm inspect disk_path`` finds it when there is one) and engines of other
models or geometries sharing ``disk_path`` get their own catalogs.

Crash consistency (issue 4's write ordering, across processes):

1. *Evict first*: the scheduler reserves slots (``DiskCatalog.reserve``); victims are deleted from
   the catalog in a committed txn before the store plan naming the slot leaves the scheduler.
2. *Data next*: each rank writes its shard into the slot (CRC32C computed on the way; synced as
   ``disk_durability`` says before the write reports done) and reports ``(hash, crc)``.
3. *Catalog last*: once every rank reported, the scheduler commits the record (one txn per step),
   with every rank's CRC (record: rank 0's; db "shards": all, when TP > 1). A write that failed on
   any rank is aborted after all ranks reported, so a slot is never reused under a write in flight.

Every slab record carries its block hash, the rank's namespace digest, its slot, length and CRC
(Note [Records name themselves] in tiers/disk_store.h); loads check them.
Loads carry each rank's expected CRC; a rank whose bytes do not verify reports a load error (vLLM
recomputes the block) and the scheduler drops the block from the catalog. At start-up the scheduler
reopens the catalog (no directory scan); records whose slab bytes cannot be complete on some rank
are dropped there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm.errors import ConfigError, KvbmError
from kvbm.tiers.disk import ALIGNMENT, RECORD_HEADER, DiskCatalog, namespace_digest, namespace_fingerprint
from kvbm.tiers.disk_space import SPACE_FILE, DiskSpace, release_slots

logger = logging.getLogger("kvbm.vllm")

#: Slab file size (slots per slab = this // disk slot size); both halves derive it identically.
SLAB_BYTES = 1 << 30
#: The most a rank's slab files are allocated ahead of their writes (they grow on demand).
GROW_BYTES = 64 << 20  # as fast as preallocated slabs (benchmarks/results/disk_growth.md)
_SYNC_MODE = {"none": 0, "batch": 1, "always": 2}


def disk_slot_bytes(slot_bytes: int) -> int:
    """A block's slot on disk: its bytes rounded up to the O_DIRECT alignment (4096)."""
    return -(-slot_bytes // ALIGNMENT) * ALIGNMENT


def disk_block_bytes(slot_bytes: int, ranks: int) -> int:
    """Bytes one block occupies on disk: its record header + data on every rank."""
    return (disk_slot_bytes(slot_bytes) + RECORD_HEADER) * ranks


def disk_capacity_slots(capacity_bytes: int, slot_bytes: int, ranks: int) -> int:
    """Slots of one engine if it had ``capacity_bytes`` to itself."""
    return capacity_bytes // disk_block_bytes(slot_bytes, ranks)


def grow_bytes_for(num_slots: int, slot_bytes: int) -> int:
    """The chunk a rank's slabs grow by: GROW_BYTES, or 1/64 of the capacity when that is smaller
    (what a rank has allocated beyond its blocks stays under one chunk)."""
    stride = disk_slot_bytes(slot_bytes) + RECORD_HEADER
    return min(GROW_BYTES, max(ALIGNMENT, -(-(num_slots * stride // 64) // ALIGNMENT) * ALIGNMENT))


def slots_per_slab(slot_bytes: int) -> int:
    return max(1, SLAB_BYTES // disk_slot_bytes(slot_bytes))


def rank_dir(disk_path: str, rank_namespace: bytes) -> str:
    """A rank's slab directory, named by the digest of the namespace the rank stores under; rank 0's
    also holds the catalog."""
    return os.path.join(disk_path, rank_namespace.hex())


def namespaces_present(disk_path: str) -> list[tuple[str, int]]:
    """The namespace directories under ``disk_path`` (one per model, geometry and rank) with the
    bytes their files occupy on disk (allocated blocks, not apparent size), largest first."""
    out = []
    try:
        entries = list(os.scandir(disk_path))
    except OSError:
        return []
    for e in entries:
        if not e.is_dir(follow_symlinks=False) or len(e.name) != 32:
            continue
        total = 0
        for root, _dirs, files in os.walk(e.path):
            for f in files:
                with contextlib.suppress(OSError):  # a file removed while we walk counts 0
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
        out.append((e.name, total))
    return sorted(out, key=lambda x: (-x[1], x[0]))


def describe_namespaces(disk_path: str, in_use: Sequence[bytes], capacity_bytes: int | None = None) -> str:
    """One start-up line: which namespaces ``disk_path`` holds, what they occupy, which this engine uses."""
    mine = {ns.hex() for ns in in_use}
    present = namespaces_present(disk_path)
    listed = ", ".join(f"{n[:12]} ({b / (1 << 20):.1f} MiB{', in use' if n in mine else ''})" for n, b in present)
    others = sum(1 for n, _ in present if n not in mine)
    total = sum(b for _, b in present)
    cap = f" of {capacity_bytes / (1 << 20):.1f} MiB disk_capacity_bytes" if capacity_bytes else ""
    return (f"kvbm disk_path {disk_path}: {len(present)} namespace dir(s) present, {total / (1 << 20):.1f} MiB on "
            f"disk{cap}: {listed or 'none'}; this engine uses {', '.join(sorted(h[:12] for h in mine))}" +
            (f"; {others} other namespace(s) (another model, block size or TP size) are not read by this engine "
             f"and share the capacity with it (their coldest blocks are evicted when it needs the space while "
             f"no engine uses them; {SPACE_FILE})" if others else ""))


def open_catalog(disk_path: str, rank_namespaces: Sequence[bytes], slot_bytes: int, capacity_bytes: int,
                 durability: str, eviction: str) -> DiskCatalog:
    """Open (or create) the catalog of this engine's blocks, in rank 0's directory, with its share
    of ``capacity_bytes`` (the whole disk_path's, Note [Shared disk space]).

    Raises:
        ConfigError: the directory holds a catalog of another slot size or TP degree, or cannot be
            created or written.
        StorageIOError: another process holds the catalog.
    """
    dirs = [rank_dir(disk_path, ns) for ns in rank_namespaces]
    for d in dirs:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"disk_path {disk_path!r}: cannot create {d}: {e.strerror}") from e
    num_slots = disk_capacity_slots(capacity_bytes, slot_bytes, len(dirs))
    space = DiskSpace(disk_path, capacity_bytes, dirs, disk_slot_bytes(slot_bytes) + RECORD_HEADER)
    try:
        with space.held():  # never while another engine takes space back from this namespace
            cat = DiskCatalog(dirs[0], slot_bytes=disk_slot_bytes(slot_bytes), num_slots=num_slots,
                              slab_bytes=SLAB_BYTES, durability=durability, eviction=eviction, shards=len(dirs),
                              slab_dirs=dirs, slab_namespaces=list(rank_namespaces))
    except KvbmError:  # StorageIOError is an OSError too
        raise
    except OSError as e:
        raise ConfigError(f"disk_path {disk_path!r}: cannot use {e.filename or disk_path}: {e.strerror}") from e
    if cat.geometry.slots_per_slab != slots_per_slab(slot_bytes):
        cat.close()
        raise ConfigError(f"disk dir {dirs[0]} was created with {cat.geometry.slots_per_slab} slots per slab; the "
                          f"vLLM connector uses {slots_per_slab(slot_bytes)}: use another disk_path")
    # One capacity for the whole disk_path (Note [Shared disk space]): cut what an older run left
    # allocated past our last block, then take a first share.
    release_slots(cat, [])
    try:
        cat.set_space(space.grant(0, cat.high_water), space.grant, space.release)
    except KvbmError:
        cat.close()
        raise
    except OSError as e:
        cat.close()
        raise ConfigError(f"disk_path {disk_path!r}: cannot use {e.filename or disk_path}: {e.strerror}") from e
    logger.info("%s", describe_namespaces(disk_path, rank_namespaces, capacity_bytes))
    return cat


def catalog_namespace(namespace_digest: bytes) -> int:
    """The namespace fingerprint stored in the catalog's records."""
    return namespace_fingerprint(namespace_digest)


def aligned_rows(n: int, row_bytes: int) -> np.ndarray:
    """An uninitialised ``[n, row_bytes]`` uint8 array starting on a 4096-byte boundary (O_DIRECT)."""
    raw = np.empty(n * row_bytes + ALIGNMENT, np.uint8)
    off = (-raw.ctypes.data) % ALIGNMENT
    return raw[off:off + n * row_bytes].reshape(n, row_bytes)


@dataclass
class _Write:
    handle: Any
    hashes: list[bytes]
    keep: Any = None  # buffers the IO threads read from


@dataclass
class ReadResult:
    ok: list[bool]
    checksum_failed: list[bool]
    messages: list[str] = field(default_factory=list)


class RankDisk:
    """One rank's slab files: slot writes and verified slot reads (no catalog; each record names its hash).

    Raises (constructor): ConfigError when the directory cannot be created or opened.
    """

    def __init__(self, disk_path: str, rank_namespace: bytes, slot_bytes: int, num_slots: int, *,
                 io_threads: int, o_direct: bool, durability: str, verify: bool) -> None:
        from kvbm import _native

        self.dir = rank_dir(disk_path, rank_namespace)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"disk_path {disk_path!r}: cannot create {self.dir}: {e.strerror}") from e
        self.length = slot_bytes
        self.slot_bytes = disk_slot_bytes(slot_bytes)
        # Every record names its block hash and this rank's namespace (Note [Records name themselves]).
        # Nothing preallocated: the slabs grow in chunks as written (Note [Shared disk space]).
        self.store = _native.DiskStore(self.dir, self.slot_bytes, num_slots, slots_per_slab(slot_bytes), io_threads,
                                       bool(o_direct), False, False, namespace=namespace_digest(rank_namespace),
                                       grow_bytes=grow_bytes_for(num_slots, slot_bytes))
        if o_direct and not self.store.o_direct_active:
            msg = (f"kvbm disk tier {self.dir}: the file system refused O_DIRECT ({self.store.fallback_reason}); "
                   "using buffered IO (page cache) instead")
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if self.store.prealloc_error:
            logger.warning("kvbm disk tier %s: slabs not preallocated (%s); they grow as written", self.dir,
                           self.store.prealloc_error)
        self.sync = _SYNC_MODE[durability]
        self.verify = verify
        self._writes: list[_Write] = []

    def write(self, hashes: list[bytes], slots: list[int], sources: list[Any], keep: Any = None) -> None:
        """Start writing ``sources[i]`` (an int address of ``length`` bytes, or a buffer) into ``slots[i]``.

        The outcome is reported by :meth:`poll` (per hash: written with its CRC32C, or failed).
        """
        if not hashes:
            return
        h = self.store.write(slots, sources, [self.length] * len(slots), self.sync, [bytes(x) for x in hashes])
        self._writes.append(_Write(h, hashes, keep))

    def poll(self, wait: bool = False) -> tuple[dict[bytes, int], list[bytes]]:
        """Finished writes since the last call: ``({hash: crc32c}, [failed hashes])``."""
        written: dict[bytes, int] = {}
        failed: list[bytes] = []
        pending: list[_Write] = []
        for w in self._writes:
            if not wait and not w.handle.done():
                pending.append(w)
                continue
            w.handle.wait()
            codes, crcs, _, msgs = w.handle.results()
            bad = [m for c, m in zip(codes.tolist(), msgs, strict=True) if c != 0]
            if bad:
                logger.error("kvbm: disk tier %s: %d of %d block writes failed (not stored): %s", self.dir,
                             len(bad), len(codes), bad[0])
            for h, c, crc in zip(w.hashes, codes.tolist(), crcs.tolist(), strict=True):
                if c == 0:
                    written[h] = int(crc)
                else:
                    failed.append(h)
        self._writes = pending
        return written, failed

    def wait_all(self) -> None:
        """Block until every write started so far has finished (outcomes stay for :meth:`poll`)."""
        for w in self._writes:
            w.handle.wait()

    @property
    def writes_in_flight(self) -> int:
        return sum(len(w.hashes) for w in self._writes)

    def read(self, slots: list[int], crcs: list[int], rows: np.ndarray,
             hashes: Sequence[bytes] | None = None) -> ReadResult:
        """Read ``slots`` into ``rows[i]`` (``length`` bytes each), verifying CRC32C against ``crcs``
        and each record's header against its slot, this rank's namespace and ``hashes[i]`` (when given)."""
        from kvbm import _native

        h = self.store.read(slots, [rows[i, :self.length] for i in range(len(slots))], [self.length] * len(slots),
                            crcs, self.verify, [bytes(x) for x in hashes] if hashes is not None else [])
        h.wait()
        codes, _, _, msgs = h.results()
        c = codes.tolist()
        return ReadResult([x == 0 for x in c], [x == int(_native.DISK_CODE_CHECKSUM) for x in c],
                          [m for x, m in zip(c, msgs, strict=True) if x != 0])

    def close(self) -> None:
        """Wait for writes in flight (their outcome is lost) and close the slab files."""
        self.poll(wait=True)
        self.store.close()
