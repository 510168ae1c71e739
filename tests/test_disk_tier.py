"""The local SSD tier on real files: round trips, eviction, restart in a new process, locking,
corruption, full disk and bad configuration. (Crash tests: test_disk_crash.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest

from kvbm import _native
from kvbm.errors import ConfigError, InvalidArgumentError, KvbmError, StorageIOError
from kvbm.tiers.disk import RECORD, RECORD_HEADER, DiskTier, hash_key, slab_path

SLOT = 16384
STRIDE = SLOT + RECORD_HEADER  # a slot in its slab: record header page + data
NEUTRAL_CWD = "/"


def content(key: int, slot: int = SLOT) -> np.ndarray:
    """Deterministic bytes of block `key`, of a key-dependent length in 1..slot."""
    n = 1 + (key * 2654435761) % slot
    return np.random.default_rng(key).integers(0, 256, n, dtype=np.uint8)


def tier(path: Path, slots: int = 64, **kw) -> DiskTier:
    kw.setdefault("durability", "none")
    return DiskTier(path, slot_bytes=SLOT, capacity_bytes=SLOT * slots, **kw)


def run_py(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # cwd: a neutral directory, so the child imports the installed kvbm, not the source tree's
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout, cwd=NEUTRAL_CWD,
    )  # fmt: skip


def load_one(t: DiskTier, key: int) -> np.ndarray | None:
    n = t.length_of(key)
    if n < 0:
        return None
    out = np.empty(n, np.uint8)
    return out if t.get([key], [out])[0] else None


# ---- basic behaviour -------------------------------------------------------------------------


def test_roundtrip_many_buffer_kinds(tmp_path: Path) -> None:
    with tier(tmp_path) as t:
        assert t.o_direct_active or t.store.fallback_reason  # O_DIRECT, or a stated reason why not
        keys = list(range(1, 21))
        blocks = [content(k) for k in keys]
        # aligned full slots too (the in-place O_DIRECT path)
        full = np.random.default_rng(0).integers(0, 256, SLOT, dtype=np.uint8)
        assert t.put(keys, blocks) == [True] * 20
        assert t.put([b"full-slot"], [full]) == [True]
        assert t.put([b"bytes"], [b"\x01\x02\x03" * 5]) == [True]
        assert t.put([b"ba"], [bytearray(b"xyz" * 1000)]) == [True]
        outs = [np.empty(len(b), np.uint8) for b in blocks]
        assert t.get(keys, outs) == [True] * 20
        for b, o in zip(blocks, outs, strict=False):
            assert np.array_equal(b, o)
        o = np.empty(SLOT, np.uint8)
        assert t.get([b"full-slot"], [o]) == [True] and np.array_equal(o, full)
        ba = bytearray(15)
        assert t.get([b"bytes"], [ba]) == [True] and bytes(ba) == b"\x01\x02\x03" * 5
        ba = bytearray(3000)
        assert t.get([b"ba"], [ba]) == [True] and bytes(ba) == b"xyz" * 1000
        s = t.stats()
        assert s["hits"] == 23 and s["stores"] == 23 and s["blocks"] == 23
        assert s["io"]["checksum_failures"] == 0


def test_int_address_buffers(tmp_path: Path) -> None:
    with tier(tmp_path) as t:
        src = content(7)
        assert t.put([7], [src.ctypes.data], lengths=[len(src)]) == [True]
        dst = np.zeros(len(src), np.uint8)
        assert t.get([7], [dst.ctypes.data]) == [True]
        assert np.array_equal(src, dst)
        with pytest.raises(InvalidArgumentError, match="lengths"):
            t.put([8], [src.ctypes.data])


def test_lookup_contains_remove(tmp_path: Path) -> None:
    with tier(tmp_path) as t:
        t.put([1, 2, 3, 5], [content(k) for k in (1, 2, 3, 5)])
        assert t.lookup([1, 2, 3, 4, 5]) == 3
        assert t.lookup([4, 5]) == 0
        assert t.contains(5) and 5 in t and 4 not in t
        assert t.remove([2, 4]) == 1
        assert t.lookup([1, 2, 3]) == 1
        assert t.get([2], [np.empty(len(content(2)), np.uint8)]) == [False]
        assert t.stats()["misses"] == 1


def test_put_existing_is_skipped_and_true(tmp_path: Path) -> None:
    with tier(tmp_path) as t:
        assert t.put([1], [content(1)]) == [True]
        assert t.put([1, 1, 2], [content(1), content(1), content(2)]) == [True, True, True]
        assert t.stats()["stores"] == 2


def test_bad_arguments(tmp_path: Path) -> None:
    with tier(tmp_path) as t:
        with pytest.raises(InvalidArgumentError, match="slot_bytes"):
            t.put([1], [np.zeros(SLOT + 1, np.uint8)])
        with pytest.raises(InvalidArgumentError, match="2 blocks for 1 hashes"):
            t.put([1], [b"a", b"b"])
        with pytest.raises(InvalidArgumentError, match="block hash"):
            t.put([-1], [b"a"])
        with pytest.raises(InvalidArgumentError, match="buffer"):
            t.put([1], [object()])
        t.put([1], [b"abc"])
        with pytest.raises(InvalidArgumentError):
            t.get([1], [b"xyz"])  # read-only output buffer
        assert len(t) == 1


def test_async_handles(tmp_path: Path) -> None:
    with tier(tmp_path, io_threads=3) as t:
        keys = list(range(100, 140))
        blocks = [content(k) for k in keys]
        h = t.put_async(keys, blocks)
        assert len(h) == 40
        assert h.wait(timeout=30) == [True] * 40 and h.poll() and h.error is None
        outs = [np.empty(len(b), np.uint8) for b in blocks]
        g = t.get_async(keys, outs)
        while not g.poll():
            pass
        assert g.result() == [True] * 40
        assert all(np.array_equal(b, o) for b, o in zip(blocks, outs, strict=False))


def test_durability_modes_roundtrip(tmp_path: Path) -> None:
    for mode in ("none", "batch", "always"):
        d = tmp_path / mode
        d.mkdir()
        with tier(d, durability=mode) as t:
            assert t.put([1, 2], [content(1), content(2)]) == [True, True]
            syncs = t.stats()["io"]["syncs"]
            assert syncs == {"none": 0, "batch": 1, "always": 2}[mode]
        with tier(d, durability=mode) as t:
            assert np.array_equal(load_one(t, 2), content(2))


def test_buffered_io_when_o_direct_off(tmp_path: Path) -> None:
    with tier(tmp_path, o_direct=False) as t:
        assert not t.o_direct_active
        t.put([1, 2], [content(1), content(2)])
        assert np.array_equal(load_one(t, 1), content(1))


# ---- eviction --------------------------------------------------------------------------------


def test_lru_eviction_and_capacity(tmp_path: Path) -> None:
    with tier(tmp_path, slots=8, eviction="lru") as t:
        assert t.put(list(range(8)), [content(k) for k in range(8)]) == [True] * 8
        assert load_one(t, 0) is not None and load_one(t, 1) is not None  # 0, 1 recently used
        assert t.put([8, 9], [content(8), content(9)]) == [True, True]
        assert len(t) == 8
        assert sorted(int.from_bytes(k, "big") for k in t) == [0, 1, 4, 5, 6, 7, 8, 9]
        assert t.stats()["evictions"] == 2
        for k in (0, 1, 4, 5, 6, 7, 8, 9):
            assert np.array_equal(load_one(t, k), content(k))
    with tier(tmp_path, slots=8, eviction="lru") as t:  # the catalog agrees after a restart
        assert sorted(int.from_bytes(k, "big") for k in t) == [0, 1, 4, 5, 6, 7, 8, 9]
        assert t.stats()["totals"]["evictions"] == 2


def test_pinned_slot_is_not_evicted(tmp_path: Path) -> None:
    with tier(tmp_path, slots=4) as t:
        t.put([0, 1, 2, 3], [content(k) for k in range(4)])
        cat = t.catalog
        s0 = cat.slot_of(hash_key(0))
        cat.pin(s0)  # as a read in flight does
        # one batch: its own in-flight slots are not evictable, so only the pinned block is left
        assert t.put([4, 5, 6, 7], [content(k) for k in (4, 5, 6, 7)]) == [True] * 3 + [False]
        assert 0 in t and t.stats()["slots_free"] == 0
        cat.unpin(s0)
        assert t.put([7], [content(7)]) == [True]
        assert len(t) == 4 and 7 in t  # evicted one (which: the policy's choice, pin or not)
        assert all(np.array_equal(load_one(t, int.from_bytes(k, "big")), content(int.from_bytes(k, "big")))
                   for k in t)  # fmt: skip


def test_batch_larger_than_capacity_stores_what_fits(tmp_path: Path) -> None:
    with tier(tmp_path, slots=4) as t:
        r = t.put(list(range(6)), [content(k) for k in range(6)])
        assert r == [True] * 4 + [False] * 2  # in-flight slots of the same batch are not evictable
        assert len(t) == 4


# ---- persistence and processes ---------------------------------------------------------------

WRITER = """
import sys, numpy as np
from kvbm.tiers.disk import DiskTier
d, n = sys.argv[1], int(sys.argv[2])
def content(key, slot={slot}):
    m = 1 + (key * 2654435761) % slot
    return np.random.default_rng(key).integers(0, 256, m, dtype=np.uint8)
