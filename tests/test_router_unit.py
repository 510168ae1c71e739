"""Fast tests of kvbm router's parts: the block index, the cost model, the KV-event wire format and
the publisher/subscriber pair (real ZeroMQ sockets on loopback)."""

from __future__ import annotations

import importlib.util
import random
import socket
import threading
import time

import pytest

pytest.importorskip("msgspec")
pytest.importorskip("zmq")

from kvbm.errors import ConfigError, InvalidArgumentError  # noqa: E402
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventPublisher, decode_batch, encode_batch  # noqa: E402
from kvbm.router.config import RouterConfig, parse_instance  # noqa: E402
from kvbm.router.cost import Load, Rates, choose, estimate  # noqa: E402
from kvbm.router.events import Subscriber, kvbm_stream  # noqa: E402
from kvbm.router.index import CPU, DISK, GPU, REMOTE, BlockIndex, chain_keys  # noqa: E402

BS = 4


def _toks(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def _stored(hashes: list, toks: list[int], parent=None, medium: str = "GPU") -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=toks, block_size=BS, medium=medium,
                       lora_id=None, lora_name=None)


def test_events_resolve_through_parents_and_match_request_keys() -> None:
    idx = BlockIndex()
    t = _toks(5 * BS + 1, 1)
    # Instance 0 reports blocks 0-2 in one event and 3-4 in a child event (engine hashes are opaque).
    idx.apply(0, [_stored([10, 11, 12], t[:3 * BS]), _stored([13, 14], t[3 * BS:5 * BS], parent=12)])
    # Instance 1 holds blocks 0-1 on its host tier (kvbm bytes hashes).
    idx.apply(1, [_stored([b"a", b"b"], t[:2 * BS], medium="CPU")])
    keys = chain_keys(t, BS)
    assert len(keys) == 5
    over = idx.overlap(keys, [0, 1, 2])
    assert over == {0: [GPU] * 5, 1: [CPU, CPU], 2: []}
    # A child whose parent the router never saw cannot be placed: counted, not guessed.
    idx.apply(2, [_stored([99], t[BS:2 * BS], parent=98)])
    assert idx.stats.unresolved == 1 and idx.overlap(keys, [2]) == {2: []}
    # Removal by engine hash; a tokenless store of a known hash (a demotion to disk) resolves.
    idx.apply(1, [BlockRemoved(block_hashes=[b"b"], medium="CPU"),
                  BlockStored(block_hashes=[b"a"], parent_block_hash=None, token_ids=[], block_size=BS,
                              medium="DISK", lora_id=None, lora_name=None)])
    assert idx.overlap(keys, [1]) == {1: [CPU]}
    assert idx.holders(keys[0]) == {0: ["GPU"], 1: ["CPU", "DISK"]}
    # vLLM's reset of its prefix cache clears the GPU tier only.
    idx.apply(0, [AllBlocksCleared()], clears=(GPU,))
    assert idx.overlap(keys, [0]) == {0: []} and len(idx) == 1


def test_remote_blocks_count_for_every_instance_and_extra_keys_separate() -> None:
    idx = BlockIndex()
    t = _toks(3 * BS, 2)
    idx.apply(0, [_stored([1, 2, 3], t, medium="REMOTE"), _stored([7], t[:BS])])
    keys = chain_keys(t, BS)
    assert idx.overlap(keys, [0, 1]) == {0: [GPU, REMOTE, REMOTE], 1: [REMOTE] * 3}
    assert chain_keys(t, BS, extra="lora-a") != keys  # a LoRA's blocks are other blocks
    idx.apply(1, [BlockStored(block_hashes=[50], parent_block_hash=None, token_ids=t[:BS], block_size=BS,
                              medium="GPU", lora_id=1, lora_name="lora-a")])
    assert idx.overlap(chain_keys(t, BS, extra="lora-a"), [1]) == {1: [GPU]}
    assert chain_keys(t, 2 * BS) != keys[:1]


def test_index_is_bounded_lru() -> None:
    idx = BlockIndex(max_blocks=100)
    for i in range(50):
        t = _toks(4 * BS, 100 + i)
        idx.apply(i % 3, [_stored([i * 10 + j for j in range(4)], t)])
    # never more than max_blocks; the oldest go in bulk (up to 1/16 more at once)
    assert 100 - 100 // 16 <= len(idx) <= 100 and idx.stats.evicted == 200 - len(idx)
    last = _toks(4 * BS, 149)
    assert idx.overlap(chain_keys(last, BS), [49 % 3])[49 % 3] == [GPU] * 4  # the newest kept
    with pytest.raises(ConfigError):
        BlockIndex(max_blocks=0)


