"""One disk capacity per directory, shared by every disk tier (namespace) under it.

Note [Shared disk space]
------------------------
A vLLM connector ``disk_path`` holds one disk tier per model, geometry and TP rank (directories
named by namespace digest, kvbm.integrations.vllm.disk). ``disk_capacity_bytes`` bounds the bytes
*all* of them occupy on disk together, and none is preallocated:

* **Growth on demand.** A catalog hands out slots ``[0, limit)`` only, lowest first
  (``DiskCatalog.set_space``), and the slab files are fallocate()d in chunks as they are written
  (``DiskStore(grow_bytes=...)``): a directory occupies about what it holds.
* **Grants.** When its slots are all taken, the catalog asks :class:`DiskSpace` for more before it
  evicts a block of its own. Under ``flock(disk_path/space.lock)`` DiskSpace measures what the other
  tiers occupy and grants what is left of the capacity, one chunk at a time. A tier whose catalog
  is open in a live process (its ``LOCK`` is flock'ed) counts at the larger of its grant (in
  ``space.json``) and its allocated bytes; an idle one counts at its allocated bytes.
* **Eviction across tiers.** When the capacity is used up, DiskSpace takes space back from *idle*
  tiers, coldest first (oldest catalog write): it opens the idle catalog (taking its lock, so no
  engine can start on it meanwhile), evicts the blocks its policy would evict first (deleted from
  the catalog in a committed txn before any byte is touched), punches holes where they were and
  cuts the slab files after the last block kept. A live engine's blocks are never taken: each
  engine evicts its own blocks once no more space can be granted.
* **Crash safety.** The ledger only holds grants; a lost or damaged ``space.json`` is rebuilt
  empty (live tiers are then counted by their allocated bytes until their next grant). Catalog
  deletion happens before hole punching, so a crash in between leaves free slots with stale bytes
  (never listed), and every read checks the record header and CRC anyway.

Engines sharing a ``disk_path`` should be given the same ``disk_capacity_bytes``; each enforces its
own figure when it asks for space. Growth overshoots the grant by less than one ``grow_bytes``
chunk per slab file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import fcntl
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import lmdb

from kvbm.errors import KvbmError
from kvbm.tiers.disk_catalog import CATALOG_SUBDIR, LOCK_NAME, RECORD_HEADER, DiskCatalog, slab_path
from kvbm.tiers.disk_recovery import lmdb_file_problem

log = logging.getLogger("kvbm.disk")

SPACE_FILE = "space.json"
SPACE_LOCK = "space.lock"
_SLAB_RE = re.compile(r"^slab-(\d{5,})\.kvbm$")
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def allocated_bytes(d: str) -> int:
    """Bytes the slab files of directory ``d`` occupy on disk (allocated blocks, not apparent size):
    what ``disk_capacity_bytes`` bounds (catalogs, ~200 bytes per block, come on top)."""
    total = 0
    try:
        entries = list(os.scandir(d))
    except OSError:
        return 0
    for e in entries:
        if _SLAB_RE.match(e.name):
            with contextlib.suppress(OSError):  # a file removed while we look counts 0
                total += e.stat(follow_symlinks=False).st_blocks * 512
    return total


def is_live(cat_dir: str) -> bool:
    """True while a process holds the catalog lock of ``cat_dir`` (this one included, on any fd)."""
    try:
        fd = os.open(os.path.join(cat_dir, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def read_geometry(cat_dir: str) -> dict[str, Any] | None:
    """The geometry a catalog was created with, or None when it cannot be read."""
    path = os.path.join(cat_dir, CATALOG_SUBDIR)
    if not os.path.isdir(path) or lmdb_file_problem(path):
        return None
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=4, subdir=True, readahead=False)
    except lmdb.Error:
        return None
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            geo = json.loads(txn.get(b"geometry", db=meta) or b"null")
    except (lmdb.Error, ValueError):
        return None
    finally:
        env.close()
    return geo if isinstance(geo, dict) and int(geo.get("slot_bytes", 0)) > 0 else None


def slab_count(d: str) -> int:
    """One past the highest slab file number in ``d``."""
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    nums = [int(m.group(1)) for m in map(_SLAB_RE.match, names) if m]
    return max(nums) + 1 if nums else 0


_libc: Any = None


def punch_holes(path: str, ranges: Sequence[tuple[int, int]]) -> bool:
    """Give the blocks of ``ranges`` (offset, length) of file ``path`` back to the file system
    (its size unchanged). False when the file system cannot (the ranges then stay allocated)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for off, n in ranges:
            if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, n) != 0:
                e = ctypes.get_errno()
                if e in (_errno.EOPNOTSUPP, _errno.ENOSYS):
                    return False
                log.warning("punching a hole in %s failed: %s", path, os.strerror(e))
    finally:
        os.close(fd)
    return True


