"""Issue 12, findings 5-8: slab records name their block; a damaged catalog is moved aside and rebuilt
from the slab record headers; a self-parent store and a doubled get leave the tier working.

(The broad damage campaign over many kinds of damage: test_disk_damage.py.)"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest

from kvbm import BlockManager, KvbmConfig
from kvbm.cli.inspect import inspect_dir
from kvbm.errors import InvalidArgumentError, KvbmError, StorageIOError
from kvbm.tiers.disk import CATALOG_SUBDIR, DiskTier, hash_key

SLOT = 8192
NEUTRAL_CWD = "/"


def tier(path: Path, slots: int = 16, **kw) -> DiskTier:
    kw.setdefault("durability", "none")
    return DiskTier(path, slot_bytes=SLOT, capacity_bytes=SLOT * slots, **kw)


def content(key: int) -> np.ndarray:
    return np.random.default_rng(key).integers(0, 256, SLOT, dtype=np.uint8)


def load(t: DiskTier, key: int | bytes) -> np.ndarray | None:
    out = np.empty(SLOT, np.uint8)
    return out if t.get([key], [out])[0] else None


def run_py(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120, cwd=NEUTRAL_CWD)


def mdb(path: Path) -> Path:
    return path / CATALOG_SUBDIR / "data.mdb"


# ---- finding 5: a flipped bit in a catalog key ------------------------------------------------------


def test_flipped_catalog_key_is_a_miss_and_inspect_reports_it(tmp_path: Path) -> None:
    keys = [2 * i for i in range(1, 9)]  # even: the flipped low bit makes a key nobody stored
    with tier(tmp_path) as t:
        assert t.put(keys, [content(k) for k in keys]) == [True] * 8
    raw = bytearray(mdb(tmp_path).read_bytes())
    victim = hash_key(6)
    at = raw.find(victim)
    assert at > 0 and raw.find(victim, at + 1) < 0
    raw[at + 15] ^= 1  # key 6 now reads as key 7, still in B-tree order (between 6 and 8)
    mdb(tmp_path).write_bytes(bytes(raw))

    info = inspect_dir(str(tmp_path), verify=True)
    assert info["blocks"] == 8
    assert info["verify"]["checked"] == 8 and info["verify"]["ok"] == 7 and info["verify"]["bad"] == 1
    assert info["verify"]["record_mismatches"] == 1

    with tier(tmp_path) as t:
        assert 7 in t  # the catalog believes it...
        assert load(t, 7) is None  # ...but the slab record names block 6: a miss, never block 6's bytes
        assert 7 not in t and t.stats()["io"]["record_mismatches"] == 1
        for k in keys:
            if k != 6:
                assert np.array_equal(load(t, k), content(k))


def test_record_of_another_namespace_is_a_miss(tmp_path: Path) -> None:
    with tier(tmp_path, namespace=b"A" * 16) as t:
        t.put([1], [content(1)])
    # Same catalog, but the slab records are re-stamped by a tier of another namespace.
    (tmp_path / "other").mkdir()
    with tier(tmp_path / "other", namespace=b"B" * 16) as t:
        t.put([1], [content(1)])
    os.replace(tmp_path / "other" / "slab-00000.kvbm", tmp_path / "slab-00000.kvbm")
    with tier(tmp_path, namespace=b"A" * 16) as t:
        assert 1 in t and load(t, 1) is None and t.stats()["io"]["record_mismatches"] == 1


# ---- finding 6: damaged catalogs ---------------------------------------------------------------------

OPEN_AND_READ = """
import json, logging, sys
import numpy as np
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
from kvbm.tiers.disk import DiskTier
keys = [int(k) for k in sys.argv[2].split(",")]
with DiskTier(sys.argv[1], slot_bytes=8192, capacity_bytes=8192 * 16, durability="none") as t:
    got = {}
    for k in keys:
        out = np.empty(8192, np.uint8)
        ok = t.get([k], [out])[0]
        got[k] = bool(ok and np.array_equal(out, np.random.default_rng(k).integers(0, 256, 8192, dtype=np.uint8)))
    ok_new = t.put([999], [np.zeros(8192, np.uint8)]) == [True]
    print(json.dumps({"got": got, "blocks": len(t), "rebuilds": t.stats()["totals"]["catalog_rebuilds"],
                      "new": ok_new}))
