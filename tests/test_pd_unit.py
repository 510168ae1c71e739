"""Prefill/decode pieces without vLLM: config, params validation, prefix matching, leases over a real
kvbm index, and producer/consumer ranks pulling and verifying blocks over real UCX (loopback)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from kvbm import KvbmConfig
from kvbm.errors import ConfigError
from kvbm.hashing import Namespace, block_hashes
from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.index import TierIndex
from kvbm.integrations.vllm.pd import (
    PARAMS_KEY,
    ParamsError,
    PdClient,
    PdConfig,
    PdScheduler,
    PdServer,
    RankAddr,
    make_params,
    match_prefix,
    parse_params,
)
from kvbm.transfer import ucx_available

NS = Namespace(model_id="m", dtype="bf16", kv_layout="x", block_size=4, tp_rank=0, tp_size=1)
SLOT = 256


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("role,extra,key", [
    ("kv_both", {"pd_port": 7000}, "pd_port"),  # P/D keys while P/D is off
    ("kv_producer", {"pd_port": 70000}, "pd_port"),
    ("kv_producer", {"pd_port": "7000"}, "pd_port"),
    ("kv_consumer", {"pd_timeout_s": 0}, "pd_timeout_s"),
    ("kv_producer", {"pd_lease_s": -1}, "pd_lease_s"),
    ("kv_producer", {"pd_host": "0.0.0.0"}, "pd_host"),
    ("kv_producer", {"pd_host": ""}, "pd_host"),
    ("kv_producer", {"pd": "yes"}, "pd"),
    ("kv_consumer", {"pd_prot": 1}, "pd_prot"),  # typo: unknown key
])
def test_bad_pd_config_names_the_key(role: str, extra: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=repr(key)):
        ConnectorConfig.from_extra_config(extra, role)


def test_pd_roles() -> None:
    assert ConnectorConfig.from_extra_config({}, "kv_both").pd is None
    assert ConnectorConfig.from_extra_config({}, None).pd is None
    p = ConnectorConfig.from_extra_config({"pd_port": 7000}, "kv_producer").pd
    assert (p.produce, p.consume, p.port) == (True, False, 7000)
    c = ConnectorConfig.from_extra_config({}, "kv_consumer").pd
    assert (c.produce, c.consume) == (False, True)
    b = ConnectorConfig.from_extra_config({"pd": True}, "kv_both").pd
    assert (b.produce, b.consume) == (True, True)
    assert ConnectorConfig.from_extra_config({"pd": False}, "kv_producer").pd is None


# ------------------------------------------------------------------------------------ params
def _params(n: int = 3, **kw: object) -> dict:
    hashes = block_hashes(list(range(4 * n)), 4, NS)
    ranks = [RankAddr("127.0.0.1", 5555, 1 << 20, 2 << 20, 16, SLOT)]
    p = make_params("lease1", NS.digest, 4, ranks, hashes, list(range(n)), 4 * n)
    p[PARAMS_KEY].update(kw)
    return p


def test_params_roundtrip_and_validation() -> None:
    offer = parse_params(_params(), NS.digest, 4, 1, SLOT)
    assert offer is not None and len(offer.hashes) == 3 and offer.slots == [0, 1, 2]
    assert offer.source.lease == "lease1" and offer.source.ranks[0].port == 5555
    assert parse_params(None, NS.digest, 4, 1, SLOT) is None
    assert parse_params({"do_remote_decode": True}, NS.digest, 4, 1, SLOT) is None
    assert parse_params({"do_remote_prefill": True}, NS.digest, 4, 1, SLOT) is None  # someone else's params
    bad = [
        (_params(ns="11" * 16), "namespace"),
        (_params(v=99), "version"),
        (_params(block_size=8), "block size"),
        (_params(slots=[0, 1]), "slots"),
        (_params(slots=[0, 1, 99]), "outside"),
        (_params(hashes="!!"), "malformed"),
        (_params(ranks=[]), "ranks"),
    ]
    for p, why in bad:
        with pytest.raises(ParamsError, match=why):
            parse_params(p, NS.digest, 4, 1, SLOT)
    with pytest.raises(ParamsError, match="bytes per rank"):
        parse_params(_params(), NS.digest, 4, 1, SLOT * 2)
    with pytest.raises(ParamsError, match="ranks"):
        parse_params(_params(), NS.digest, 4, 2, SLOT)


def test_match_prefix() -> None:
    a = block_hashes(list(range(40)), 4, NS)
    b = block_hashes(list(range(20)) + [7] * 20, 4, NS)
    assert match_prefix(a, a) == 10
    assert match_prefix(a, b) == 5
    assert match_prefix(a, a[:3]) == 3
    other = Namespace(model_id="other", dtype="bf16", kv_layout="x", block_size=4, tp_rank=0, tp_size=1)
    assert match_prefix(a, block_hashes(list(range(40)), 4, other)) == 0


class _Req:
    def __init__(self, rid: str, params: dict | None) -> None:
        self.request_id = rid
        self.kv_transfer_params = params


def test_consumer_match_extends_local_hit() -> None:
    hashes = block_hashes(list(range(4 * 6)), 4, NS)
    idx = TierIndex(KvbmConfig(host_capacity_bytes=8 * SLOT), SLOT, None, 1)
    ps = PdScheduler(PdConfig(consume=True), idx, NS.digest, 4, 1, SLOT)
    ranks = [RankAddr("127.0.0.1", 5555, 1 << 20, 2 << 20, 16, SLOT)]
    params = make_params("L", NS.digest, 4, ranks, hashes[:5], [9 % 16, 3, 4, 5, 6], 20)
    # vLLM's local hit is 1 block, kvbm host has block 1: blocks 2..4 come from the producer.
    tiers = ps.match(_Req("r", params), hashes[:5], 1, ["host"])
    assert tiers == ["host", "remote", "remote", "remote"]
    src, slot = ps.remote_source("r", 3)
    assert slot == 5 and src.lease == "L"
    # Local hit already covers the offer: nothing remote, and the offer is handed back (once) for release.
    assert ps.match(_Req("r2", params), hashes[:5], 0, ["host"] * 5) == ["host"] * 5
    assert ps.match(_Req("r2", params), hashes[:5], 0, ["host"] * 5) == ["host"] * 5
    assert [s.lease for s in ps.take_unused()] == ["L"] and ps.take_unused() == []
    # Prompt differs after block 2: only blocks up to there.
    other = block_hashes(list(range(8)) + [1] * 16, 4, NS)
    assert ps.match(_Req("r3", params), other[:5], 0, []) == ["remote", "remote"]
    # A request whose remote load was planned is never claimed remote again (after a failed
    # pull vLLM recomputes instead of retrying forever); a new request is.
    ps.match(_Req("r4", params), hashes[:5], 0, [])
    ps.loaded("r4", 5)
    assert ps.match(_Req("r4", params), hashes[:5], 0, []) == []
    ps.forget("r4")
    assert len(ps.match(_Req("r4", params), hashes[:5], 0, [])) == 5
    assert ps.stats.hit_blocks_remote == 5 and ps.stats.remote_reqs == 1


def test_producer_leases_pin_until_released_or_expired() -> None:
    now = [0.0]
    idx = TierIndex(KvbmConfig(host_capacity_bytes=4 * SLOT), SLOT, None, 1)
    ps = PdScheduler(PdConfig(produce=True, lease_s=10), idx, NS.digest, 4, 1, SLOT, clock=lambda: now[0])
    ps.set_ranks({0: {"kind": "kvbm_pd", "host": "h", "port": 1, "arena": 0, "table": 0, "slots": 4,
                      "slot_bytes": SLOT}})
    hashes = block_hashes(list(range(4 * 3)), 4, NS)
    for i, h in enumerate(hashes):
        idx.prepare_host(h, hashes[i - 1] if i else None)
    idx.complete_host(hashes[0], 1, ok=True)
    idx.complete_host(hashes[1], 1, ok=True)  # block 2 is still "storing" (this step's store)
    req = _Req("a", {"do_remote_decode": True})
    req.num_prompt_tokens = 13
    p = ps.request_finished(req, hashes)
    assert p is not None and p["do_remote_prefill"] and len(p[PARAMS_KEY]["slots"]) == 3
    assert ps.pinned_blocks() == 2
    idx.complete_host(hashes[2], 1, ok=True)
    ps.on_stores_reported()
    assert ps.pinned_blocks() == 3
    # Pinned blocks survive pressure: the only free slot goes, then nothing is evictable.
    others = block_hashes([999] * 8, 4, NS)
    assert idx.prepare_host(others[0], None) is not None
    idx.complete_host(others[0], 1, ok=True)
    assert idx.prepare_host(others[1], others[0]) is not None  # evicts others[0], not a leased block
    idx.complete_host(others[1], 1, ok=True)
    assert all(idx.has(h)[0] for h in hashes)
    lease = p[PARAMS_KEY]["lease"]
    ps.on_released({lease: 1})
    assert ps.pinned_blocks() == 0 and ps.stats.leases_released == 1
    # Expiry path.
    p2 = ps.request_finished(_Req("b", {"do_remote_decode": True}), hashes[:2])
    assert p2 is not None and ps.pinned_blocks() == 2
    now[0] = 11.0
    ps.expire()
    assert ps.pinned_blocks() == 0 and ps.stats.leases_expired == 1
    # Not asked for: no params.
    assert ps.request_finished(_Req("c", None), hashes) is None
    # A leased block whose store fails is simply not pinned (the consumer's table check rejects it).
    more = block_hashes([5] * 8, 4, NS)
    ps.leases.clear()
    idx.prepare_host(more[0], None)
    p3 = ps.request_finished(_Req("d", {"do_remote_decode": True}), more[:1])
    assert p3 is not None and ps.pinned_blocks() == 0
    idx.complete_host(more[0], 1, ok=False)
    ps.on_stores_reported()
    assert ps.pinned_blocks() == 0 and not ps._waiting


# ------------------------------------------------------------------------------ UCX loopback
_UCX, _WHY = ucx_available()


@pytest.fixture
def ucx_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _UCX:
        pytest.skip(_WHY or "UCX unavailable")
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    monkeypatch.setenv("UCX_WARN_UNUSED_ENV_VARS", "n")
    monkeypatch.setenv("UCX_TLS", os.environ.get("UCX_TLS", "tcp"))


def test_pull_verifies_hash_and_crc(ucx_env: None) -> None:
    rng = np.random.default_rng(0)
    arena = rng.integers(0, 256, size=(8, SLOT), dtype=np.uint8)
    server = PdServer(arena, PdConfig(produce=True), rank=0)
    client = PdClient(SLOT, rank=0, timeout_s=5, staging_bytes=3 * SLOT)  # 3 blocks per round trip
    try:
        hashes = block_hashes(list(range(4 * 6)), 4, NS)
        slots = [5, 1, 7, 0, 2, 3]
        server.before_store(slots)
        server.after_store(slots, hashes)
        got: dict[int, bytes] = {}

        def sink(rows: np.ndarray, idx: list[int]) -> None:
            for r, i in zip(rows, idx):
                got[i] = bytes(r)

        src = server.addr
        assert client.pull(src, slots, hashes, sink) == 6
        assert all(got[i] == bytes(arena[s]) for i, s in enumerate(slots))
        # Corrupt block 4's bytes after its CRC was published: blocks 0..3 only.
        arena[slots[4], 10] ^= 1
        got.clear()
        assert client.pull(src, slots, hashes, sink) == 4 and sorted(got) == [0, 1, 2, 3]
        # A slot re-stored with another block (or the wrong slot named): the hash check stops there.
        assert client.pull(src, [5, 7], [hashes[0], hashes[1]], sink) == 1
        # A slot being overwritten (cleared entry): nothing.
        server.before_store([5])
        assert client.pull(src, [5], [hashes[0]], sink) == 0
        # Lease release reaches the producer; a fresh client connects to release an unused offer.
        client.release(src, "lease-x")
        other = PdClient(SLOT, rank=0, timeout_s=5)
        try:
            other.release(src, "lease-y")  # not connected, connect=False: nothing sent
            other.release(src, "lease-z", connect=True)
            deadline = time.monotonic() + 5
            rel: dict = {}
            while len(rel) < 2 and time.monotonic() < deadline:
                for k, v in server.released().items():
                    rel[k] = rel.get(k, 0) + v
                time.sleep(0.01)
            assert rel == {"lease-x": 1, "lease-z": 1}
        finally:
            other.close()
    finally:
        client.close()
        server.close()


def test_pull_from_dead_producer_is_bounded(ucx_env: None) -> None:
    arena = np.zeros((4, SLOT), dtype=np.uint8)
    server = PdServer(arena, PdConfig(produce=True), rank=0)
    src = server.addr
    server.close()  # nobody listens any more
    client = PdClient(SLOT, rank=0, timeout_s=2)
    try:
        t0 = time.monotonic()
        assert client.pull(src, [0, 1], block_hashes(list(range(8)), 4, NS), lambda r, i: None) == 0
        assert time.monotonic() - t0 < 10
        assert client.failed_blocks == 2
    finally:
        client.close()


def test_producer_port_in_use_is_a_config_error(ucx_env: None) -> None:
    arena = np.zeros((4, SLOT), dtype=np.uint8)
    first = PdServer(arena, PdConfig(produce=True), rank=0)
    try:
        with pytest.raises(ConfigError, match="pd_port"):
            PdServer(np.zeros((4, SLOT), dtype=np.uint8), PdConfig(produce=True, port=first.addr.port), rank=0)
    finally:
        first.close()


def test_crc32c_rows_matches_crc32c() -> None:
    from kvbm import _native
    from kvbm.errors import InvalidArgumentError

    a = np.random.default_rng(1).integers(0, 256, size=(7, 333), dtype=np.uint8)
    assert [int(c) for c in _native.crc32c_rows(a)] == [_native.crc32c(r) for r in a]
    assert [int(c) for c in _native.crc32c_rows(a[2:5, 10:20])] == [_native.crc32c(r) for r in a[2:5, 10:20]]
    assert _native.crc32c_rows(a[:0]).shape == (0,)
    for bad in (a.astype(np.int16), a[0], a[:, ::2]):
        with pytest.raises(InvalidArgumentError, match="crc32c_rows"):
            _native.crc32c_rows(bad)


def test_producer_does_not_lease_blocks_of_an_aborted_request() -> None:
    """vLLM calls ``request_finished`` for aborted requests too (client gone, engine abort): their
    params reach no consumer, so pinning their blocks would hold host slots for ``pd_lease_s``
    for nothing. Only requests that finished normally are offered."""
    import enum

    status = enum.Enum("RequestStatus", ["FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED", "FINISHED_ABORTED",
                                         "FINISHED_ERROR"])
    idx = TierIndex(KvbmConfig(host_capacity_bytes=4 * SLOT), SLOT, None, 1)
    ps = PdScheduler(PdConfig(produce=True, lease_s=10), idx, NS.digest, 4, 1, SLOT)
    ps.set_ranks({0: {"kind": "kvbm_pd", "host": "h", "port": 1, "arena": 0, "table": 0, "slots": 4,
                      "slot_bytes": SLOT}})
    hashes = block_hashes(list(range(4 * 2)), 4, NS)
    for i, h in enumerate(hashes):
        idx.prepare_host(h, hashes[i - 1] if i else None)
        idx.complete_host(h, 1, ok=True)
    for st in (status.FINISHED_ABORTED, status.FINISHED_ERROR):
        req = _Req("gone", {"do_remote_decode": True})
        req.status = st
        assert ps.request_finished(req, hashes) is None
        assert ps.pinned_blocks() == 0 and not ps.leases and ps.stats.offers == 0
    req = _Req("ok", {"do_remote_decode": True})
    req.status = status.FINISHED_LENGTH_CAPPED
    assert ps.request_finished(req, hashes) is not None and ps.pinned_blocks() == 2


def test_consumer_releases_an_offer_it_matched_but_never_loads() -> None:
    """An offer the consumer matched but never planned a load for is handed back for release:
    the request finished (aborted) before vLLM allocated its blocks, or the hit was dropped by
    ``min_hit_blocks``. Otherwise the producer keeps the blocks pinned until ``pd_lease_s``."""
    from kvbm.integrations.vllm.common import Geometry
    from kvbm.integrations.vllm.scheduler import KvbmScheduler

    hashes = block_hashes(list(range(4 * 6)), 4, NS)
    ranks = [RankAddr("127.0.0.1", 5555, 1 << 20, 2 << 20, 16, SLOT)]
    params = make_params("L1", NS.digest, 4, ranks, hashes[:5], [1, 2, 3, 4, 5], 20)
    idx = TierIndex(KvbmConfig(host_capacity_bytes=8 * SLOT), SLOT, None, 1)
    ps = PdScheduler(PdConfig(consume=True), idx, NS.digest, 4, 1, SLOT)
    # Aborted before allocation: matched, never loaded, then finished.
    assert ps.match(_Req("a", params), hashes[:5], 0, []) == ["remote"] * 5
    assert ps.take_unused() == []
    ps.forget("a")
    assert [s.lease for s in ps.take_unused()] == ["L1"]
    # Loaded: nothing to release here (the workers release after the pull).
    ps.match(_Req("b", params), hashes[:5], 0, [])
    ps.loaded("b", 5)
    ps.forget("b")
    assert ps.take_unused() == []
    # The scheduler drops a remote hit shorter than min_hit_blocks: the offer is released at once.
    cfg = ConnectorConfig.from_extra_config({"host_capacity_bytes": 8 * SLOT, "min_hit_blocks": 8}, "kv_consumer")
    geo = Geometry(block_size=4, slot_bytes=SLOT, num_host_slots=8, disk_capacity_blocks=0, tp_world=1, namespace=NS)
    sched = KvbmScheduler(cfg, geo)
    req = _Req("c", make_params("L2", NS.digest, 4, ranks, hashes[:5], [1, 2, 3, 4, 5], 20))
    req.all_token_ids = list(range(4 * 6))
    req.num_tokens = len(req.all_token_ids)
    req.num_prompt_tokens = req.num_tokens
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = sched.build_connector_meta(type("SO", (), {"scheduled_new_reqs": [], "num_scheduled_tokens": {},
                                                      "scheduled_cached_reqs": type("CR", (), {"req_ids": []})()})())
    assert [s.lease for s in meta.pd_unused] == ["L2"]
    sched.request_finished(req)
    assert sched.pd.take_unused() == []  # released once
    # Aborted before the scheduler ever looked it up (never scheduled): released at finish.
    req2 = _Req("d", make_params("L3", NS.digest, 4, ranks, hashes[:5], [1, 2, 3, 4, 5], 20))
    req2.num_prompt_tokens = 24
    assert sched.request_finished(req2) is None
    assert [s.lease for s in sched.pd.take_unused()] == ["L3"]
    sched.shutdown()


def test_timed_out_pulls_do_not_keep_staging_buffers_forever(ucx_env: None, caplog: pytest.LogCaptureFixture) -> None:
    """A pull whose wait times out retires its staging buffers (a late get may still land there)
    and registers new ones; once the cancelled gets are done the retired buffers are released.
    Otherwise every timed-out round leaks a staging buffer (64 MiB per rank by default)."""
    from kvbm.integrations.vllm.pd import TABLE_ENTRY
    from kvbm.transfer import TransferEngine

    # A producer that never progresses (no progress thread, nobody calling progress): gets hang.
    arena = np.zeros((8, SLOT), dtype=np.uint8)
    table = np.zeros((8, TABLE_ENTRY), dtype=np.uint8)
    eng = TransferEngine("stuck-producer", progress="caller")
    eng.register(arena)
    eng.register(table)
    host, port = eng.listen("127.0.0.1", 0)
    src = RankAddr(host, port, int(arena.ctypes.data), int(table.ctypes.data), 8, SLOT)
    client = PdClient(SLOT, rank=0, timeout_s=0.3, staging_bytes=4 * SLOT)
    hashes = block_hashes(list(range(4 * 4)), 4, NS)
    try:
        with caplog.at_level("WARNING", logger="kvbm.vllm"):
            for _ in range(12):
                assert client.pull(src, [0, 1, 2, 3], hashes, lambda r, i: None) == 0
        assert client.failed_blocks == 48
        assert sum("not complete" in r.getMessage() for r in caplog.records) == 12  # the gets timed out
        assert len(client._retired) <= 2, f"{len(client._retired)} retired staging buffers kept"
    finally:
        client.close()
        eng.close()
