"""Damage campaign over disk-tier files (issue 12, findings 5-6), run by tests/test_disk_damage.py.

The parent builds one pristine tier directory (blocks whose bytes follow from their hash: the
content oracle), then for every trial copies it, damages the copy one way and hands the copy to a
CHILD process (this file, ``python disk_damage.py child LAYOUT``) that opens the tier, reads
every block it can find, stores and reads new ones, runs ``kvbm inspect --verify``'s function and
closes. A signal (SIGBUS, SIGSEGV) kills only the child: the parent counts it as a crash. The
child reports, per trial, wrong bytes served and exceptions that are not ``KvbmError``.

Layouts: ``tier`` (BlockManager's disk tier, :class:`kvbm.tiers.disk.DiskTier`) and
``connector`` (the vLLM connector's disk tier: a sharded DiskCatalog plus one RankDisk per rank;
same record format and catalog code).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import traceback
from collections import Counter
from typing import Any

import numpy as np

SLOT = 4096
NBLOCKS = 20
SLOTS = 24
SLAB_BYTES = 8 * SLOT  # 8 slots per slab: several slab files
NAMESPACE = b"damage-campaign!"  # 16 bytes: used as the digest itself
RANK_NS = [b"rank-0-namespace", b"rank-1-namespace"]


def key_of(i: int) -> bytes:
    """The catalog key (16 bytes) of oracle block ``i``."""
    return (0x5EED_0000_0000_0000_0000_0000_0000_0000 + i * 0x9E37_79B9_7F4A_7C15).to_bytes(16, "big")


NEW = [b"new-block-%02d" % i for i in range(3)]  # stored by every trial after the damage


def oracle(key: bytes, rank: int = 0) -> np.ndarray:
    """The bytes block ``key`` was stored with (on ``rank``)."""
    if key in NEW:
        return np.full(SLOT, key[-1] + rank, np.uint8)
    rng = np.random.default_rng(int.from_bytes(key[:8], "little") ^ rank)
    length = SLOT if key[-1] % 3 else SLOT - 100  # some blocks shorter than their slot
    return rng.integers(0, 256, length, dtype=np.uint8)


# ---- the layouts --------------------------------------------------------------------------------


def open_tier(d: str) -> Any:
    from kvbm.tiers.disk import DiskTier

    return DiskTier(d, slot_bytes=SLOT, capacity_bytes=SLOT * SLOTS, namespace=NAMESPACE, slab_bytes=SLAB_BYTES,
                    durability="none", io_threads=2, o_direct=False, preallocate=False)


def build(d: str, layout: str) -> None:
    """Fill a pristine directory with NBLOCKS oracle blocks."""
    keys = [key_of(i) for i in range(NBLOCKS)]
    if layout == "tier":
        with open_tier(d) as t:
            ok = t.put(keys, [oracle(k) for k in keys])
            assert all(ok), ok
        return
    cat, ranks = open_connector(d)
    try:
        assert all(connector_store(cat, ranks, keys, connector_oracle))
    finally:
        cat.close()
        for rd in ranks:
            rd.close()


def connector_store(cat: Any, ranks: list[Any], keys: list[bytes], rows: Any) -> list[bool]:
    """Store ``keys`` as the connector does: reserve in the catalog, every rank writes its shard
    (``rows(key, rank)``), commit with every rank's CRC. Returns per key whether it is stored."""
    from kvbm.integrations.vllm.disk import aligned_rows

    slots = cat.reserve(keys)
    idx = [i for i, s in enumerate(slots) if s >= 0]
    wkeys, wslots = [keys[i] for i in idx], [slots[i] for i in idx]
    crcs: list[dict[bytes, int]] = []
    failed: set[bytes] = set()
    for r, rd in enumerate(ranks):
        buf = aligned_rows(max(len(wkeys), 1), SLOT)
        for j, k in enumerate(wkeys):
            buf[j] = rows(k, r)
        rd.write(wkeys, wslots, [buf[j] for j in range(len(wkeys))], buf)
        written, bad = rd.poll(wait=True)
        crcs.append(written)
        failed.update(bad)
    ok = [k not in failed and all(k in c for c in crcs) for k in wkeys]
    stored = cat.commit(wkeys, wslots, [SLOT] * len(wkeys), [crcs[0].get(k, 0) for k in wkeys], ok, 7,
                        shard_crcs=[[c.get(k, 0) for c in crcs] for k in wkeys])
    out = [False] * len(keys)
    for j, i in enumerate(idx):
        out[i] = bool(stored[j])
    return out