"""


@pytest.mark.parametrize("cut", ["half", "last_page", "meta_only"])
def test_truncated_catalog_is_moved_aside_and_rebuilt_without_sigbus(tmp_path: Path, cut: str) -> None:
    keys = list(range(1, 11))
    with tier(tmp_path) as t:
        assert t.put(keys, [content(k) for k in keys]) == [True] * 10
    size = mdb(tmp_path).stat().st_size
    os.truncate(mdb(tmp_path), {"half": size // 2, "last_page": size - 4096, "meta_only": 8192}[cut])

    r = run_py("import sys; from kvbm.cli import main; sys.exit(main(sys.argv[1:]))", "inspect", str(tmp_path))
    assert r.returncode == 2, (r.returncode, r.stderr)  # an error message, not a signal or a traceback
    assert "damaged" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(StorageIOError, match="damaged"):
        inspect_dir(str(tmp_path))

    r = run_py(OPEN_AND_READ, str(tmp_path), ",".join(map(str, keys)))
    assert r.returncode == 0, (r.returncode, r.stderr)  # a SIGBUS would be -7
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["got"] == {str(k): True for k in keys}  # every block recovered from its slab record, verified
    assert out["blocks"] == 11 and out["rebuilds"] == 1 and out["new"]
    moved = [n for n in os.listdir(tmp_path) if n.startswith(CATALOG_SUBDIR + ".damaged-")]
    assert len(moved) == 1
    lines = [ln for ln in r.stderr.splitlines() if "moved aside" in ln]
    assert len(lines) == 1 and str(tmp_path / moved[0]) in lines[0]
    assert inspect_dir(str(tmp_path), verify=True)["verify"]["ok"] == 11  # the rebuilt catalog is sound


def test_malformed_record_is_dropped_and_the_manager_starts(tmp_path: Path) -> None:
    bb = SLOT
    cfg = KvbmConfig(block_bytes=bb, host_capacity_bytes=bb * 8, host_pinned=False, disk_path=str(tmp_path),
                     disk_capacity_bytes=bb * 16, disk_durability="none", disk_write_policy="write_through")
    hs = [hash_key(i) for i in range(1, 7)]
    data = np.stack([content(i) for i in range(1, 7)])
    with BlockManager(cfg) as m:
        assert m.store(hs, data) == 6
    env = lmdb.open(str(tmp_path / CATALOG_SUBDIR), max_dbs=4, subdir=True)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        txn.put(hs[2], txn.get(hs[2])[:55])  # a 55-byte record
    env.close()
    with BlockManager(cfg) as m:  # main: ValueError: buffer size must be a multiple of element size
        assert m.disk.stats()["dropped_at_open"] == 1
        assert m.lookup(hs).num_hits == 2  # the chain breaks at the dropped block
        out = np.empty((1, bb), np.uint8)
        for i in (0, 1, 3, 4, 5):
            m.load(hs[i : i + 1], out)
            assert np.array_equal(out[0], data[i])


def test_old_format_directory_reads_as_misses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A directory written by the previous format (no record headers): the catalog is moved aside, nothing
    of it is served, the tier works."""
    with tier(tmp_path) as t:
        t.put([1, 2], [content(1), content(2)])
    env = lmdb.open(str(tmp_path / CATALOG_SUBDIR), max_dbs=4, subdir=True)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format", b"kvbm-disk/1")
    env.close()
    with open(tmp_path / "slab-00000.kvbm", "r+b") as f:  # and header-less slabs: data at slot * slot_bytes
        f.write(np.concatenate([content(1), content(2)]).tobytes())
    with caplog.at_level(logging.WARNING, logger="kvbm.disk"), tier(tmp_path) as t:
        assert len(t) == 0 and load(t, 1) is None and load(t, 2) is None
        assert t.put([3], [content(3)]) == [True] and np.array_equal(load(t, 3), content(3))
    assert any("moved aside" in r.getMessage() and "kvbm-disk/1" in r.getMessage() for r in caplog.records)


