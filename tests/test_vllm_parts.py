"""Unit tests of the vLLM connector's parts that need no vLLM: config, scheduler index, disk catalog and slabs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from kvbm import _native
from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError, StorageIOError
from kvbm.integrations.vllm import disk
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.index import TierIndex


def test_config_maps_onto_kvbm_config() -> None:
    c = ConnectorConfig.from_extra_config({"host_capacity_bytes": "64MiB", "disk_path": "/tmp/x",
                                           "disk_capacity_bytes": "1GiB", "min_hit_blocks": 2})
    assert c.kvbm.host_capacity_bytes == 64 << 20 and c.kvbm.disk_capacity_bytes == 1 << 30
    assert c.disk_path == "/tmp/x" and c.min_hit_blocks == 2 and c.kvbm.disk_write_policy == "write_through"
    assert ConnectorConfig.from_extra_config(None).kvbm.host_capacity_bytes == 1 << 30
    assert ConnectorConfig.from_extra_config(None).async_load is True
    assert ConnectorConfig.from_extra_config({"async_load": False}).async_load is False
    c = ConnectorConfig.from_extra_config({"disk_write_policy": "write_behind", "disk_durability": "none",
                                           "disk_io_threads": 2, "disk_o_direct": False})
    k = c.kvbm
    assert (k.disk_write_policy, k.disk_durability, k.disk_io_threads, k.disk_o_direct) == (
        "write_behind", "none", 2, False)


@pytest.mark.parametrize("extra,needle", [
    ({"hots_bytes": 1}, "'hots_bytes'"),
    ({"block_size": 32}, "'block_size'"),
    ({"host_capacity_bytes": "lots"}, "host_capacity_bytes"),
    ({"disk_path": "/tmp/x"}, "disk_capacity_bytes"),
    ({"min_hit_blocks": 0}, "'min_hit_blocks'"),
    ({"store_decode_blocks": "yes"}, "'store_decode_blocks'"),
    ({"async_load": 1}, "'async_load'"),
    ({"disk_write_policy": "write_back"}, "disk_write_policy"),
    ({"disk_durability": "sometimes"}, "disk_durability"),
    ({"disk_io_threads": 0}, "disk_io_threads"),
    ({"hash_algorithm": "md5"}, "hash_algorithm"),
    ({"eviction_policy": "nope"}, "eviction_policy"),
])
def test_bad_config_names_the_key(extra: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ConnectorConfig.from_extra_config(extra)


def _h(i: int) -> bytes:
    return i.to_bytes(16, "little")


RANK_NS = [bytes([0xA0 + r]) * 16 for r in range(4)]


def _catalog(path, disk_blocks: int, ranks: int = 1):
    return disk.open_catalog(str(path), RANK_NS[:ranks], 1024, disk_blocks * disk.disk_block_bytes(1024, ranks), "none",
                             KvbmConfig().eviction_policy)


def _index(host_slots: int = 2, disk_blocks: int = 4, reporters: int = 1, path=None) -> TierIndex:
    cat = None
    if path is not None:
        cat = _catalog(path, disk_blocks, reporters)
        for ns in RANK_NS[:reporters]:  # the workers' slab files (preallocated), as a worker would open them
            _native.DiskStore(disk.rank_dir(str(path), ns), 4096, disk_blocks, disk.slots_per_slab(1024)).close()
    return TierIndex(KvbmConfig(host_capacity_bytes=host_slots * 1024), 1024, cat, reporters, 7)


def _report(ix: TierIndex, h: bytes, ok: bool = True, rank: int = 0, crc: int = 0x1234) -> None:
    if ok:
        ix.complete_disk(Counter({h: 1}), Counter(), {h: {rank: crc}})
    else:
        ix.complete_disk(Counter(), Counter({h: 1}), {})


def test_index_store_visible_only_after_every_rank_reports() -> None:
    ix = _index(reporters=2)
    assert ix.prepare_host(_h(1), None) is not None
    assert ix.lookup([_h(1)]) == []
    ix.complete_host(_h(1), 1, ok=True)
    assert ix.lookup([_h(1)]) == []  # one rank of two
    ix.complete_host(_h(1), 1, ok=True)
    assert ix.lookup([_h(1)]) == ["host"]


def test_index_failed_store_is_never_visible() -> None:
    ix = _index()
    ix.prepare_host(_h(1), None)
    ix.complete_host(_h(1), 1, ok=False)
    assert ix.lookup([_h(1)]) == [] and ix.has(_h(1)) == (False, False)


def test_index_host_block_pinned_while_written_to_disk(tmp_path) -> None:
    ix = _index(host_slots=1, path=tmp_path)
    assert ix.prepare_host(_h(1), None) == 0
    assert ix.reserve_disk([(_h(1), None)]) == [0]
    ix.pin_for_disk_write(_h(1))
    ix.complete_host(_h(1), 1, ok=True)
    assert ix.has(_h(1)) == (True, True)  # reserved on disk: not planned twice
    # The only host slot holds a block whose disk write is in flight: nothing is evictable.
    assert ix.prepare_host(_h(2), _h(1)) is None
    _report(ix, _h(1))
    assert ix.lookup([_h(1)]) == ["host"]
    assert ix.prepare_host(_h(2), _h(1)) == 0  # now h1 can be evicted from host ...
    assert ix.lookup([_h(1)]) == ["disk"]  # ... and is still on disk
    assert ix.removed.host == [_h(1)]
    assert ix.disk_load(_h(1)) == (0, (0x1234,))


def test_index_disk_evicts_first_and_restart_finds_blocks_in_the_catalog(tmp_path) -> None:
    ix = _index(disk_blocks=2, path=tmp_path)
    for i in (1, 2):
        assert ix.reserve_disk([(_h(i), None)]) == [i - 1]
        assert ix.lookup([_h(i)]) == []  # reserved, not written: invisible
        _report(ix, _h(i), crc=i)
    assert ix.lookup([_h(1), _h(2)]) == ["disk", "disk"]
    assert ix.reserve_disk([(_h(3), None)]) == [0]  # h1's slot, h1 evicted ...
    # ... and un-listed in the committed catalog before the slot was handed out (evict first).
    assert ix.lookup([_h(1)]) == [] and ix.removed.disk == [_h(1)]
    ro = disk.open_catalog  # a second writer is refused: the scheduler holds the lock
    with pytest.raises(StorageIOError, match="in use"):
        ro(str(tmp_path), RANK_NS[:1], 1024, 2 * disk.disk_block_bytes(1024, 1), "none", KvbmConfig().eviction_policy)
    r = subprocess.run([sys.executable, "-m", "kvbm", "inspect", "--json", str(tmp_path)], capture_output=True,
                       text=True, check=True)  # a connector's disk_path: its one catalog is found
    info = json.loads(r.stdout)
    assert info["dir"] == disk.rank_dir(str(tmp_path), RANK_NS[0]) and info["blocks"] == 1
    assert info["lock_holder_pid"] == os.getpid()  # h1 un-listed (committed), h3 not yet: 1 block
    ix.close()  # h3's write never reported: never listed
    again = _index(disk_blocks=2, path=tmp_path)  # a new scheduler: catalog reopened, no directory scan
    assert again.lookup([_h(2)]) == ["disk"] and again.lookup([_h(3)]) == []
    assert again.disk_load(_h(2)) == (1, (2,))
    again.drop(_h(2), "checksum_failures")
    assert again.lookup([_h(2)]) == [] and again.disk.totals["checksum_failures"] == 1
    again.close()
    assert _index(disk_blocks=2, path=tmp_path).lookup([_h(2)]) == []


def test_index_sharded_write_commits_only_when_every_rank_succeeded(tmp_path) -> None:
    ix = _index(disk_blocks=4, reporters=2, path=tmp_path)
    assert ix.reserve_disk([(_h(1), None), (_h(2), None)]) == [0, 1]
    _report(ix, _h(1), rank=0, crc=10)
    assert ix.lookup([_h(1)]) == []  # rank 1 has not reported
    _report(ix, _h(1), rank=1, crc=11)
    assert ix.lookup([_h(1)]) == ["disk"] and ix.disk_load(_h(1)) == (0, (10, 11))
    _report(ix, _h(2), rank=0, crc=20)
    _report(ix, _h(2), ok=False)  # rank 1 could not write its shard (e.g. ENOSPC)
    assert ix.lookup([_h(2)]) == [] and not ix.disk.is_reserved(_h(2)) and ix.stats.failed_stores == 1
    assert ix.reserve_disk([(_h(3), None)]) == [1]  # the slot is free again (after both reported)
    ix.close()
    again = _index(disk_blocks=4, reporters=2, path=tmp_path)
    assert again.disk_load(_h(1)) == (0, (10, 11)) and again.lookup([_h(2)]) == []
    again.close()
    with pytest.raises(ConfigError, match="shard"):  # the same directory with another TP degree
        _catalog(tmp_path, 4, ranks=3).close()


def test_catalog_drops_blocks_whose_shard_slab_is_missing(tmp_path) -> None:
    ix = _index(disk_blocks=4, reporters=2, path=tmp_path)
    ix.reserve_disk([(_h(1), None)])
    for r in (0, 1):
        _report(ix, _h(1), rank=r, crc=r)
    ix.close()
    assert os.path.exists(os.path.join(disk.rank_dir(str(tmp_path), RANK_NS[1]), "slab-00000.kvbm"))
    os.unlink(os.path.join(disk.rank_dir(str(tmp_path), RANK_NS[1]), "slab-00000.kvbm"))
    again = _index(disk_blocks=4, reporters=2, path=tmp_path)
    assert again.lookup([_h(1)]) == [] and again.disk.counters["dropped_at_open"] == 1


def test_rank_disk_roundtrip_and_corruption(tmp_path) -> None:
    rd = disk.RankDisk(str(tmp_path), RANK_NS[0], 5000, 8, io_threads=2, o_direct=False, durability="batch",
                       verify=True)
    data = disk.aligned_rows(2, disk.disk_slot_bytes(5000))
    data[:] = np.random.default_rng(0).integers(0, 256, data.shape, dtype=np.uint8)
    rd.write([_h(1), _h(2)], [3, 7], [data[0, :5000], int(data.ctypes.data) + data.strides[0]])
    rd.wait_all()
    written, failed = rd.poll()
    assert failed == [] and set(written) == {_h(1), _h(2)}
    out = disk.aligned_rows(2, disk.disk_slot_bytes(5000))
    res = rd.read([3, 7], [written[_h(1)], written[_h(2)]], out)
    assert res.ok == [True, True]
    assert np.array_equal(out[:, :5000], data[:, :5000])
    res = rd.read([7], [written[_h(2)] ^ 1], out)  # the record header's CRC differs from the expected one
    assert res.ok == [False] and res.checksum_failed == [True] and "CRC differs" in res.messages[0]
    res = rd.read([3, 7], [written[_h(1)], written[_h(2)]], out, [_h(1), _h(3)])  # slot 7 holds h2, not h3
    assert res.ok == [True, False] and res.checksum_failed == [False, True]
    assert "another block hash" in res.messages[0]
    rd.verify = False  # verification off: the bytes come back
    assert rd.read([7], [0], out).ok == [True]
    rd.close()


def test_catalog_record_without_shard_crcs_is_dropped_at_open(tmp_path) -> None:
    import lmdb

    ix = _index(disk_blocks=4, reporters=2, path=tmp_path)
    ix.reserve_disk([(_h(1), None), (_h(2), None)])
    for h in (_h(1), _h(2)):
        for r in (0, 1):
            _report(ix, h, rank=r, crc=r)
    ix.close()
    env = lmdb.open(os.path.join(disk.rank_dir(str(tmp_path), RANK_NS[0]), "catalog"), max_dbs=4)
    with env.begin(write=True) as txn:  # as if the shard CRCs of h2 had never been written
        assert txn.delete(_h(2), db=env.open_db(b"shards", txn=txn))
    env.close()
    again = _index(disk_blocks=4, reporters=2, path=tmp_path)
    assert again.lookup([_h(1)]) == ["disk"] and again.lookup([_h(2)]) == []
    assert again.disk.counters["dropped_at_open"] == 1


def test_blocks_recomputed_after_a_failed_synchronous_load_are_stored_again() -> None:
    """A synchronous load fails for block 2 of a request whose step also computed blocks 4 and 5
    (the worker refuses to store those: they were computed over invalid KV). vLLM rewinds the
    request to block 2 and recomputes; the scheduler must plan the stores of blocks 2, 4 and 5 again
    (block 3 is still in the host tier)."""
    from types import SimpleNamespace as NS

    from kvbm.hashing import Namespace
    from kvbm.integrations.vllm.common import Geometry
    from kvbm.integrations.vllm.config import ConnectorConfig
    from kvbm.integrations.vllm.metadata import KvbmWorkerMetadata
    from kvbm.integrations.vllm.scheduler import KvbmScheduler

    bs, slot = 16, 4096
    cfg = ConnectorConfig.from_extra_config({"host_capacity_bytes": 64 * slot, "async_load": False})
    geo = Geometry(block_size=bs, slot_bytes=slot, num_host_slots=64, disk_capacity_blocks=0, tp_world=1,
                   namespace=Namespace(model_id="t", dtype="bfloat16", kv_layout="x", block_size=bs))
    sched = KvbmScheduler(cfg, geo)

    def req(rid: str, toks: list[int]) -> NS:
        return NS(request_id=rid, all_token_ids=toks, num_tokens=len(toks), num_prompt_tokens=len(toks),
                  lora_request=None, cache_salt=None, mm_features=None, prompt_embeds=None)

    def out(new=(), cached=(), sched_tokens=None) -> NS:
        cr = NS(req_ids=[c[0] for c in cached], new_block_ids=[None for _ in cached], resumed_req_ids=set(),
                num_computed_tokens=[c[1] for c in cached])
        return NS(scheduled_new_reqs=[NS(req_id=r, block_ids=(ids,), num_computed_tokens=n) for r, ids, n in new],
                  scheduled_cached_reqs=cr, num_scheduled_tokens=sched_tokens or {})

    def stored(meta) -> KvbmWorkerMetadata:
        w = KvbmWorkerMetadata()
        for op in meta.stores:
            w.stored[op.block_hash] += 1
        return w

    toks = list(range(1000, 1000 + 6 * bs + 1))
    a = req("a", toks[:4 * bs])
    sched.get_num_new_matched_tokens(a, 0)
    m = sched.build_connector_meta(out(new=[("a", list(range(4)), 0)], sched_tokens={"a": 4 * bs}))
    assert len(m.stores) == 4
    sched.update_connector_output(stored(m))
    sched.request_finished(a)

    b = req("b", toks)  # 6 full blocks + 1 token; blocks 0-3 are in the host tier
    n, is_async = sched.get_num_new_matched_tokens(b, 0)
    assert (n, is_async) == (4 * bs, False)
    ids = list(range(10, 17))
    sched.update_state_after_alloc(b, NS(get_block_ids=lambda: (ids,)), n)
    m = sched.build_connector_meta(out(new=[("b", ids, 4 * bs)], sched_tokens={"b": 2 * bs + 1}))
    assert [op.block_id for op in m.loads] == [10, 11, 12, 13]
    assert [op.block_id for op in m.stores] == [14, 15]
    h = sched._reqs["b"].hashes
    # the worker: block 2's load failed; the request's stores of this step were refused
    w = KvbmWorkerMetadata()
    w.load_failed[h[2]] += 1
    for op in m.stores:
        w.store_failed[op.block_hash] += 1
    sched.update_connector_output(w)
    # vLLM rewinds "b" to block 2 and recomputes blocks 2..5 (and the last token)
    m = sched.build_connector_meta(out(cached=[("b", 2 * bs)], sched_tokens={"b": 4 * bs + 1}))
    assert [op.block_id for op in m.stores] == [12, 14, 15]
    assert [op.block_hash for op in m.stores] == [h[2], h[4], h[5]]


def test_scheduler_hashes_each_block_once_per_request_and_matches_kvbm_hashing(monkeypatch) -> None:
    """Note [Per-request hash cache]: a request asked about again, or grown by a few blocks,
    only hashes its new blocks; the rows equal kvbm.block_hashes of the whole token list (list,
    numpy and ConstantList-like inputs alike), and the cache goes when the request finishes."""
    from types import SimpleNamespace as NS

    from kvbm.hashing import Namespace, block_hashes
    from kvbm.integrations.vllm import scheduler as sm
    from kvbm.integrations.vllm.common import Geometry
    from kvbm.integrations.vllm.config import ConnectorConfig

    bs = 16
    ns = Namespace(model_id="t", dtype="bfloat16", kv_layout="x", block_size=bs)
    geo = Geometry(block_size=bs, slot_bytes=64, num_host_slots=64, disk_capacity_blocks=0, tp_world=1, namespace=ns)
    sched = sm.KvbmScheduler(ConnectorConfig.from_extra_config({"host_capacity_bytes": 64 * 64}), geo)
    hashed: list[int] = []
    real = sm._native.block_hashes

    def counting(*a, **k):
        out = real(*a, **k)
        hashed.append(len(out))
        return out

    monkeypatch.setattr(sm._native, "block_hashes", counting)

    class Constant:  # vLLM's ConstantList: a Sequence, not a list
        def __init__(self, x: list[int]) -> None:
            self._x = x

        def __getitem__(self, i):
            return self._x[i]

        def __len__(self) -> int:
            return len(self._x)

    toks = list(range(500, 500 + 40 * bs))
    for prompt in (toks[:20 * bs], np.array(toks[:20 * bs], np.int32), None):
        hashed.clear()
        all_toks = list(toks[:20 * bs])
        r = NS(request_id="r", prompt_token_ids=prompt, all_token_ids=Constant(all_toks), num_tokens=len(all_toks),
               num_prompt_tokens=20 * bs, lora_request=None, cache_salt=None, mm_features=None, prompt_embeds=None)
        assert sched.get_num_new_matched_tokens(r, 0) == (0, False)
        assert sched.get_num_new_matched_tokens(r, 0) == (0, False)
        assert hashed == [19]  # (num_tokens - 1) // bs blocks, once
        all_toks.extend(toks[20 * bs:30 * bs])  # the request grows (outputs past the prompt)
        r.num_tokens = len(all_toks)
        st = sched._reqs["r"]
        got = sched._hashes(st, 30)
        assert hashed == [19, 11]
        assert got == block_hashes(toks[:30 * bs], bs, ns)
        sched.request_finished(r)
        assert "r" not in sched._reqs


def test_start_up_line_names_the_namespaces_of_a_disk_path(tmp_path) -> None:
    """Issue 17: a changed model/block size/TP size starts another namespace under the same
    disk_path; the start-up line says which are present and which this engine uses."""
    import logging

    _catalog(tmp_path, 8, ranks=2).close()  # an engine with TP=2 (two rank namespaces)
    other = [bytes([0xB0]) * 16]
    # Collect on the logger itself: earlier tests in the same process may have set the kvbm
    # logger's level, handlers or propagation (the vLLM logging bridge), so neither caplog's root
    # handler nor the first _catalog call's silence can be relied on.
    got: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    lg = logging.getLogger("kvbm.vllm")
    h, old_level = _Collect(level=logging.INFO), lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        disk.open_catalog(str(tmp_path), other, 1024, 8 * disk.disk_block_bytes(1024, 1), "none",
                          KvbmConfig().eviction_policy).close()
    finally:
        lg.removeHandler(h)
        lg.setLevel(old_level)
    (line,) = [m for m in got if "namespace dir(s) present" in m]
    assert "3 namespace dir(s) present" in line
    assert f"{other[0].hex()[:12]} (" in line and "in use" in line
    for ns in RANK_NS[:2]:
        assert ns.hex()[:12] in line
    assert "2 other namespace(s)" in line
    assert disk.describe_namespaces(str(tmp_path / "nothing-here"), other).count("none") == 1