def test_cost_model_prefers_cached_but_not_slow_tiers_or_busy_instances() -> None:
    fast = Rates(prefill_tokens_per_s=1000.0, decode_step_s=0.01, block_bytes=1 << 20)
    n = 10 * BS + 1
    cold = estimate(0, n, BS, [], fast, Load())
    host = estimate(1, n, BS, [CPU] * 10, fast, Load())
    assert host.cached_tokens == 10 * BS and host.ttft_s < cold.ttft_s
    # A disk slower than recompute (1 MiB at 1 kB/s vs 4 tokens at 1000 tok/s) is not counted.
    slow = Rates(prefill_tokens_per_s=1000.0, block_bytes=1 << 20, bandwidth={DISK: 1e3})
    disk = estimate(2, n, BS, [DISK] * 10, slow, Load())
    assert disk.cached_tokens == 0 and disk.ttft_s == pytest.approx(cold.ttft_s)
    # The last prompt token is always computed.
    assert estimate(0, 2 * BS, BS, [GPU, GPU], fast, Load()).cached_tokens == BS
    # A cached prefix on a swamped instance loses to a cold idle one.
    busy = Load(active=4, pending_prefill_tokens=100_000)
    loads = {0: Load(), 1: busy}
    best = choose([cold, estimate(1, n, BS, [GPU] * 10, fast, busy)], loads)
    assert best.slot == 0
    # Estimates within 10% are ties (rates are noisy), settled by fewer requests routed so far;
    # a clearly faster instance wins regardless.
    a, b = Rates(prefill_tokens_per_s=1000.0), Rates(prefill_tokens_per_s=1050.0)
    loads = {0: Load(routed=1), 1: Load(routed=5)}
    assert choose([estimate(0, n, BS, [], a, loads[0]), estimate(1, n, BS, [], b, loads[1])], loads).slot == 0
    b.prefill_tokens_per_s = 3000.0
    assert choose([estimate(0, n, BS, [], a, loads[0]), estimate(1, n, BS, [], b, loads[1])], loads).slot == 1
    loads = {0: Load(routed=3), 1: Load(routed=1)}
    assert choose([estimate(0, n, BS, [], fast, loads[0]), estimate(1, n, BS, [], fast, loads[1])], loads).slot == 1