# ---- finding 7: a block that is its own parent ----------------------------------------------------------


def test_self_parent_raises_and_does_not_wedge_the_tier(tmp_path: Path) -> None:
    with tier(tmp_path) as t:
        with pytest.raises(InvalidArgumentError, match="own parent"):
            t.put([1], [content(1)], parents=[1])
        assert 1 not in t
        assert t.put([2, 3], [content(2), content(3)], parents=[None, 2]) == [True, True]
        assert t.lookup([2, 3]) == 2 and np.array_equal(load(t, 3), content(3))
    with tier(tmp_path) as t:  # closed cleanly, reopens
        assert len(t) == 2


@pytest.mark.parametrize("policy", ["write_through", "write_behind"])
def test_manager_self_parent_store_raises_and_the_manager_keeps_working(tmp_path: Path, policy: str) -> None:
    cfg = KvbmConfig(block_bytes=SLOT, host_capacity_bytes=SLOT * 2, host_pinned=False, disk_path=str(tmp_path),
                     disk_capacity_bytes=SLOT * 16, disk_durability="none", disk_write_policy=policy)
    hs = [hash_key(i) for i in range(1, 6)]
    data = np.stack([content(i) for i in range(1, 6)])
    m = BlockManager(cfg)
    with pytest.raises(KvbmError, match="own parent"):
        m.store(hs[:1], data[:1], parent=hs[0])
    for i in range(5):  # more than the host holds: evictions demote to disk
        m.store(hs[i : i + 1], data[i : i + 1], parent=hs[i - 1] if i else None)
    m.evict(2)
    m.disk.flush()  # write-behind demotions are asynchronous
    assert m.lookup(hs).num_hits == 5
    out = np.empty((5, SLOT), np.uint8)
    m.load(hs, out)
    assert np.array_equal(out, data)
    m.close()  # main: raises InvalidArgumentError "parent id 0 is invalid" (the commit stayed in flight)


# ---- finding 8: the same key twice with different buffer sizes ----------------------------------------


def test_get_same_key_twice_with_different_sizes_pins_nothing(tmp_path: Path) -> None:
    with tier(tmp_path, slots=4) as t:
        assert t.put([1, 2, 3, 4], [content(k) for k in (1, 2, 3, 4)]) == [True] * 4
        good, short = np.empty(SLOT, np.uint8), np.empty(SLOT - 1, np.uint8)
        assert t.get([4, 4], [good, short]) == [False, False]  # a wrong size drops the block: both miss
        assert t.get([3, 3], [short, good]) == [False, False]
        assert int(np.count_nonzero(t.catalog._pins)) == 0
        # Every slot can be reused: a pinned one could not be evicted.
        assert t.put([5, 6, 7, 8], [content(k) for k in (5, 6, 7, 8)]) == [True] * 4
        for k in (5, 6, 7, 8):
            assert np.array_equal(load(t, k), content(k))


def test_a_bad_argument_at_open_is_not_taken_for_damage(tmp_path: Path) -> None:
    """An InvalidArgumentError (also a ValueError) raised while an intact catalog opens propagates: the
    catalog is not moved aside."""
    with tier(tmp_path) as t:
        t.put([1], [content(1)])
    with pytest.raises(InvalidArgumentError, match="eviction policy"):
        tier(tmp_path, eviction="no-such-policy")
    assert not [n for n in os.listdir(tmp_path) if ".damaged-" in n]
    with tier(tmp_path) as t:
        assert t.stats()["totals"]["catalog_rebuilds"] == 0 and np.array_equal(load(t, 1), content(1))