def open_connector(d: str) -> tuple[Any, list[Any]]:
    from kvbm.integrations.vllm import disk

    cat = disk.open_catalog(d, RANK_NS, SLOT, SLOTS * disk.disk_block_bytes(SLOT, len(RANK_NS)), "none", "lru")
    try:
        ranks = [disk.RankDisk(d, ns, SLOT, SLOTS, io_threads=1, o_direct=False, durability="none", verify=True)
                 for ns in RANK_NS]
    except BaseException:
        cat.close()
        raise
    return cat, ranks


def connector_oracle(key: bytes, rank: int) -> np.ndarray:
    return np.resize(oracle(key, rank), SLOT)


# ---- one trial in the child -------------------------------------------------------------------------


def check_tier(d: str, res: dict[str, Any]) -> None:
    from kvbm.errors import KvbmError

    try:
        t = open_tier(d)
    except KvbmError as e:
        res["refused"] = type(e).__name__
        return
    with t:
        known = {key_of(i) for i in range(NBLOCKS)} | set(NEW)
        for k in sorted(known | set(t.keys())):
            want = oracle(k) if k in known else None
            n = t.length_of(k)
            buf = np.zeros(max(n, 1) if n > 0 else (len(want) if want is not None else SLOT), np.uint8)
            hit = t.get([k], [buf])[0]
            if hit:
                res["hits"] += 1
                if want is None or len(buf) != len(want) or not np.array_equal(buf, want):
                    res["wrong"] += 1
        t.put(NEW, [oracle(k) for k in NEW])
        for k in NEW:
            buf = np.zeros(SLOT, np.uint8)
            if t.get([k], [buf])[0] and not np.array_equal(buf, oracle(k)):
                res["wrong"] += 1
        res["rebuilt"] = t.stats()["totals"].get("catalog_rebuilds", 0)


def check_connector(d: str, res: dict[str, Any]) -> None:
    from kvbm.errors import KvbmError
    from kvbm.integrations.vllm.disk import aligned_rows

    try:
        cat, ranks = open_connector(d)
    except KvbmError as e:
        res["refused"] = type(e).__name__
        return
    try:
        known = {key_of(i) for i in range(NBLOCKS)} | set(NEW)
        for k in sorted(known | set(cat.keys())):
            s = cat.slot_of(k)
            if s < 0:
                continue
            crcs = cat.shard_crcs(s)
            all_ok = True
            for r, rd in enumerate(ranks):
                rows = aligned_rows(1, SLOT)
                got = rd.read([s], [crcs[r]], rows, [k])
                if got.ok[0]:
                    if k not in known or not np.array_equal(rows[0], connector_oracle(k, r)):
                        res["wrong"] += 1
                else:
                    all_ok = False
            if all_ok:
                res["hits"] += 1
        stored = connector_store(cat, ranks, NEW, connector_oracle)
        for k, ok in zip(NEW, stored, strict=True):
            s = cat.slot_of(k)
            if not ok or s < 0:
                continue
            for r, rd in enumerate(ranks):
                rows = aligned_rows(1, SLOT)
                ok = rd.read([s], [cat.shard_crcs(s)[r]], rows, [k]).ok[0]
                if ok and not np.array_equal(rows[0], connector_oracle(k, r)):
                    res["wrong"] += 1
        res["rebuilt"] = cat.totals.get("catalog_rebuilds", 0)
    finally:
        cat.close()
        for rd in ranks:
            rd.close()


