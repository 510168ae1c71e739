"""``kvbm inspect DIR``: what a disk tier directory holds, read-only.

Opens the LMDB catalog read-only and without the writer's lock file, so it works while a kvbm
process is using the tier (LMDB gives a consistent snapshot). ``--verify`` also reads every
block and checks its CRC32C (reporting, not dropping, bad ones); for a sharded catalog (the vLLM
connector with tensor parallelism) every rank's shard is read and checked against its own CRC.

A vLLM connector's ``disk_path`` holds one tier directory per model and geometry
(``disk_path/<namespace digest>/``); given such a ``disk_path``, ``kvbm inspect`` inspects its
tier directory when there is one and lists them when there are several.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from typing import Any

import numpy as np

from kvbm.errors import ConfigError, StorageIOError


def _count(text: str) -> int:
    """argparse type of --list: an int in 0..10**9 (argparse reports anything else as a usage error)."""
    try:
        v = int(text) if len(text) <= 12 else -1
    except ValueError:
        v = -1
    if not 0 <= v <= 10**9:
        raise argparse.ArgumentTypeError(f"expected a count in 0..1000000000, got {text[:40]!r}")
    return v


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show what a disk tier directory holds (read-only)")
    p.add_argument("dir", help="the disk tier directory (disk_path)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true", help="read every block and check its CRC32C")
    p.add_argument("--list", type=_count, default=0, metavar="N", help="also list the N most recently used blocks")
    p.set_defaults(func=run)


def _iso(us: int) -> str | None:
    if not us:
        return None
    return _dt.datetime.fromtimestamp(us / 1e6, _dt.timezone.utc).isoformat(timespec="seconds")


def _lock_holder(path: str) -> int | None:
    from kvbm.tiers.disk import LOCK_NAME

    try:
        with open(os.path.join(path, LOCK_NAME)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    # The pid in LOCK is written by the holder and left behind at exit: check it still runs and
    # still has the lock file open (without touching the flock, which a writer may be taking).
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    target = os.path.realpath(os.path.join(path, LOCK_NAME))
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return pid
        except OSError:
            continue
    return None


def inspect_dir(path: str, *, verify: bool = False, list_n: int = 0) -> dict[str, Any]:
    """Summary of a disk tier directory as plain data; read-only.

    Raises ConfigError when ``path`` holds no disk tier, StorageIOError when the catalog cannot
    be read.
    """
    import lmdb

    from kvbm.tiers.disk import CATALOG_SUBDIR, RECORD, RECORD_DTYPE
    from kvbm.tiers.disk_recovery import lmdb_file_problem

    cat_dir = os.path.join(path, CATALOG_SUBDIR)
    if not os.path.isdir(cat_dir):
        subs = _tier_subdirs(path)
        if len(subs) == 1:
            return inspect_dir(subs[0], verify=verify, list_n=list_n)
        if subs:
            raise ConfigError(
                f"{path} is a vLLM connector disk_path with {len(subs)} disk tiers (one per model and geometry); "
                f"inspect one of them: " + ", ".join(f"kvbm inspect {d}" for d in subs))
        raise ConfigError(f"{path} holds no kvbm disk tier (no {CATALOG_SUBDIR}/ directory)")
    problem = lmdb_file_problem(cat_dir)  # Note [No SIGBUS] in kvbm.tiers.disk_recovery
    if problem:
        raise StorageIOError(f"the disk catalog {cat_dir} is damaged: {problem} (the tier moves it aside and "
                             "rebuilds it from the slab records at its next start)")
    try:
        env = lmdb.open(cat_dir, readonly=True, lock=True, max_dbs=4, subdir=True, readahead=False)
    except lmdb.Error as e:
        try:  # a directory we may not write the LMDB lock of: read without it
            env = lmdb.open(cat_dir, readonly=True, lock=False, max_dbs=4, subdir=True)
        except lmdb.Error:
            raise StorageIOError(f"cannot open the disk catalog {cat_dir} read-only: {e}") from e
    try:
        with env.begin() as txn:
            try:
                db_meta = env.open_db(b"meta", txn=txn, create=False)
                db_blocks = env.open_db(b"blocks", txn=txn, create=False)
                db_stats = env.open_db(b"stats", txn=txn, create=False)
            except lmdb.NotFoundError:
                raise ConfigError(f"{cat_dir} is not a kvbm disk catalog (missing databases)") from None
            fmt = txn.get(b"format", db=db_meta)
            geo = json.loads(txn.get(b"geometry", db=db_meta) or b"{}")
            counters = json.loads(txn.get(b"counters", db=db_stats) or b"{}")
            if not isinstance(geo, dict) or not isinstance(counters, dict):
                raise ValueError("geometry or counters is not a JSON object")
            items = list(txn.cursor(db=db_blocks).iternext(keys=True, values=True))
    except (lmdb.Error, ValueError, TypeError) as e:
        raise StorageIOError(f"the disk catalog {cat_dir} is damaged: {type(e).__name__}: {e} (the tier moves it "
                             "aside and rebuilds it from the slab records at its next start)") from e
    finally:
        env.close()
    malformed = sum(1 for _, v in items if len(v) != RECORD.size)
    items = [(k, v) for k, v in items if len(v) == RECORD.size]
    keys = [k for k, _ in items]
    vals = b"".join(v for _, v in items)
    recs = np.frombuffer(vals, dtype=RECORD_DTYPE) if keys else np.zeros(0, RECORD_DTYPE)
    try:
        slot_bytes = int(geo.get("slot_bytes", 0))
        spp = int(geo.get("slots_per_slab", 0))
        shard_names = [str(d) for d in geo.get("shard_dirs", ["."])]
    except (TypeError, ValueError) as e:
        raise StorageIOError(f"the disk catalog {cat_dir} has a damaged geometry: {e}") from e
    slabs = []
    for name in sorted(os.listdir(path)):
        if name.startswith("slab-") and name.endswith(".kvbm"):
            st = os.stat(os.path.join(path, name))
            slabs.append({"name": name, "bytes": st.st_size, "allocated": st.st_blocks * 512})
    ns_vals, ns_counts = np.unique(recs["ns"], return_counts=True)
    info: dict[str, Any] = {
        "dir": os.path.abspath(path),
        "format": fmt.decode() if fmt else None,
        "slot_bytes": slot_bytes,
        "slots_per_slab": spp,
        "lock_holder_pid": _lock_holder(path),
        "slab_files": len(slabs),
        "slab_bytes": sum(s["bytes"] for s in slabs),
        "slab_bytes_allocated": sum(s["allocated"] for s in slabs),
        "blocks": len(keys),
        "malformed_records": malformed,
        "bytes": int(recs["length"].sum()),
        "namespaces": {f"{int(v):016x}": int(c) for v, c in zip(ns_vals, ns_counts, strict=False)},
        "oldest_created": _iso(int(recs["created_us"].min())) if len(recs) else None,
        "newest_created": _iso(int(recs["created_us"].max())) if len(recs) else None,
        "last_access": _iso(int(recs["access_us"].max())) if len(recs) else None,
        "hits": int(recs["hits"].sum()),
        "checksum_failures": int(counters.get("checksum_failures", 0)),
        "counters": counters,
    }
    if list_n > 0 and len(recs):
        order = np.argsort(recs["access_us"])[::-1][:list_n]
        info["recent_blocks"] = [
            {
                "hash": keys[i].hex(),
                "slot": int(recs["slot"][i]),
                "length": int(recs["length"][i]),
                "crc32c": f"{int(recs['crc'][i]):08x}",
                "namespace": f"{int(recs['ns'][i]):016x}",
                "created": _iso(int(recs["created_us"][i])),
                "last_access": _iso(int(recs["access_us"][i])),
                "hits": int(recs["hits"][i]),
            }
            for i in order.tolist()
        ]
    shard_dirs = [os.path.normpath(os.path.join(path, d)) for d in shard_names]
    if len(shard_dirs) > 1:
        info["shards"] = len(shard_dirs)
        info["shard_dirs"] = shard_dirs
    if verify:
        crcs = [recs["crc"]]
        if len(shard_dirs) > 1:
            crcs = list(_shard_crcs(cat_dir, keys, len(shard_dirs)).T)
        per = [_verify(d, keys, recs, slot_bytes, spp, c) for d, c in zip(shard_dirs, crcs, strict=True)]
        info["verify"] = {k: sum(p[k] for p in per) for k in per[0]}
        info["verify"]["bad"] += malformed
    return info


def _tier_subdirs(path: str) -> list[str]:
    """Subdirectories of ``path`` that hold a disk tier catalog (a vLLM connector's disk_path)."""
    from kvbm.tiers.disk import CATALOG_SUBDIR

    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return [os.path.join(path, n) for n in names if os.path.isdir(os.path.join(path, n, CATALOG_SUBDIR))]


def _shard_crcs(cat_dir: str, keys: list[bytes], shards: int) -> np.ndarray:
    """``[len(keys), shards]`` CRC32C of every shard (0 where a key has no shard entry)."""
    import lmdb

    out = np.zeros((len(keys), shards), np.uint32)
    try:
        env = lmdb.open(cat_dir, readonly=True, lock=False, max_dbs=4, subdir=True)
        try:
            with env.begin() as txn:
                db = env.open_db(b"shards", txn=txn, create=False)
                for i, k in enumerate(keys):
                    v = txn.get(k, db=db)
                    if v is not None and len(v) == 4 * shards:
                        out[i] = np.frombuffer(v, "<u4")
        finally:
            env.close()
    except lmdb.Error as e:
        raise StorageIOError(f"the disk catalog {cat_dir} is damaged (shard CRCs): {type(e).__name__}: {e} (the "
                             "tier moves it aside and rebuilds it from the slab records at its next start)") from e
    return out


def _verify(path: str, keys: list[bytes], recs: np.ndarray, slot_bytes: int, spp: int,
            crcs: np.ndarray | None = None) -> dict[str, int]:
    """Check every record's slab header and bytes (plain reads: works on any file system).

    A record is ok only when its catalog entry is valid (version 1, length 1..slot_bytes) and its
    slab record header is intact and names the same slot, block hash, length and CRC, and the
    bytes match the CRC. Everything else is counted as bad, by kind.
    """
    from kvbm import _native
    from kvbm.tiers.disk import RECORD_HEADER

    out = {"checked": 0, "ok": 0, "bad": 0, "invalid_records": 0, "record_mismatches": 0, "checksum_failures": 0,
           "short_or_missing": 0, "io_errors": 0}
    if not len(recs):
        return out
    crcs = recs["crc"] if crcs is None else crcs
    fds: dict[int, int] = {}
    try:
        for i in range(len(recs)):
            out["checked"] += 1
            slot, length, ver = int(recs["slot"][i]), int(recs["length"][i]), int(recs["version"][i])
            if ver != 1 or not 0 < length <= slot_bytes or spp <= 0:
                out["invalid_records"] += 1
                continue
            slab = slot // spp
            if slab not in fds:
                try:
                    fds[slab] = os.open(os.path.join(path, f"slab-{slab:05d}.kvbm"), os.O_RDONLY)
                except OSError:
                    fds[slab] = -1
            fd = fds[slab]
            if fd < 0:
                out["short_or_missing"] += 1
                continue
            try:
                raw = os.pread(fd, RECORD_HEADER + length, (slot % spp) * (slot_bytes + RECORD_HEADER))
            except OSError:
                out["io_errors"] += 1
                continue
            if len(raw) < RECORD_HEADER + length:
                out["short_or_missing"] += 1
                continue
            if not _header_matches(raw, slot, keys[i], length, int(crcs[i])):
                out["record_mismatches"] += 1
                continue
            if _native.crc32c(raw[RECORD_HEADER:]) != int(crcs[i]):
                out["checksum_failures"] += 1
                continue
            out["ok"] += 1
    finally:
        for fd in fds.values():
            if fd >= 0:
                os.close(fd)
    out["bad"] = out["checked"] - out["ok"]
    return out


def _header_matches(raw: bytes, slot: int, key: bytes, length: int, crc: int) -> bool:
    """The slab record header (Note [Records name themselves], tiers/disk_store.h) names this record.

    Its namespace digest is not compared: inspect knows no digest (a sharded connector directory
    holds one per rank); the tier checks it on every read.
    """
    import struct

    from kvbm import _native

    if raw[:8] != b"KVBMREC1" or struct.unpack_from("<I", raw, 8)[0] != _native.DISK_RECORD_VERSION:
        return False
    klen = struct.unpack_from("<I", raw, 36)[0]
    if not 0 < klen <= _native.DISK_MAX_KEY_BYTES or (
            _native.crc32c(raw[16 : 64 + klen]) != struct.unpack_from("<I", raw, 12)[0]):
        return False
    h_slot, h_len, h_crc = struct.unpack_from("<QQI", raw, 16)
    return h_slot == slot and h_len == length and h_crc == crc and raw[64 : 64 + klen] == key


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run(args: argparse.Namespace) -> int:
    info = inspect_dir(args.dir, verify=args.verify, list_n=args.list)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    holder = info["lock_holder_pid"]
    lines = [
        f"kvbm disk tier {info['dir']}",
        f"  format         {info['format']}  (slot {info['slot_bytes']} B, {info['slots_per_slab']} slots per slab)",
        f"  in use by      {'pid ' + str(holder) if holder else 'no running process'}",
        f"  slab files     {info['slab_files']}: {_mib(info['slab_bytes'])} apparent, "
        f"{_mib(info['slab_bytes_allocated'])} allocated",
        f"  blocks         {info['blocks']} ({_mib(info['bytes'])} of data)",
        "  namespaces     "
        + (", ".join(f"{k}: {v}" for k, v in info["namespaces"].items()) or "-"),
        f"  oldest         {info['oldest_created'] or '-'}",
        f"  newest         {info['newest_created'] or '-'}",
        f"  last access    {info['last_access'] or '-'}",
        f"  hits           {info['hits']}",
        f"  checksum failures (lifetime)  {info['checksum_failures']}",
    ]
    if "shards" in info:
        lines.insert(4, f"  shards         {info['shards']} per block (one per rank): " + ", ".join(info["shard_dirs"]))
    other = {k: v for k, v in info["counters"].items() if k != "checksum_failures" and v}
    if other:
        lines.append("  other counters " + ", ".join(f"{k}={v}" for k, v in sorted(other.items())))
    if "verify" in info:
        v = info["verify"]
        lines.append(
            f"  verify         {v['checked']} read: {v['ok']} ok, {v['bad']} bad ({v['invalid_records']} invalid "
            f"records, {v['record_mismatches']} record mismatches, {v['checksum_failures']} checksum failures, "
            f"{v['short_or_missing']} short/missing, {v['io_errors']} IO errors)"
        )
    for b in info.get("recent_blocks", []):
        lines.append(
            f"    {b['hash']}  slot {b['slot']:>8}  {b['length']:>10} B  crc {b['crc32c']}  "
            f"ns {b['namespace']}  hits {b['hits']}  last {b['last_access']}"
        )
    print("\n".join(lines))
    return 0