with DiskTier(d, slot_bytes={slot}, capacity_bytes={slot} * 256, durability="batch") as t:
    keys = list(range(1000, 1000 + n))
    ok = t.put(keys, [content(k) for k in keys])
    assert all(ok), ok
print("stored", len(t))
""".replace("{slot}", str(SLOT))


def test_restart_in_new_process_byte_exact(tmp_path: Path) -> None:
    r = run_py(WRITER, str(tmp_path), "200")
    assert r.returncode == 0, r.stderr
    assert "stored 200" in r.stdout
    with DiskTier(tmp_path, slot_bytes=SLOT, capacity_bytes=SLOT * 256) as t:
        assert len(t) == 200
        assert t.stats()["dropped_at_open"] == 0
        keys = list(range(1000, 1200))
        outs = [np.empty(t.length_of(k), np.uint8) for k in keys]
        assert t.get(keys, outs) == [True] * 200
        for k, o in zip(keys, outs, strict=False):
            assert np.array_equal(o, content(k))
        # and it keeps working: evicts and stores more
        assert t.put(list(range(5000, 5100)), [content(k) for k in range(5000, 5100)]) == [True] * 100
        assert len(t) == 256


def test_second_writer_gets_clear_error_and_inspect_works(tmp_path: Path) -> None:
    with tier(tmp_path) as t:
        t.put([1, 2, 3], [content(k) for k in (1, 2, 3)])
        with pytest.raises(StorageIOError, match="in use by another kvbm process"):
            tier(tmp_path)
        code = f"""
        from kvbm.tiers.disk import DiskTier
        from kvbm.errors import StorageIOError
        try:
            DiskTier({str(tmp_path)!r}, slot_bytes={SLOT}, capacity_bytes={SLOT * 64})
        except StorageIOError as e:
            print("refused:", e)
        """
        r = run_py(code)
        assert r.returncode == 0, r.stderr
        want = f"refused: disk tier directory {tmp_path} is in use by another kvbm process (pid {os.getpid()})"
        assert want in r.stdout
        r = subprocess.run(
            [sys.executable, "-m", "kvbm", "inspect", str(tmp_path), "--json"],
            capture_output=True, text=True, timeout=60, cwd=NEUTRAL_CWD,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["blocks"] == 3
        assert info["bytes"] == sum(len(content(k)) for k in (1, 2, 3))
        assert info["lock_holder_pid"] == os.getpid()
        assert t.put([4], [content(4)]) == [True]  # the writer is unaffected
    with tier(tmp_path) as t:  # released at close
        assert len(t) == 4


def test_namespace_and_length_mismatch_are_counted_misses(tmp_path: Path) -> None:
    with tier(tmp_path, namespace="model-a") as t:
        t.put([1, 2, 3], [content(k) for k in (1, 2, 3)])
    with tier(tmp_path, namespace="model-b") as t:
        assert not t.contains(1) and t.lookup([1, 2]) == 0
        out = np.empty(len(content(1)), np.uint8)
        assert t.get([1], [out]) == [False]
        assert t.stats()["namespace_mismatches"] == 1
        assert t.length_of(1) == -1  # dropped
    with tier(tmp_path, namespace="model-a") as t:
        out = np.empty(len(content(2)) + 1, np.uint8)
        assert t.get([2], [out]) == [False]
        assert t.stats()["length_mismatches"] == 1 and 2 not in t
        assert np.array_equal(load_one(t, 3), content(3))
        assert t.stats()["totals"]["namespace_mismatches"] == 1


def _add_bad_records(path: Path, s1: int) -> None:
    env = lmdb.open(str(path / "catalog"), max_dbs=4, subdir=True)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        rec = list(RECORD.unpack(txn.get(hash_key(2))))
        dup = rec.copy()
        dup[4], dup[7] = s1, rec[7] - 1  # claims key 1's slot, but older: must lose
        txn.put(hash_key(77), RECORD.pack(*dup))
        far = rec.copy()
        far[4] = 15  # slot never written
        txn.put(hash_key(78), RECORD.pack(*far))
        big = rec.copy()
        big[5] = SLOT + 1  # length above the slot size
        txn.put(hash_key(79), RECORD.pack(*big))
    env.close()


@pytest.mark.parametrize("preallocate", [False, True])
def test_open_drops_impossible_records(tmp_path: Path, preallocate: bool) -> None:
    with tier(tmp_path, slots=16, preallocate=preallocate) as t:
        t.put([1, 2, 3], [content(k) for k in (1, 2, 3)])
        s1, s2 = t.catalog.slot_of(hash_key(1)), t.catalog.slot_of(hash_key(2))
        assert t.store.prealloc_error == ""
    size = os.path.getsize(slab_path(str(tmp_path), 0))
    assert size == 16 * STRIDE if preallocate else 2 * STRIDE < size <= 3 * STRIDE
    _add_bad_records(tmp_path, s1)
    with tier(tmp_path, slots=16, preallocate=preallocate) as t:
        if preallocate:
            # the slab is full size, so the never-written slot passes the size check at open;
            # its record is caught on read (zeros fail the CRC): a counted miss, then dropped
            assert t.stats()["dropped_at_open"] == 2
            assert t.get([78], [np.empty(len(content(2)), np.uint8)]) == [False]
            assert t.stats()["checksum_failures"] == 1
        else:
            assert t.stats()["dropped_at_open"] == 3  # slab too short for slot 15
        assert sorted(int.from_bytes(k, "big") for k in t) == [1, 2, 3]
        assert t.catalog.slot_of(hash_key(2)) == s2
        for k in (1, 2, 3):
            assert np.array_equal(load_one(t, k), content(k))
    with tier(tmp_path, slots=2) as t:  # capacity shrank: records past the end are dropped
        assert len(t) == 2 and t.stats()["dropped_at_open"] == 1


# ---- corruption ------------------------------------------------------------------------------


def test_flipped_bytes_are_detected_counted_and_dropped(tmp_path: Path) -> None:
    keys = list(range(1, 33))
    with tier(tmp_path, slab_bytes=SLOT * 8) as t:
        t.put(keys, [content(k) for k in keys])
        slots = {k: t.catalog.slot_of(hash_key(k)) for k in keys}
        spp = t.catalog.geometry.slots_per_slab
    rng = np.random.default_rng(1234)
    victims = [int(k) for k in rng.choice(keys, 8, replace=False)]
    for k in victims:
        s = slots[k]
        pos = (s % spp) * STRIDE + RECORD_HEADER + int(rng.integers(0, len(content(k))))
        with open(slab_path(str(tmp_path), s // spp), "r+b") as f:
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ (1 << int(rng.integers(0, 8)))]))
    with tier(tmp_path, slab_bytes=SLOT * 8) as t:
        for k in keys:
            got = load_one(t, k)
            if k in victims:
                assert got is None
                assert k not in t
            else:
                assert np.array_equal(got, content(k))
        s = t.stats()
        assert s["checksum_failures"] == 8 and s["io"]["checksum_failures"] == 8
        assert s["misses"] == 8 and s["hits"] == 24
        assert t.put(victims, [content(k) for k in victims]) == [True] * 8  # the tier keeps working
        for k in victims:
            assert np.array_equal(load_one(t, k), content(k))


def test_corruption_while_open_is_detected(tmp_path: Path) -> None:
    with tier(tmp_path) as t:
        t.put([1, 2], [content(1), content(2)])
        s = t.catalog.slot_of(hash_key(1))
        with open(slab_path(str(tmp_path), 0), "r+b") as f:
            f.seek(s * STRIDE + RECORD_HEADER + 10)
            f.write(b"\xff\x00\xff\x00")
            f.flush()
            os.fsync(f.fileno())
        assert load_one(t, 1) is None
        assert t.stats()["checksum_failures"] == 1
        assert np.array_equal(load_one(t, 2), content(2))


def test_truncated_slab(tmp_path: Path) -> None:
    keys = list(range(1, 17))
    with tier(tmp_path, slab_bytes=SLOT * 8) as t:
        t.put(keys, [content(k) for k in keys])
        slot = {k: t.catalog.slot_of(hash_key(k)) for k in keys}
        # truncated while open: a short read on load
        os.truncate(slab_path(str(tmp_path), 1), 3 * STRIDE)
        lost_now = [k for k in keys if slot[k] >= 8 + 3]
        for k in lost_now:
            assert load_one(t, k) is None
        assert t.stats()["short_reads"] == len(lost_now)
    # truncated while closed: dropped at open
    os.truncate(slab_path(str(tmp_path), 0), 2 * STRIDE + 100)
    with tier(tmp_path, slab_bytes=SLOT * 8) as t:
        end = {k: slot[k] * STRIDE + RECORD_HEADER + len(content(k)) for k in keys}
        gone = [k for k in keys if slot[k] < 8 and end[k] > 2 * STRIDE + 100]
        assert len(gone) >= 5
        s = t.stats()
        assert s["dropped_at_open"] == len(gone)
        for k in keys:
            if k in lost_now or k in gone:
                assert k not in t
            else:
                assert np.array_equal(load_one(t, k), content(k))


def test_deleted_slab(tmp_path: Path) -> None:
    keys = list(range(1, 25))
    with tier(tmp_path, slab_bytes=SLOT * 8) as t:
        t.put(keys, [content(k) for k in keys])
        slot = {k: t.catalog.slot_of(hash_key(k)) for k in keys}
    os.unlink(slab_path(str(tmp_path), 1))
    with tier(tmp_path, slab_bytes=SLOT * 8) as t:
        in_slab1 = [k for k in keys if 8 <= slot[k] < 16]
        assert len(in_slab1) == 8
        assert t.stats()["dropped_at_open"] == 8
        for k in keys:
            if k in in_slab1:
                assert load_one(t, k) is None
            else:
                assert np.array_equal(load_one(t, k), content(k))
        # the tier keeps working and refills the recreated slab
        new = list(range(100, 140))
        assert t.put(new, [content(k) for k in new]) == [True] * 40
        for k in new:
            assert np.array_equal(load_one(t, k), content(k))


# ---- full disk -------------------------------------------------------------------------------

ENOSPC_SCRIPT = """
import json, resource, signal, sys
import numpy as np
from kvbm.tiers.disk import DiskTier
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of death past RLIMIT_FSIZE
limit = 4 << 20
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
slot = 65536
rng = np.random.default_rng(5)
blocks = {k: rng.integers(0, 256, slot, dtype=np.uint8) for k in range(200)}
out = {}
with DiskTier(sys.argv[1], slot_bytes=slot, capacity_bytes=slot * 128, slab_bytes=slot * 128,
              durability="batch") as t:
    out["first"] = [t.put([k], [blocks[k]])[0] for k in range(100)]
    out["more"] = t.put(list(range(100, 120)), [blocks[k] for k in range(100, 120)])
    buf = np.empty(slot, np.uint8)
    ok = []
    for k in range(100):
        if k in t:
            ok.append(bool(t.get([k], [buf])[0] and np.array_equal(buf, blocks[k])))
    out["reads_ok"] = ok
    t.remove([0, 1])
    out["after_remove"] = t.put([150, 151], [blocks[150], blocks[151]])
    buf2 = np.empty(slot, np.uint8)
    out["new_read"] = bool(t.get([150], [buf2])[0] and np.array_equal(buf2, blocks[150]))
    s = t.stats()
    out["stats"] = {k: s[k] for k in ("store_failures", "enospc", "io_errors", "blocks")}