def _runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted slots as (first, count) runs of consecutive numbers."""
    out: list[tuple[int, int]] = []
    for s in sorted(slots):
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def release_slots(catalog: Any, slots: Sequence[int]) -> None:
    """Punch the freed ``slots`` out of every shard's slab files, then cut every slab file after the
    catalog's last block (files past it are cut to 0 bytes). Only slots free in ``catalog`` may be
    passed; the caller holds the catalog (so no writer can be handed them meanwhile)."""
    geo = catalog.geometry
    stride, spp = geo.slot_stride, geo.slots_per_slab
    hw = catalog.high_water
    for d in catalog.slab_dirs:
        by_slab: dict[int, list[tuple[int, int]]] = {}
        for first, n in _runs([s for s in slots if s < hw]):
            while n:
                slab, i = divmod(first, spp)
                k = min(n, spp - i)
                by_slab.setdefault(slab, []).append((i * stride, k * stride))
                first, n = first + k, n - k
        for slab, ranges in by_slab.items():
            if not punch_holes(slab_path(d, slab), ranges):
                break  # no hole punching here: cutting the tail below is all we can do
        for slab in range(slab_count(d)):
            keep = min(max(hw - slab * spp, 0), spp) * stride
            p = slab_path(d, slab)
            with contextlib.suppress(OSError):
                if os.stat(p).st_size > keep:
                    os.truncate(p, keep)


class DiskSpace:
    """The share of one ``disk_path``'s capacity held by one disk tier (Note [Shared disk space]).

    ``dirs``: the tier's directories under ``disk_path``; ``dirs[0]`` holds its catalog. ``slot_stride``:
    bytes one slot occupies in one directory's slab (record header + data). A grant is counted
    across all of ``dirs`` (a block has one shard in each).
    """

    def __init__(self, disk_path: str, capacity_bytes: int, dirs: Sequence[str], slot_stride: int,
                 chunk_bytes: int | None = None) -> None:
        self.disk_path = os.fspath(disk_path)
        self.capacity = int(capacity_bytes)
        self.mine = [os.path.basename(os.path.normpath(d)) for d in dirs]
        self.slot_bytes = int(slot_stride) * len(self.mine)  # one block, all shards
        # Space is granted (and taken back from idle tiers) a sixteenth of the capacity at a time, at
        # most 1 GiB: few ledger transactions, and an idle tier loses little more than is needed.
        chunk = chunk_bytes if chunk_bytes is not None else min(self.capacity // 16, 1 << 30)
        self.chunk_slots = max(1, chunk // self.slot_bytes)
        self.reclaimed_bytes = 0  # taken back from idle tiers by this engine
        self.reclaimed_blocks = 0

    # ---- the ledger ----

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold ``space.lock``: no grant (hence no reclaim, which opens idle catalogs and so takes
        their locks for a moment) runs meanwhile. Open a catalog under it. Not re-entrant."""
        fd = os.open(os.path.join(self.disk_path, SPACE_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[dict[str, Any]]:
        with self.held():
            path = os.path.join(self.disk_path, SPACE_FILE)
            try:
                with open(path, encoding="utf-8") as f:
                    led = json.load(f)
                if not isinstance(led, dict) or not isinstance(led.get("tiers"), dict):
                    raise ValueError("not a kvbm space ledger")
            except FileNotFoundError:
                led = {"tiers": {}}
            except (OSError, ValueError, UnicodeDecodeError) as e:
                log.warning("disk_path %s: %s unreadable (%s): rebuilt from the directories", self.disk_path,
                            SPACE_FILE, e)
                led = {"tiers": {}}
            yield led
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(led, f)
                os.replace(tmp, path)
            except OSError as e:  # a full disk: the grant still holds for this process
                log.warning("disk_path %s: cannot write %s: %s", self.disk_path, SPACE_FILE, e)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _units(self, led: dict[str, Any]) -> list[dict[str, Any]]:
        """The other tiers under disk_path: their dirs, whether live, what they count for."""
        try:
            names = sorted(e.name for e in os.scandir(self.disk_path) if e.is_dir(follow_symlinks=False))
        except OSError:
            return []
        owner: dict[str, str] = {}
        for cat, ent in led["tiers"].items():
            dirs = ent.get("dirs") if isinstance(ent, dict) else None
            for d in dirs if isinstance(dirs, list) else [cat]:
                owner.setdefault(str(d), cat)
        units: dict[str, list[str]] = {}
        for n in names:
            if n in self.mine:
                continue
            cat = owner.get(n)
            if cat is None or cat in self.mine:  # a tier not in the ledger: its catalog dir stands alone
                cat = n
            units.setdefault(cat, []).append(n)
        out = []
        for cat, ds in units.items():
            cat_dir = os.path.join(self.disk_path, cat)
            live = is_live(cat_dir)
            alloc = sum(allocated_bytes(os.path.join(self.disk_path, d)) for d in ds)
            ent = led["tiers"].get(cat)
            granted = ent.get("granted_bytes", 0) if isinstance(ent, dict) else 0
            granted = granted if isinstance(granted, int) and granted >= 0 else 0  # a damaged entry counts 0
            mtime = 0.0
            with contextlib.suppress(OSError):
                mtime = os.stat(os.path.join(cat_dir, CATALOG_SUBDIR, "data.mdb")).st_mtime
            out.append({"cat": cat, "dirs": ds, "live": live, "alloc": alloc,
                        "counts": max(alloc, granted) if live else alloc, "mtime": mtime})
        return out

    def grant(self, limit: int, high_water: int = 0) -> int:
        """A new slot limit for this tier: ``limit`` plus up to one chunk, as the capacity allows
        after what the other tiers occupy (taking space back from idle tiers when needed); never
        below ``high_water`` (slots already holding blocks)."""
        limit = max(int(limit), int(high_water))
        with self._ledger() as led:
            units = self._units(led)
            others = sum(u["counts"] for u in units)
            want = limit + self.chunk_slots
            short = others + want * self.slot_bytes - self.capacity
            if short > 0:
                for u in sorted((u for u in units if not u["live"] and u["alloc"] > 0), key=lambda u: u["mtime"]):
                    got = self._reclaim(u, short)
                    others -= got
                    short -= got
                    if short <= 0:
                        break
            new = max(limit, min(want, (self.capacity - others) // self.slot_bytes))
            led["tiers"][self.mine[0]] = {"dirs": self.mine, "granted_bytes": new * self.slot_bytes,
                                          "pid": os.getpid(), "updated": time.time()}
        return new

    def release(self) -> None:
        """This tier stops (its catalog closes): it counts by its allocated bytes from now on."""
        with contextlib.suppress(OSError), self._ledger() as led:
            led["tiers"][self.mine[0]] = {"dirs": self.mine, "granted_bytes": 0, "pid": 0, "updated": time.time()}

    # ---- taking space back ----

    def _reclaim(self, unit: dict[str, Any], need: int) -> int:
        """Evict the coldest blocks of an idle tier until ``need`` bytes are given back (or it is
        empty). Returns the bytes its files no longer occupy; 0 when it could not be opened."""
        cat_dir = os.path.join(self.disk_path, unit["cat"])
        geo = read_geometry(cat_dir)
        if geo is None:
            return 0
        rel = geo.get("shard_dirs") or ["."]
        dirs = [os.path.normpath(os.path.join(cat_dir, r)) for r in rel]
        try:
            namespaces = [bytes.fromhex(os.path.basename(d)) for d in dirs]
            if any(len(n) != 16 for n in namespaces):
                raise ValueError
        except ValueError:
            namespaces = None  # type: ignore[assignment]
        spp = int(geo["slots_per_slab"])
        num_slots = max(1, max(slab_count(d) for d in dirs) * spp)
        before = sum(allocated_bytes(d) for d in dirs)
        try:
            cat = DiskCatalog(cat_dir, slot_bytes=int(geo["slot_bytes"]), num_slots=num_slots, durability="batch",
                              shards=len(dirs), slab_dirs=dirs, slab_namespaces=namespaces)
        except (KvbmError, OSError) as e:  # an engine started on it meanwhile, or it is not usable now
            log.info("disk_path %s: cannot take space back from %s: %s", self.disk_path, unit["cat"], e)
            return 0
        try:
            per_block = (int(geo["slot_bytes"]) + RECORD_HEADER) * len(dirs)
            freed = cat.evict_oldest(math.ceil(need / per_block))
            release_slots(cat, freed)
        finally:
            cat.close()
        got = max(0, before - sum(allocated_bytes(d) for d in dirs))
        self.reclaimed_bytes += got
        self.reclaimed_blocks += len(freed)
        log.info("disk_path %s: took %.1f MiB back from idle disk tier %s (%d coldest blocks evicted) for %s",
                 self.disk_path, got / (1 << 20), unit["cat"][:12], len(freed), self.mine[0][:12])
        return got
