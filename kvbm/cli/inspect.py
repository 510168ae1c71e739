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

    from kvbm.tiers.disk import CATALOG_SUBDIR, RECORD_DTYPE

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
            cur = txn.cursor(db=db_blocks)
            keys = list(cur.iternext(keys=True, values=False))
            vals = b"".join(cur.iternext(keys=False, values=True))
    finally:
        env.close()
    recs = np.frombuffer(vals, dtype=RECORD_DTYPE) if keys else np.zeros(0, RECORD_DTYPE)
    slot_bytes = int(geo.get("slot_bytes", 0))
    spp = int(geo.get("slots_per_slab", 0))
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
    shard_dirs = [os.path.normpath(os.path.join(path, d)) for d in geo.get("shard_dirs", ["."])]
    if len(shard_dirs) > 1:
        info["shards"] = len(shard_dirs)
        info["shard_dirs"] = shard_dirs
    if verify:
        crcs = [recs["crc"]]
        if len(shard_dirs) > 1:
            crcs = list(_shard_crcs(cat_dir, keys, len(shard_dirs)).T)
        per = [_verify(d, recs, slot_bytes, spp, c) for d, c in zip(shard_dirs, crcs, strict=True)]
        info["verify"] = {k: sum(p[k] for p in per) for k in per[0]}
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
    return out


def _verify(path: str, recs: np.ndarray, slot_bytes: int, spp: int, crcs: np.ndarray | None = None) -> dict[str, int]:
    from kvbm import _native

    out = {"checked": 0, "ok": 0, "checksum_failures": 0, "short_or_missing": 0, "io_errors": 0}
    if not len(recs) or not slot_bytes:
        return out
    crcs = recs["crc"] if crcs is None else crcs
    num_slots = int(recs["slot"].max()) + 1
    store = _native.DiskStore(path, slot_bytes, num_slots, spp, 4, True, True)
    try:
        batch = 64
        bufs = [np.empty(slot_bytes, np.uint8) for _ in range(batch)]
        for i in range(0, len(recs), batch):
            r = recs[i : i + batch]
            h = store.read(
                r["slot"].tolist(), bufs[: len(r)], r["length"].tolist(), crcs[i : i + batch].tolist(), True
            )
            h.wait()
            codes, _, errnos, _ = h.results()
            out["checked"] += len(r)
            out["ok"] += int((codes == 0).sum())
            out["checksum_failures"] += int((codes == _native.DISK_CODE_CHECKSUM).sum())
            io = codes == _native.DISK_CODE_IO
            out["short_or_missing"] += int((io & ((errnos == 0) | (errnos == 2))).sum())
            out["io_errors"] += int((io & (errnos != 0) & (errnos != 2)).sum())
    finally:
        store.close()
    return out


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
            f"  verify         {v['checked']} read: {v['ok']} ok, {v['checksum_failures']} checksum failures, "
            f"{v['short_or_missing']} short/missing, {v['io_errors']} IO errors"
        )
    for b in info.get("recent_blocks", []):
        lines.append(
            f"    {b['hash']}  slot {b['slot']:>8}  {b['length']:>10} B  crc {b['crc32c']}  "
            f"ns {b['namespace']}  hits {b['hits']}  last {b['last_access']}"
        )
    print("\n".join(lines))
    return 0