def run_trial(d: str, layout: str) -> dict[str, Any]:
    """One trial over the damaged directory ``d``: inspect --verify, open + read everything + store new
    blocks, then a second start over what the first left. Returns the counts."""
    from kvbm.cli.inspect import inspect_dir
    from kvbm.errors import KvbmError

    check = check_tier if layout == "tier" else check_connector
    known = {key_of(i).hex() for i in range(NBLOCKS)}
    res: dict[str, Any] = {"dir": d, "hits": 0, "wrong": 0, "foreign": [], "inspect_missed": 0}
    for step in ("inspect", "open", "reopen"):
        try:
            if step == "inspect":  # first, before the tier drops what it finds bad
                info = inspect_dir(_tier_dir(d, layout), verify=True, list_n=1 << 20)
                # A catalog key nobody stored (a flipped key) can only point at a record of another
                # block: inspect must count it bad (main said "ok").
                unknown = sum(1 for b in info.get("recent_blocks", []) if b["hash"] not in known)
                res["inspect_missed"] = max(0, unknown - info["verify"]["bad"])
            elif step == "open":
                check(d, res)
            else:  # a second start over what the first left must work too
                again: dict[str, Any] = {"hits": 0, "wrong": 0}
                check(d, again)
                res["wrong"] += again["wrong"]
        except KvbmError as e:
            res.setdefault("kvbm_errors", []).append(f"{step}: {type(e).__name__}: {e}")
        except Exception:  # noqa: BLE001 - counted: the campaign asserts there are none
            res["foreign"].append(f"{step}: {traceback.format_exc(limit=6)}")
    return res


def child(layout: str, trial_timeout: float = 60.0) -> None:
    """Trial server: reads trial directories from stdin, one per line, and runs each in its own forked
    process (imports are paid once, here); prints one JSON result line per trial. A trial killed by a
    signal (SIGBUS, SIGSEGV, or SIGALRM after ``trial_timeout`` s: a hang) is reported as a crash."""
    import kvbm.cli.inspect  # noqa: F401 - imported before forking
    import kvbm.integrations.vllm.disk  # noqa: F401
    import kvbm.tiers.disk  # noqa: F401

    for line in sys.stdin:
        d = line.strip()
        if not d:
            continue
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the trial
            os.close(rfd)
            signal.alarm(int(trial_timeout))
            code = 0
            try:
                out = json.dumps(run_trial(d, layout)).encode()
                with os.fdopen(wfd, "wb") as f:
                    f.write(out)
            except BaseException:  # noqa: BLE001 - reported below as a foreign exception
                code = 3
            os._exit(code)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            raw = f.read()
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            res = {"dir": d, "crash": signal.Signals(os.WTERMSIG(status)).name}
        elif raw:
            res = json.loads(raw)
        else:
            res = {"dir": d, "hits": 0, "wrong": 0, "foreign": [f"trial exited with {os.WEXITSTATUS(status)}"]}
        print(json.dumps(res), flush=True)


# ---- damage (parent side) -------------------------------------------------------------------------