print(json.dumps(out))
"""


def test_full_disk_rlimit_fsize(tmp_path: Path) -> None:
    r = run_py(ENOSPC_SCRIPT, str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    fit = (4 << 20) // (65536 + RECORD_HEADER)  # whole records (header + data) below 4 MiB
    assert out["first"] == [True] * fit + [False] * (100 - fit)  # slots past 4 MiB cannot be written
    assert out["more"] == [False] * 20
    assert out["reads_ok"] == [True] * fit
    assert out["after_remove"] == [True, True]  # freed slots below the limit are reused
    assert out["new_read"]
    st = out["stats"]
    n = 120 - fit
    assert st["store_failures"] == n and st["enospc"] == n and st["io_errors"] == n
    assert st["blocks"] == fit
    assert "not stored" in r.stderr  # the log line


def _mount_tmpfs(path: Path, size: str) -> str | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root to mount a size-limited tmpfs"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return None if r.returncode == 0 else f"mount tmpfs not permitted: {r.stderr.decode().strip()}"


def test_full_disk_tmpfs_enospc(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    reason = _mount_tmpfs(mnt, "3m")
    if reason:
        pytest.skip(reason)
    try:
        slot = 65536
        rng = np.random.default_rng(9)
        blocks = {k: rng.integers(0, 256, slot, dtype=np.uint8) for k in range(80)}
        with DiskTier(mnt, slot_bytes=slot, capacity_bytes=slot * 64, durability="batch") as t:
            res = [t.put([k], [blocks[k]])[0] for k in range(64)]
            assert True in res and False in res  # some fit, then ENOSPC
            stored = [k for k in range(64) if res[k]]
            s = t.stats()
            assert s["store_failures"] == res.count(False) and s["enospc"] >= 1
            assert t.put([70, 71], [blocks[70], blocks[71]]) == [False, False]  # keeps failing cleanly
            buf = np.empty(slot, np.uint8)
            for k in stored:
                assert t.get([k], [buf]) == [True] and np.array_equal(buf, blocks[k])
        with DiskTier(mnt, slot_bytes=slot, capacity_bytes=slot * 64) as t:  # reopens consistently
            assert sorted(int.from_bytes(k, "big") for k in t) == stored
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---- bad configuration -----------------------------------------------------------------------


def test_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        DiskTier(tmp_path / "missing", slot_bytes=SLOT, capacity_bytes=SLOT)
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(ConfigError, match="not a directory"):
        DiskTier(f, slot_bytes=SLOT, capacity_bytes=SLOT)
    with pytest.raises(ConfigError, match="less than one slot"):
        DiskTier(tmp_path, slot_bytes=SLOT, capacity_bytes=SLOT - 1)
    with pytest.raises(ConfigError, match="multiple of 4096"):
        DiskTier(tmp_path, slot_bytes=SLOT + 512, capacity_bytes=SLOT * 4)
    with pytest.raises(ConfigError, match="multiple of 4096"):
        DiskTier(tmp_path, slot_bytes=0, capacity_bytes=SLOT * 4)
    with pytest.raises(ConfigError, match="disk_durability"):
        DiskTier(tmp_path, slot_bytes=SLOT, capacity_bytes=SLOT, durability="sometimes")
    with pytest.raises(ConfigError, match="io_threads"):
        DiskTier(tmp_path, slot_bytes=SLOT, capacity_bytes=SLOT, io_threads=0)
    with pytest.raises(KvbmError, match="unknown"):
        DiskTier(tmp_path, slot_bytes=SLOT, capacity_bytes=SLOT, eviction="nope")
    with DiskTier(tmp_path, slot_bytes=SLOT, capacity_bytes=SLOT * 2) as t:
        t.put([1], [b"x"])
    with pytest.raises(ConfigError, match="created with slot size 16384"):
        DiskTier(tmp_path, slot_bytes=SLOT * 2, capacity_bytes=SLOT * 4)
    with DiskTier(tmp_path, slot_bytes=SLOT, capacity_bytes=SLOT * 2) as t:  # a failed open left no lock
        assert 1 in t
    # native store checks too
    with pytest.raises(ConfigError, match="multiple of 4096"):
        _native.DiskStore(str(tmp_path), 1000, 4)
    with pytest.raises(ConfigError, match="num_slots is 0"):
        _native.DiskStore(str(tmp_path), 4096, 0)


def test_unwritable_dir(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("running as root and cannot mount a read-only file system")
    else:
        d.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            DiskTier(d, slot_bytes=SLOT, capacity_bytes=SLOT * 4)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(d)], check=False)
        else:
            d.chmod(0o700)


def test_native_store_read_only_and_errors(tmp_path: Path) -> None:
    st = _native.DiskStore(str(tmp_path), 4096, 8, 4, 2)
    buf = np.arange(4096, dtype=np.uint8)
    with pytest.raises(KvbmError, match="needs the block hash"):  # records name themselves
        st.write([0], [buf], [], 1)
    h = st.write([0], [buf], [], 1, [b"block-0"])
    h.wait()
    codes, crcs, _errnos, _msgs = h.results()
    assert codes.tolist() == [0] and crcs[0] == _native.crc32c(buf)
    with pytest.raises(KvbmError, match="slot 8 >= num_slots 8"):
        st.write([8], [buf], keys=[b"k"])
    with pytest.raises(KvbmError, match="length"):
        st.write([0], [np.zeros(8192, np.uint8)], keys=[b"k"])
    st.close()
    with pytest.raises(KvbmError, match="closed"):
        st.write([0], [buf], keys=[b"k"])
    ro = _native.DiskStore(str(tmp_path), 4096, 8, 4, 2, True, True)
    out = np.empty(4096, np.uint8)
    h = ro.read([0], [out], [], [int(crcs[0])], True)
    h.wait()
    assert h.results()[0].tolist() == [0] and np.array_equal(out, buf)
    h = ro.read([0], [out], [], [int(crcs[0])], True, [b"block-0"])
    h.wait()
    assert h.results()[0].tolist() == [0] and np.array_equal(out, buf)
    h = ro.read([0], [out], [], [int(crcs[0])], True, [b"block-1"])  # the record names another block
    h.wait()
    codes, _, _, msgs = h.results()
    assert codes.tolist() == [_native.DISK_CODE_CHECKSUM] and "another block hash" in msgs[0]
    with pytest.raises(KvbmError, match="read-only"):
        ro.write([1], [buf], keys=[b"k"])
    ro.close()


def test_remove_while_read_in_flight(tmp_path: Path) -> None:
    with tier(tmp_path, slots=4) as t:
        t.put([1, 2], [content(1), content(2)])
        cat = t.catalog
        s1 = cat.slot_of(hash_key(1))
        cat.pin(s1)  # a read in flight
        assert t.remove([1]) == 1 and 1 not in t
        # the slot stays out of use until the read is done
        assert t.put([3, 4, 5], [content(k) for k in (3, 4, 5)]) == [True] * 3  # 2 free + evict block 2
        assert len(t) == 3 and s1 not in [cat.slot_of(hash_key(k)) for k in (3, 4, 5)]
        assert t.put([7], [content(7)]) == [True] and s1 not in [cat.slot_of(k) for k in t]
        cat.record_hit(s1)  # the finished read's bookkeeping must not touch the dropped slot
        cat.unpin(s1)
        assert t.put([6], [content(6)]) == [True]
        for k in t:
            ki = int.from_bytes(k, "big")
            assert np.array_equal(load_one(t, ki), content(ki))


def test_o_direct_refused_falls_back_with_a_warning(tmp_path: Path) -> None:
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount ramfs (a file system that refuses O_DIRECT)")
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"mount ramfs not permitted: {r.stderr.decode().strip()}")
    try:
        with pytest.warns(RuntimeWarning, match="refused O_DIRECT"):
            t = DiskTier(mnt, slot_bytes=SLOT, capacity_bytes=SLOT * 8)
        with t:
            assert not t.o_direct_active and "O_DIRECT" in t.store.fallback_reason
            keys = list(range(1, 9))
            assert t.put(keys, [content(k) for k in keys]) == [True] * 8
            for k in keys:
                assert np.array_equal(load_one(t, k), content(k))
        with DiskTier(mnt, slot_bytes=SLOT, capacity_bytes=SLOT * 8, o_direct=False) as t:  # reopens
            assert len(t) == 8 and np.array_equal(load_one(t, 5), content(5))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_inspect_text_verify_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvbm.cli import main

    with tier(tmp_path, namespace="m") as t:
        t.put(list(range(1, 11)), [content(k) for k in range(1, 11)])
        s3 = t.catalog.slot_of(hash_key(3))
    with open(slab_path(str(tmp_path), 0), "r+b") as f:
        f.seek(s3 * STRIDE + RECORD_HEADER + 1)
        f.write(b"\x55\xaa")
    assert main(["inspect", str(tmp_path), "--verify", "--list", "2"]) == 0
    out = capsys.readouterr().out
    assert "blocks         10" in out and "1 checksum failures" in out and "no running process" in out
    assert main(["inspect", str(tmp_path), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verify"] == {"checked": 10, "ok": 9, "bad": 1, "invalid_records": 0, "record_mismatches": 0,
                              "checksum_failures": 1, "short_or_missing": 0, "io_errors": 0}
    assert list(info["namespaces"].values()) == [10]
    with tier(tmp_path, namespace="m") as t:  # inspect changed nothing: the tier finds it on read
        assert len(t) == 10 and load_one(t, 3) is None and t.stats()["checksum_failures"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 2
    assert "holds no kvbm disk tier" in capsys.readouterr().err


def test_store_grows_on_demand_under_concurrent_writers(tmp_path: Path) -> None:
    """DiskStore(grow_bytes=...): nothing allocated at open; 4 submitting threads x 4 IO threads
    write 96 of 128 slots in random order (slab growth races with writes into the same slab): every
    slot reads back its own bytes, and the slabs occupy what was written plus less than one chunk
    each, never the full capacity."""
    import threading

    grow = 4 * STRIDE
    st = _native.DiskStore(str(tmp_path), SLOT, 128, 64, 4, False, False, False, grow_bytes=grow)
    assert sum(os.stat(slab_path(str(tmp_path), i)).st_blocks for i in (0, 1)) == 0
    rng = np.random.default_rng(5)
    slots = [int(s) for s in rng.permutation(96)]  # slots 0..95: slab 0 full, half of slab 1
    errors: list[str] = []

    def full(s: int) -> np.ndarray:  # the slot's oracle: its own bytes over the whole slot
        return np.resize(content(s), SLOT)

    def writer(part: list[int]) -> None:
        for i in range(0, len(part), 3):
            batch = part[i:i + 3]
            bufs = [full(s) for s in batch]
            try:
                h = st.write(batch, bufs, [SLOT] * len(batch), 0, [hash_key(s) for s in batch])
                h.wait()
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(repr(e))
                return
            codes, _, _, msgs = h.results()
            errors.extend(m for c, m in zip(codes.tolist(), msgs, strict=True) if c != 0)

    threads = [threading.Thread(target=writer, args=(slots[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    outs = [np.zeros(SLOT, np.uint8) for _ in range(96)]
    crcs = [int(_native.crc32c(full(s))) for s in range(96)]
    h = st.read(list(range(96)), outs, [SLOT] * 96, crcs, True, [hash_key(s) for s in range(96)])
    h.wait()
    assert h.results()[0].tolist() == [0] * 96
    for s in range(96):
        assert np.array_equal(outs[s], full(s)), s
    stats = st.stats()
    st.close()
    alloc = [os.stat(slab_path(str(tmp_path), i)).st_blocks * 512 for i in (0, 1)]
    assert alloc[0] >= 64 * STRIDE and 32 * STRIDE <= alloc[1] < 32 * STRIDE + grow + 4096, alloc
    assert 2 <= stats["grows"] <= 96 // 4 + 2, stats
