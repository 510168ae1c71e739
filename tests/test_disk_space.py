"""One disk capacity per disk_path, shared by its namespaces; slabs grow on demand (issue 17).

Real slab files and LMDB catalogs in a temporary directory; sizes are what the file system reports
as allocated (st_blocks), not apparent sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvbm import _native
from kvbm.cli.inspect import inspect_dir
from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError
from kvbm.integrations.vllm import disk
from kvbm.tiers.disk_space import SPACE_FILE, allocated_bytes, punch_holes

SLOT = 64 << 10  # a block's bytes on one rank
BLOCK = disk.disk_block_bytes(SLOT, 1)  # on disk: record header + data


def _holes_supported(path) -> bool:
    p = os.path.join(path, "probe")
    with open(p, "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
    ok = punch_holes(p, [(0, 1 << 20)]) and os.stat(p).st_blocks * 512 < (1 << 20)
    os.unlink(p)
    return ok


def _ns(tag: int) -> list[bytes]:
    return [bytes([tag]) * 16]


class Engine:
    """One engine's disk tier as the connector drives it: the scheduler's catalog (with its share of
    the disk_path) and rank 0's slab files, storing blocks whose bytes name their hash."""

    def __init__(self, path, ns: list[bytes], capacity: int) -> None:
        self.path, self.ns = str(path), ns
        self.cat = disk.open_catalog(self.path, ns, SLOT, capacity, "none", KvbmConfig().eviction_policy)
        self.rank = disk.RankDisk(self.path, ns[0], SLOT, self.cat.geometry.num_slots, io_threads=2,
                                  o_direct=False, durability="none", verify=True)

    @staticmethod
    def content(key: bytes) -> np.ndarray:
        return np.frombuffer(key * (SLOT // len(key)), np.uint8).copy()

    def store(self, keys: list[bytes]) -> list[bytes]:
        evicted: list[bytes] = []
        slots = self.cat.reserve(keys, evicted)
        go = [(k, s) for k, s in zip(keys, slots) if s >= 0]
        bufs = [self.content(k) for k, _ in go]
        self.rank.write([k for k, _ in go], [s for _, s in go], bufs, keep=bufs)
        crcs, failed = self.rank.poll(wait=True)
        assert not failed
        self.cat.commit([k for k, _ in go], [s for _, s in go], [SLOT] * len(go), [crcs[k] for k, _ in go],
                        [True] * len(go), 7)
        return evicted

    def check_all(self) -> int:
        """Every listed block reads back byte-exact; returns how many."""
        keys = self.cat.keys()
        if not keys:
            return 0
        rows = disk.aligned_rows(len(keys), SLOT)
        slots = [self.cat.slot_of(k) for k in keys]
        res = self.rank.read(slots, [self.cat.record(s)["crc"] for s in slots], rows, keys)
        assert all(res.ok), res.messages
        for i, k in enumerate(keys):
            assert np.array_equal(rows[i], self.content(k))
        return len(keys)

    def close(self) -> None:
        self.rank.close()
        self.cat.close()


def _keys(tag: int, n: int) -> list[bytes]:
    return [bytes([tag]) + i.to_bytes(31, "little") for i in range(n)]


def _on_disk(path) -> int:
    """What the slab files of every namespace under ``path`` occupy (what the capacity bounds)."""
    return sum(allocated_bytes(os.path.join(path, n)) for n, _ in disk.namespaces_present(str(path)))


def test_slabs_grow_on_demand(tmp_path) -> None:
    """1 GiB of capacity, 20 blocks stored: the files hold about 20 blocks, not 1 GiB."""
    e = Engine(tmp_path, _ns(0xA0), 1 << 30)
    e.store(_keys(1, 20))
    used = _on_disk(tmp_path)
    assert 20 * BLOCK <= used <= 20 * BLOCK + disk.grow_bytes_for(e.cat.geometry.num_slots, SLOT), used
    # the start-up line's figure (whole directories, catalog included) stays far below the capacity
    assert sum(b for _, b in disk.namespaces_present(str(tmp_path))) < 64 << 20
    assert e.rank.store.stats()["grows"] >= 1
    assert e.check_all() == 20
    e.close()


def test_a_second_namespace_takes_the_first_ones_coldest_blocks(tmp_path) -> None:
    """Namespace A fills the disk_path and stops; B (another block size / model) needs the space:
    A's coldest blocks are evicted and their space given back, the total stays within the one
    capacity, every block either tier still lists reads back exact, and A keeps its hottest blocks."""
    if not _holes_supported(tmp_path):
        pytest.skip("the file system of the test directory cannot punch holes")
    cap = 64 * BLOCK
    a = Engine(tmp_path, _ns(0xA0), cap)
    a_keys = _keys(1, 64)
    a.store(a_keys)
    hot = a_keys[48:]  # A's hot blocks: hit after all were stored
    for k in hot:
        a.cat.record_hit(a.cat.slot_of(k))
    grow = disk.grow_bytes_for(64, SLOT)  # what a rank may hold allocated beyond its blocks
    assert len(a.cat) == 64 and _on_disk(tmp_path) <= cap + grow
    a.close()

    b = Engine(tmp_path, _ns(0xB0), cap)
    b_keys = _keys(2, 40)
    b.store(b_keys)
    assert len(b.cat) == 40, "B could not get the space of the idle namespace"
    # A's slab file keeps its size until the allocation is cut; what counts is the allocation.
    a_dir = disk.rank_dir(str(tmp_path), _ns(0xA0)[0])
    total = _on_disk(tmp_path)  # the slab files of both namespaces
    assert total <= cap + 2 * grow, (total, cap)
    assert b.check_all() == 40
    b.close()

    # What A still lists verifies; it gave back the space of 40 blocks and at most a few more (punched
    # holes split the file's extents, whose tree blocks count as allocated too); its hot blocks stayed.
    info = inspect_dir(a_dir, verify=True)
    assert info["verify"]["checked"] == info["verify"]["ok"] == info["blocks"], info
    assert 64 - 40 - 4 <= info["blocks"] <= 64 - 40, info["blocks"]
    a = Engine(tmp_path, _ns(0xA0), cap)
    kept = set(a.cat.keys())
    assert set(hot) <= kept, "A's hottest blocks were evicted before its coldest"
    assert a.check_all() == info["blocks"]
    a.close()
    led = json.loads((tmp_path / SPACE_FILE).read_text())
    assert set(led["tiers"]) == {_ns(0xA0)[0].hex(), _ns(0xB0)[0].hex()}


def test_live_engines_share_the_capacity_and_evict_only_their_own(tmp_path) -> None:
    """Two engines of different namespaces running at once on one disk_path: neither takes the
    other's blocks; together they stay within the capacity; each evicts its own when full."""
    cap = 48 * BLOCK
    a = Engine(tmp_path, _ns(0xA0), cap)
    b = Engine(tmp_path, _ns(0xB0), cap)
    a.store(_keys(1, 30))
    b.store(_keys(2, 30))  # only what A has not been granted is left for B
    assert len(a.cat) == 30
    assert 0 < len(b.cat) < 30
    evicted = b.store(_keys(3, 10))
    assert evicted, "B, out of space, should have evicted its own blocks"
    assert all(k[:1] == b"\x02" for k in evicted)
    assert len(a.cat) == 30 and a.check_all() == 30
    assert a.cat.limit * BLOCK + b.cat.limit * BLOCK <= cap
    assert _on_disk(tmp_path) <= cap + 2 * disk.grow_bytes_for(48, SLOT)
    b.check_all()
    a.close()
    b.close()


def test_an_engine_in_another_process_is_never_reclaimed(tmp_path) -> None:
    """The catalog lock decides 'idle': a namespace held by a live process keeps every block."""
    cap = 32 * BLOCK
    code = f"""
import sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_disk_space import Engine, _keys, _ns
e = Engine({str(tmp_path)!r}, _ns(0xA0), {cap})
e.store(_keys(1, 32))
print(len(e.cat), flush=True)
sys.stdin.readline()
print(e.check_all(), flush=True)
e.close()
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = int(p.stdout.readline())
        assert held == 32
        b = Engine(tmp_path, _ns(0xB0), cap)
        b.store(_keys(2, 8))
        assert len(b.cat) == 0, "B got space that a live engine holds"
        b.close()
        out, _ = p.communicate("go\n", timeout=60)
        assert int(out) == held, "the live engine lost blocks"
    finally:
        if p.poll() is None:
            p.kill()


def test_an_old_preallocated_directory_is_cut_back_at_open(tmp_path) -> None:
    """A directory an older kvbm preallocated in full occupies only its blocks after reopening."""
    ns = _ns(0xA0)
    e = Engine(tmp_path, ns, 1 << 28)
    e.store(_keys(1, 4))
    e.close()
    d = disk.rank_dir(str(tmp_path), ns[0])
    # what an older kvbm left: the slab fallocated to its full size
    _native.DiskStore(d, disk.disk_slot_bytes(SLOT), (1 << 28) // BLOCK, disk.slots_per_slab(SLOT), 1, False).close()
    assert allocated_bytes(d) >= (1 << 28) - BLOCK
    e = Engine(tmp_path, ns, 1 << 28)
    assert allocated_bytes(d) < 4 * BLOCK + (1 << 20)
    assert e.check_all() == 4
    e.close()


@pytest.mark.parametrize("ledger", [b"\xff{not json", b'{"tiers": 7}', b'{"tiers": {"x": {"dirs": 5}}}',
                                    b'{"tiers": {"a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0": {"granted_bytes": "lots"}}}'])
def test_a_damaged_ledger_is_rebuilt(tmp_path, ledger: bytes) -> None:
    e = Engine(tmp_path, _ns(0xA0), 32 * BLOCK)
    e.close()
    (tmp_path / SPACE_FILE).write_bytes(ledger)
    other = Engine(tmp_path, _ns(0xB0), 32 * BLOCK)  # counts the others from a damaged ledger
    other.close()
    e = Engine(tmp_path, _ns(0xA0), 32 * BLOCK)
    e.store(_keys(1, 16))
    assert len(e.cat) == 16
    e.close()
    assert json.loads((tmp_path / SPACE_FILE).read_text())["tiers"]


def test_an_unusable_ledger_keeps_the_engine_to_its_share(tmp_path, caplog) -> None:
    """space.lock cannot be opened any more (here: replaced by a directory) while the engine runs:
    stores beyond its share evict its own blocks, logged, never an exception; at open it is a
    ConfigError naming the file."""
    e = Engine(tmp_path, _ns(0xA0), 64 * BLOCK)
    share = e.cat.limit
    os.unlink(tmp_path / "space.lock")
    os.mkdir(tmp_path / "space.lock")
    e.store(_keys(1, share))
    e.store(_keys(2, 8))  # past the share: no grant, its own oldest blocks go
    assert len(e.cat) == share and e.cat.limit == share
    assert "cannot ask for more disk space" in caplog.text
    assert e.check_all() == share
    e.close()
    with pytest.raises(ConfigError, match="space.lock"):
        Engine(tmp_path, _ns(0xA0), 64 * BLOCK)
