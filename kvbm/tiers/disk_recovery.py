"""Recovery of a damaged disk-tier catalog: check ``data.mdb`` before LMDB maps it, move an unusable
catalog aside, and read the slab record headers it is rebuilt from.

Note [Damaged catalog]
----------------------
The catalog (LMDB) is only an index over self-describing slab records (each names its block hash,
namespace digest, slot, length and CRC: Note [Records name themselves], tiers/disk_store.h). So a
catalog that cannot be used never stops the engine and never needs the user to delete anything:

* ``data.mdb`` is checked against its meta pages *before* it is mapped (:func:`lmdb_file_problem`):
  LMDB would SIGBUS on a truncated file.
* A catalog that fails that check, that LMDB refuses (Corrupted, Invalid, PageNotFound, ...), that
  lacks one of its databases, or that holds another format, is renamed to
  ``catalog.damaged-<time>-<pid>`` (:func:`quarantine`; kept for a post-mortem, named in one log line),
  and a new catalog is filled from the valid record headers of the slabs (:func:`slab_records`; for a
  sharded catalog only slots whose headers agree on every shard). A missing catalog next to existing
  slabs is rebuilt the same way.
* Single records that are malformed (a value of the wrong size, version, length, slot) are dropped
  at open, the rest of the catalog kept (``DiskCatalog._rebuild``).
* A configuration that disagrees with an *intact* catalog (slot size, shards) stays a ConfigError:
  that is the user's choice to make, not damage.

Limits: the headers say nothing about recency or hit counts (rebuilt records start with their write
time), nor about chain parents (the eviction policy sees rebuilt blocks unlinked); a block removed
while its bytes stayed on disk comes back (its bytes are its own, so it is never wrong KV).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Sequence
from typing import Any

import lmdb

from kvbm.errors import StorageIOError

log = logging.getLogger("kvbm.disk")


class CatalogDamagedError(StorageIOError):
    """The disk catalog cannot be used as it is (damaged, truncated, foreign format).

    Raised inside :class:`DiskCatalog`'s open, which answers it by quarantining the catalog and
    rebuilding it from the slab record headers; ``kvbm inspect`` reports it.
    """


_LMDB_MAGIC = 0xBEEFC0DE
_P_INVALID = 0xFFFF_FFFF_FFFF_FFFF


def lmdb_file_problem(cat_dir: str) -> str | None:
    """Why ``cat_dir/data.mdb`` is not safe to map, or None (absent, or its meta pages agree with its size).

    Note [No SIGBUS]: LMDB maps the data file and reads pages up to the last page its meta page
    names; a file shorter than that (truncated) kills the process with SIGBUS on the first touch.
    So both meta pages (64-bit layout: magic at byte 16, page size at 40, the two DB roots at 80
    and 128, last page at 136, txn id at 144) are checked against the file size before mapping.
    Pages the B-tree names beyond the last page are refused by LMDB itself (MDB_PAGE_NOTFOUND).
    """
    path = os.path.join(cat_dir, "data.mdb")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(2 * 65536)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if size < 2 * 4096:
        return f"{path} is {size} bytes, shorter than its two meta pages"
    psize = struct.unpack_from("<I", head, 40)[0]
    if psize < 4096 or psize > 65536 or psize & (psize - 1) or size < 2 * psize:
        return f"{path}: bad page size {psize} in meta page 0"
    for i in (0, 1):
        off = i * psize
        magic, version = struct.unpack_from("<II", head, off + 16)
        if magic != _LMDB_MAGIC or version != 1:
            return f"{path}: meta page {i} is damaged (magic {magic:#x}, version {version})"
        if struct.unpack_from("<I", head, off + 40)[0] != psize:
            return f"{path}: meta pages disagree on the page size"
        last = struct.unpack_from("<Q", head, off + 136)[0]
        if last < 1 or (last + 1) * psize > size:
            return f"{path} is {size} bytes but meta page {i} names page {last} (truncated?)"
        for root_off in (80, 128):
            root = struct.unpack_from("<Q", head, off + root_off)[0]
            if root != _P_INVALID and (root < 2 or root > last):
                return f"{path}: meta page {i} names root page {root} beyond its last page {last}"
    return None


# LMDB errors that say something about the machine, not the catalog: never a reason to move it aside.
LMDB_ENVIRONMENT_ERRORS = (lmdb.ReadonlyError, lmdb.LockError, lmdb.MemoryError, lmdb.MapFullError,
                           lmdb.ReadersFullError, lmdb.TlsFullError, lmdb.DbsFullError, lmdb.TxnFullError,
                           lmdb.CursorFullError, lmdb.DiskError)  # fmt: skip

# What a damaged catalog raises while it is opened and read (see Note [Damaged catalog]): any other
# LMDB error (Corrupted, Invalid, PageNotFound, Panic, ...) and what parsing damaged values raises.
# A KvbmError other than CatalogDamagedError (e.g. InvalidArgumentError, a ValueError) is not damage.
CATALOG_DAMAGE = (lmdb.Error, CatalogDamagedError, ValueError, KeyError, TypeError, OverflowError)


def is_catalog_damage(e: BaseException) -> bool:
    """Whether ``e``, raised while a catalog was opened and read, means the catalog is damaged."""
    from kvbm.errors import KvbmError

    if isinstance(e, LMDB_ENVIRONMENT_ERRORS):
        return False
    if isinstance(e, KvbmError):
        return isinstance(e, CatalogDamagedError)
    return isinstance(e, CATALOG_DAMAGE)


def has_slabs(d: str) -> bool:
    """Whether directory ``d`` holds slab files."""
    try:
        return any(n.startswith("slab-") and n.endswith(".kvbm") for n in os.listdir(d))
    except OSError:
        return False


def quarantine(cat_dir: str) -> str:
    """Move the catalog directory aside; returns where it now is.

    Raises StorageIOError when it cannot be renamed.
    """
    dst = f"{cat_dir}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    i = 0
    while os.path.exists(dst + (f".{i}" if i else "")):
        i += 1
    dst += f".{i}" if i else ""
    try:
        os.rename(cat_dir, dst)
    except OSError as e:
        raise StorageIOError(f"the disk catalog {cat_dir} is damaged and cannot be moved aside: {e.strerror}") from e
    return dst


def slab_records(slab_dirs: Sequence[str], namespaces: Sequence[bytes], geometry: Any) -> dict[bytes, tuple]:
    """The blocks the slab record headers describe: ``{key: (slot, length, [crc per shard], written_us)}``.

    ``slab_dirs[i]`` holds shard i's slabs, stamped with ``namespaces[i]``; a slot counts only when its
    header is valid in every shard and names the same key and length there. A key found in two slots
    keeps the newer record. Unreadable directories give nothing (logged).
    """
    from kvbm import _native

    per_dir: list[dict[int, tuple[bytes, int, int, int]]] = []
    for d, ns in zip(slab_dirs, namespaces, strict=True):
        if not os.path.isdir(d):
            return {}
        try:
            st = _native.DiskStore(d, geometry.slot_bytes, geometry.num_slots, geometry.slots_per_slab, 1, False,
                                   True, False, namespace=ns)
        except Exception as e:  # noqa: BLE001 - any failure: nothing recoverable there
            log.warning("disk tier: cannot scan the slabs in %s: %s", d, e)
            return {}
        try:
            found, _ = st.scan_headers()
        finally:
            st.close()
        per_dir.append({int(r[0]): (bytes(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in found})
    best: dict[bytes, tuple[int, int, list[int], int]] = {}
    for slot, (key, length, crc, written) in per_dir[0].items():
        crcs = [crc]
        for other in per_dir[1:]:
            o = other.get(slot)
            if o is None or o[0] != key or o[1] != length:
                break
            crcs.append(o[2])
        if len(crcs) == len(per_dir) and (key not in best or best[key][3] < written):
            best[key] = (slot, length, crcs, written)
    return best