def _flip(path: str, off: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        if not b:
            return
        f.seek(off)
        f.write(bytes([b[0] ^ (1 << bit)]))


def _tier_dir(d: str, layout: str) -> str:
    return d if layout == "tier" else os.path.join(d, RANK_NS[0].hex())


def _slabs(d: str, layout: str) -> list[str]:
    dirs = [d] if layout == "tier" else [os.path.join(d, ns.hex()) for ns in RANK_NS]
    return sorted(os.path.join(x, n) for x in dirs for n in os.listdir(x) if n.startswith("slab-"))


def _key_offsets(mdb: str) -> list[int]:
    with open(mdb, "rb") as f:
        raw = f.read()
    out = []
    for i in range(NBLOCKS):
        o = raw.find(key_of(i))
        if o >= 0:
            out.append(o)
    return out


def damage(d: str, layout: str, kind: str, rng: random.Random) -> None:
    """Apply one damage of ``kind`` to the tier directory ``d``."""
    td = _tier_dir(d, layout)
    mdb = os.path.join(td, "catalog", "data.mdb")
    size = os.path.getsize(mdb)
    stride = SLOT + 4096
    if kind == "catalog_truncate":
        with open(mdb, "r+b") as f:
            f.truncate(rng.choice([0, 100, 4096, 8192, 8192 + 17, size // 2, size - 4096, size - 1,
                                   rng.randrange(0, size)]))
    elif kind == "catalog_key_flip":
        o = rng.choice(_key_offsets(mdb))
        _flip(mdb, o + rng.randrange(16), rng.randrange(8))
    elif kind == "catalog_value_flip":
        o = rng.choice(_key_offsets(mdb)) + 16
        _flip(mdb, o + rng.randrange(56), rng.randrange(8))
    elif kind == "catalog_random_flips":
        for _ in range(rng.randrange(1, 6)):
            _flip(mdb, rng.randrange(size), rng.randrange(8))
    elif kind == "catalog_zero_page":
        with open(mdb, "r+b") as f:
            f.seek(4096 * rng.randrange(size // 4096))
            f.write(bytes(4096))
    elif kind == "catalog_garbage":  # the whole file overwritten (same size)
        with open(mdb, "r+b") as f:
            f.write(rng.randbytes(size))
    elif kind == "catalog_old_format":  # a catalog of the previous format (slabs without headers)
        import lmdb

        env = lmdb.open(os.path.join(td, "catalog"), max_dbs=4, subdir=True)
        with env.begin(write=True, db=env.open_db(b"meta")) as txn:
            txn.put(b"format", b"kvbm-disk/1")
        env.close()
    elif kind == "catalog_deleted":
        shutil.rmtree(os.path.join(td, "catalog"))
    elif kind == "lock_garbage":
        with open(os.path.join(td, "LOCK"), "wb") as f:
            f.write(os.urandom(rng.randrange(1, 300)))
        lm = os.path.join(td, "catalog", "lock.mdb")
        if os.path.exists(lm) and rng.random() < 0.5:
            with open(lm, "r+b") as f:
                f.write(os.urandom(256))
    elif kind in ("record_wrong_version", "record_bad_length", "record_malformed"):
        import lmdb

        env = lmdb.open(os.path.join(td, "catalog"), max_dbs=4, subdir=True)
        db = env.open_db(b"blocks")
        with env.begin(write=True, db=db) as txn:
            k = key_of(rng.randrange(NBLOCKS))
            v = bytearray(txn.get(k))
            if kind == "record_wrong_version":
                v[0] = rng.choice([0, 2, 255])
            elif kind == "record_bad_length":
                struct.pack_into("<Q", v, 16, rng.choice([0, SLOT + 1, 1 << 62]))
            else:
                v = v[: rng.choice([0, 1, 55])] if rng.random() < 0.7 else v + b"x"
            txn.put(k, bytes(v))
        env.close()
    elif kind == "slab_header_flip":
        p = rng.choice(_slabs(d, layout))
        slot = rng.randrange(max(1, os.path.getsize(p) // stride))
        _flip(p, slot * stride + rng.randrange(80), rng.randrange(8))
    elif kind == "slab_header_version":
        p = rng.choice(_slabs(d, layout))
        slot = rng.randrange(max(1, os.path.getsize(p) // stride))
        with open(p, "r+b") as f:
            f.seek(slot * stride + 8)
            f.write(struct.pack("<I", rng.choice([0, 2, 7])))
    elif kind == "slab_payload_flip":
        p = rng.choice(_slabs(d, layout))
        slot = rng.randrange(max(1, os.path.getsize(p) // stride))
        _flip(p, slot * stride + 4096 + rng.randrange(SLOT - 100), rng.randrange(8))
    elif kind == "slab_truncate":
        p = rng.choice(_slabs(d, layout))
        with open(p, "r+b") as f:
            f.truncate(rng.randrange(os.path.getsize(p)))
    elif kind == "slab_zero_page":
        p = rng.choice(_slabs(d, layout))
        with open(p, "r+b") as f:
            f.seek(4096 * rng.randrange(os.path.getsize(p) // 4096))
            f.write(bytes(4096))
    elif kind == "slab_deleted":
        os.unlink(rng.choice(_slabs(d, layout)))
    elif kind == "slab_records_swapped":
        p = rng.choice(_slabs(d, layout))
        n = os.path.getsize(p) // stride
        a, b = rng.sample(range(n), 2) if n >= 2 else (0, 0)
        with open(p, "r+b") as f:
            f.seek(a * stride)
            ra = f.read(stride)
            f.seek(b * stride)
            rb = f.read(stride)
            f.seek(a * stride)
            f.write(rb)
            f.seek(b * stride)
            f.write(ra)
    elif kind == "slab_record_copied":  # another slot's valid record copied over this one
        ps = _slabs(d, layout)
        src, dst = rng.choice(ps), rng.choice(ps)
        with open(src, "rb") as f:
            rec = f.read(stride)
        with open(dst, "r+b") as f:
            f.seek(stride * rng.randrange(1, max(2, os.path.getsize(dst) // stride)))
            f.write(rec)
    else:
        raise ValueError(kind)


KINDS = (
    "catalog_truncate", "catalog_key_flip", "catalog_value_flip", "catalog_random_flips", "catalog_zero_page",
    "catalog_garbage", "catalog_old_format", "catalog_deleted", "lock_garbage", "record_wrong_version",
    "record_bad_length", "record_malformed", "slab_header_flip", "slab_header_version", "slab_payload_flip",
    "slab_truncate", "slab_zero_page", "slab_deleted", "slab_records_swapped", "slab_record_copied",
)


def campaign(root: str, layout: str, trials_per_kind: int, seed: int = 12) -> dict[str, Any]:
    """Run the campaign over ``layout``: ``trials_per_kind`` damaged copies per kind, each trial in its own
    process. Returns {"stats": {kind: Counter(trials, crashes, wrong, foreign, inspect_missed, hits,
    refused, rebuilt)}, "foreign": [details of crashes and foreign exceptions]}."""
    rng = random.Random(seed)
    pristine = os.path.join(root, f"pristine-{layout}")
    os.makedirs(pristine)
    build(pristine, layout)
    trials = []
    for kind in KINDS:
        for t in range(trials_per_kind):
            d = os.path.join(root, f"{layout}-{kind}-{t}")
            shutil.copytree(pristine, d)
            damage(d, layout, kind, rng)
            trials.append((kind, d))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "child", layout],
                       input="\n".join(d for _, d in trials) + "\n", capture_output=True, text=True, timeout=900)
    results = {r["dir"]: r for r in map(json.loads, p.stdout.splitlines())}
    stats: dict[str, Counter] = {k: Counter() for k in KINDS}
    foreign: list[str] = []
    for kind, d in trials:
        c = stats[kind]
        r = results.get(d)
        if r is None:
            raise RuntimeError(f"the trial server stopped before {d} (rc {p.returncode}): {p.stderr[-3000:]}")
        c["trials"] += 1
        if "crash" in r:
            c["crashes"] += 1
            foreign.append(f"{kind} {d}: killed by {r['crash']}")
            continue
        for f in ("hits", "wrong", "inspect_missed"):
            c[f] += r.get(f, 0)
        c["foreign"] += len(r["foreign"])
        c["refused"] += "refused" in r
        c["rebuilt"] += bool(r.get("rebuilt"))
        c["kvbm_errors"] += len(r.get("kvbm_errors", []))
        foreign.extend(f"{kind} {d}: {x}" for x in r["foreign"])
        shutil.rmtree(d, ignore_errors=True)
    return {"stats": stats, "foreign": foreign}


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "child":
        child(sys.argv[2])
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = campaign(tmp, sys.argv[1] if len(sys.argv) > 1 else "tier", int(os.environ.get("TRIALS", "6")))
            for k, c in out["stats"].items():
                print(k, dict(c))
            print("\n".join(out["foreign"][:5]))