def test_config_errors_name_the_problem(tmp_path) -> None:
    inst = parse_instance("http://h:1,events=tcp://h:2,replay=tcp://h:3,block_bytes=4096")
    assert inst.events == "tcp://h:2" and inst.block_bytes == 4096
    for bad, word in [("h:1", "url"), ("http://h:1,evnts=tcp://x:1", "evnts"), ("http://h:1,events=h:2", "events"),
                      ("http://h:1,block_bytes=x", "block_bytes")]:
        with pytest.raises(ConfigError, match=word):
            parse_instance(bad)
    with pytest.raises(ConfigError, match="bandwidth"):
        parse_instance({"url": "http://h:1", "bandwidth": {"NVME": 1}})
    with pytest.raises(ConfigError, match="no instances"):
        RouterConfig(instances=())
    with pytest.raises(ConfigError, match="policy"):
        RouterConfig(instances=(inst,), policy="random")
    from kvbm.router.config import load_yaml

    p = tmp_path / "r.yaml"
    p.write_text("port: 0\ninstances:\n  - url: http://a:1\n    events: tcp://a:2\n  - http://b:1\n")
    cfg = load_yaml(p, policy="round_robin")
    assert [i.url for i in cfg.instances] == ["http://a:1", "http://b:1"] and cfg.policy == "round_robin"
    p.write_text("instances: []\nprot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_yaml(p)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_wire_format_is_vllms() -> None:
    """kvbm's structs encode to vLLM's bytes, and vLLM's batches decode with kvbm's decoder."""
    import msgspec
    from vllm.distributed import kv_events as v

    ours = encode_batch([_stored([b"x"], [1, 2, 3, 4], medium="CPU"), BlockRemoved(block_hashes=[5], medium="DISK"),
                         AllBlocksCleared()], ts=1.5, data_parallel_rank=0)
    theirs = msgspec.msgpack.encode(v.KVEventBatch(ts=1.5, data_parallel_rank=0, events=[
        v.BlockStored(block_hashes=[b"x"], parent_block_hash=None, token_ids=[1, 2, 3, 4], block_size=BS,
                      lora_id=None, medium="CPU", lora_name=None),
        v.BlockRemoved(block_hashes=[5], medium="DISK"), v.AllBlocksCleared()]))
    assert msgspec.msgpack.decode(ours) == msgspec.msgpack.decode(theirs)
    back = msgspec.msgpack.Decoder(v.KVEventBatch).decode(ours)
    assert back.events[0].token_ids == [1, 2, 3, 4] and back.events[1].medium == "DISK"
    assert decode_batch(theirs).events[0].block_hashes == [b"x"]
    with pytest.raises(InvalidArgumentError):
        decode_batch(b"\x01\x02")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publisher_subscriber_replay_recovers_missed_batches() -> None:
    """Batches published before the subscriber existed come back through the replay endpoint, live
    ones follow; a restarted publisher (seq back to 0) makes the subscriber forget its blocks."""
    p1, p2 = _port(), _port()
    pub = KvEventPublisher(f"tcp://*:{p1}", f"tcp://127.0.0.1:{p2}")
    idx = BlockIndex()
    lock = threading.Lock()
    t = _toks(40 * BS, 3)
    hashes = [f"h{i}".encode() for i in range(40)]

    def apply(slot, evs, clears):
        with lock:
            idx.apply(slot, evs, clears)

    def clear(slot, tiers):
        with lock:
            idx.clear(slot, tiers)

    def wait_for(cond, what):
        deadline = time.time() + 20
        while time.time() < deadline:
            with lock:
                if cond():
                    return
            time.sleep(0.02)
        pytest.fail(what)

    keys = chain_keys(t, BS)
    sub = None
    try:
        for i in range(20):  # before any subscriber: only replay can deliver these
            pub.publish([_stored([hashes[i]], t[i * BS:(i + 1) * BS], hashes[i - 1] if i else None, "CPU")])
        wait_for(lambda: pub.published == 20, "publisher did not send")
        sub = Subscriber([kvbm_stream(0, f"tcp://127.0.0.1:{p1}", f"tcp://127.0.0.1:{p2}")], apply, clear).start()
        wait_for(lambda: len(idx.overlap(keys, [0])[0]) == 20, "replay did not recover the first 20 blocks")
        time.sleep(0.3)  # let the SUB connection settle (PUB drops messages until it is joined)
        for i in range(20, 40):
            pub.publish([_stored([hashes[i]], t[i * BS:(i + 1) * BS], hashes[i - 1], "CPU")])
        wait_for(lambda: len(idx.overlap(keys, [0])[0]) == 40, "live batches not applied")
        assert idx.overlap(keys, [0])[0] == [CPU] * 40
        assert sub.streams[0].replayed >= 20 and sub.decode_errors == 0
        # The publisher restarts: its seq starts at 0 again; the subscriber drops what it reported.
        pub.close()
        deadline = time.time() + 10
        while True:  # ZeroMQ releases a closed socket's port asynchronously
            try:
                pub = KvEventPublisher(f"tcp://*:{p1}", f"tcp://127.0.0.1:{p2}")
                break
            except ConfigError:
                assert time.time() < deadline, "port not released"
                time.sleep(0.1)
        time.sleep(0.5)
        pub.publish([_stored([b"new"], t[:BS], None, "CPU")])
        wait_for(lambda: sub.streams[0].restarts == 1, "restart not detected")
        wait_for(lambda: idx.overlap(keys, [0])[0] == [CPU], "stale blocks kept after a restart")
    finally:
        if sub is not None:
            sub.close()
        pub.close()


def test_publisher_rejects_a_bad_endpoint() -> None:
    with pytest.raises(ConfigError, match="endpoint"):
        KvEventPublisher("tcp://*:notaport")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_connector_event_keys_are_validated() -> None:
    from kvbm.integrations.vllm.config import ConnectorConfig

    cfg = ConnectorConfig.from_extra_config({"events_endpoint": "tcp://*:5567", "events_replay_endpoint": "tcp://*:5568"})
    assert (cfg.events_endpoint, cfg.events_replay_endpoint) == ("tcp://*:5567", "tcp://*:5568")
    with pytest.raises(ConfigError, match="events_endpoint"):
        ConnectorConfig.from_extra_config({"events_endpoint": 5567})
    with pytest.raises(ConfigError, match="needs 'events_endpoint'"):
        ConnectorConfig.from_extra_config({"events_replay_endpoint": "tcp://*:5568"})
