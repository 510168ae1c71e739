"""The router's native block index (csrc/router_index.*) against a small pure-Python model of Note
[Router block keys], plus request keys == event keys, engine-hash normalisation, wide slots, the
bound, and hostile events (counted, never raised, never a crash)."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("msgspec")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvbm.errors import ConfigError, InvalidArgumentError, KvbmError, OutOfRangeError  # noqa: E402
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch, encode_batch  # noqa: E402
from kvbm.router.index import CPU, DISK, GPU, REMOTE, BlockIndex, chain_keys  # noqa: E402

BS = 2


def _stored(hashes, toks, parent=None, medium="GPU", bs=BS, lora=None) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=toks, block_size=bs, medium=medium,
                       lora_id=None, lora_name=lora)


class Model:
    """The semantics in plain dicts (recency = insertion order), keyed by the native chain_keys."""

    def __init__(self, max_blocks: int) -> None:
        self.max = max_blocks
        self.blocks: dict[int, int] = {}
        self.emap: dict[int, dict[int, int]] = {}
        self.stats = dict(stored=0, removed=0, unresolved=0, evicted=0, events=0, clears=0)

    def store(self, slot, tier, hashes, parent, tokens, bs, extra=None) -> None:
        emap = self.emap.setdefault(slot, {})
        bit, n = 1 << (4 * slot + tier), len(hashes)
        if len(tokens) >= n * bs > 0:
            if parent is not None and parent not in emap:
                self.stats["unresolved"] += n
                return
            par = None if parent is None else emap[parent]
            for h, k in zip(hashes, chain_keys(tokens[:n * bs], bs, extra, par)):
                emap.pop(h, None)
                emap[h] = k
                self.blocks[k] = self.blocks.pop(k, 0) | bit
        else:
            for h in hashes:
                if h not in emap:
                    self.stats["unresolved"] += 1
                    continue
                emap[h] = k = emap.pop(h)
                self.blocks[k] = self.blocks.pop(k, 0) | bit
        self.stats["stored"] += n
        for d, count in ((self.blocks, True), (emap, False)):
            if len(d) > self.max:
                drop = len(d) - self.max + self.max // 16
                for k in list(d)[:drop]:
                    del d[k]
                if count:
                    self.stats["evicted"] += drop

    def remove(self, slot, tier, hashes) -> None:
        emap = self.emap.get(slot, {})
        for h in hashes:
            if h not in emap:
                continue
            self.stats["removed"] += 1
            k = emap[h]
            if k not in self.blocks:
                continue
            m = self.blocks[k] & ~(1 << (4 * slot + tier))
            if m:
                self.blocks[k] = m
            else:
                del self.blocks[k]
            if not m >> (4 * slot) & 0xF:
                del emap[h]

    def clear(self, slot, tiers) -> None:
        self.stats["clears"] += 1
        mask = sum(1 << (4 * slot + t) for t in set(tiers))
        for k in [k for k, m in self.blocks.items() if m & mask]:
            if self.blocks[k] & ~mask:
                self.blocks[k] &= ~mask
            else:
                del self.blocks[k]
        if set(tiers) == {0, 1, 2, 3}:
            self.emap.pop(slot, None)

    def overlap(self, keys, slots) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {s: [] for s in slots}
        live = set(slots)
        for k in keys:
            if k not in self.blocks or not live:
                break
            m = self.blocks[k] = self.blocks.pop(k)
            shared = any(m >> (4 * s + REMOTE) & 1 for s in range(256))
            for s in sorted(live):
                bits = m >> (4 * s) & 0xF
                if bits or shared:
                    out[s].append((bits & -bits).bit_length() - 1 if bits else REMOTE)
                else:
                    live.discard(s)
        return out


SEQS = [[random.Random(q).randrange(5000) for _ in range(10 * BS)] for q in range(3)]
EXTRA = [None, None, "lora-a"]  # sequence 2 is a LoRA's: its keys are apart
SLOTS = [0, 1, 17]  # 17: a slot past the first mask word

op = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(SLOTS), st.integers(0, 3), st.integers(0, 2), st.integers(0, 9),
              st.integers(0, 4), st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(SLOTS), st.integers(0, 3), st.integers(0, 2), st.integers(0, 9),
              st.integers(0, 4)),
    st.tuples(st.just("clear"), st.sampled_from(SLOTS), st.sets(st.integers(0, 3), min_size=1)),
    st.tuples(st.just("overlap"), st.integers(0, 2), st.integers(0, 10)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 24), st.lists(op, max_size=40))
def test_native_index_matches_the_model(max_blocks, ops) -> None:
    idx, model = BlockIndex(max_blocks), Model(max_blocks)
    for o in ops:
        if o[0] in ("store", "remove"):
            _, slot, tier, q, j0, n = o[:6]
            n = min(n, 10 - j0)
            hashes = [100 * q + j for j in range(j0, j0 + n)]
            if o[0] == "remove":
                idx.remove(slot, tier, hashes)
                model.remove(slot, tier, hashes)
                continue
            parent = 100 * q + j0 - 1 if j0 else None
            toks = SEQS[q][j0 * BS:(j0 + n) * BS] if o[6] else []
            idx.store(slot, tier, hashes, parent, toks, BS, EXTRA[q])
            model.store(slot, tier, hashes, parent, toks, BS, EXTRA[q])
        elif o[0] == "clear":
            idx.clear(o[1], o[2])
            model.clear(o[1], o[2])
        else:
            keys = chain_keys(SEQS[o[1]][:o[2] * BS], BS, EXTRA[o[1]])
            assert idx.overlap(keys, SLOTS) == model.overlap(keys, SLOTS)
        assert len(idx) == len(model.blocks) <= max(max_blocks, len(model.blocks))
        assert idx.stats.__dict__ == model.stats
    for k, m in model.blocks.items():
        assert idx.holders(k) == {s: [n for t, n in enumerate(("GPU", "CPU", "DISK", "REMOTE")) if m >> (4 * s + t) & 1]
                                  for s in SLOTS if m >> (4 * s) & 0xF}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=60), st.integers(1, 8), st.sampled_from([None, "x", b"x"]),
       st.data())
def test_request_keys_are_event_keys(tokens, bs, extra, data) -> None:
    """Events that split a sequence anywhere, applied through decoded msgpack, give chain_keys' keys."""
    keys = chain_keys(tokens, bs, extra)
    assert len(keys) == len(tokens) // bs
    np = pytest.importorskip("numpy")
    assert chain_keys(np.array(tokens, dtype=np.int64), bs, extra) == keys == chain_keys(tuple(tokens), bs, extra)
    assert chain_keys(tokens, bs, extra, limit=2) == keys[:2]
    if keys:
        assert chain_keys(tokens[bs:], bs, parent=keys[0]) == keys[1:]
    idx = BlockIndex()
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(keys)), max_size=4))) | {0, len(keys)})
    evs = [_stored([f"h{j}".encode() for j in range(a, b)], tokens[a * bs:b * bs], f"h{a - 1}".encode() if a else None,
                   bs=bs, lora=extra if isinstance(extra, str) else None) for a, b in zip(cuts, cuts[1:])]
    idx.apply(3, decode_batch(encode_batch(evs, ts=0.0)).events)
    if isinstance(extra, str) or extra is None:
        assert idx.overlap(keys, [3]) == {3: [GPU] * len(keys)} and idx.stats.unresolved == 0
    assert chain_keys(tokens, bs, "other") != keys or not keys


def test_engine_hashes_normalise_without_merging() -> None:
    """vLLM's ints (negative, or up to 2**64-1), kvbm's bytes and str are distinct engine hashes."""
    idx = BlockIndex()
    toks = list(range(4 * BS))
    hs = [-1, 2**64 - 1, b"x", "x"]
    idx.apply(0, [_stored(hs, toks)])
    keys = chain_keys(toks, BS)
    for h, k in zip(hs, keys):
        idx.apply(0, [BlockRemoved(block_hashes=[h], medium="GPU")])
        assert idx.holders(k) == {}
        assert all(idx.holders(k2) == {0: ["GPU"]} for k2 in keys[keys.index(k) + 1:])
    # a parent named by a 64-bit int resolves; 2**63 and -2**63 differ
    idx.apply(1, [_stored([2**63], toks[:BS]), _stored([-2**63], toks[:BS]), _stored([5], toks[BS:2 * BS], 2**63)])
    assert idx.overlap(keys[:2], [1]) == {1: [GPU, GPU]} and idx.stats.unresolved == 0


def test_tiers_clears_and_remote_for_every_slot() -> None:
    idx = BlockIndex()
    toks = list(range(3 * BS))
    keys = chain_keys(toks, BS)
    idx.apply(200, [_stored([1, 2, 3], toks, medium="CPU")])
    idx.apply(200, [_stored([1, 2], [], medium="DISK")])  # tokenless: a demotion of known blocks
    idx.apply(5, [_stored([9], toks[:BS], medium="remote")])
    assert idx.holders(keys[0]) == {5: ["REMOTE"], 200: ["CPU", "DISK"]}
    assert idx.overlap(keys, [0, 200, 255]) == {0: [REMOTE], 200: [CPU, CPU, CPU], 255: [REMOTE]}
    idx.apply(200, [AllBlocksCleared()], clears=(CPU,))
    assert idx.overlap(keys, [200]) == {200: [DISK, DISK]}
    idx.clear(200)
    assert idx.overlap(keys, [200]) == {200: [REMOTE]} and len(idx) == 1
    idx.apply(200, [_stored([1], [], medium="CPU")])  # its engine hashes went with a full clear
    assert idx.stats.unresolved == 1 and idx.stats.clears == 2
    with pytest.raises(OutOfRangeError):
        idx.apply(256, [])
    with pytest.raises(OutOfRangeError):
        idx.clear(0, (4,))
    with pytest.raises(OutOfRangeError):
        idx.store(0, 4, [1], None, toks[:BS], BS)
    with pytest.raises(OutOfRangeError):
        idx.overlap(keys, [-1])


def test_bound_holds_memory_flat() -> None:
    idx = BlockIndex(max_blocks=1000)
    rng = random.Random(1)
    sizes = []
    for i in range(400):
        toks = [rng.randrange(1 << 32) for _ in range(16 * BS)]
        idx.apply(i % 2, [_stored(list(range(16 * i, 16 * i + 16)), toks)])
        assert len(idx) <= 1000
        sizes.append(idx.memory_bytes())
    assert idx.stats.evicted == 400 * 16 - len(idx) and sizes[-1] == sizes[len(sizes) // 2]
    with pytest.raises(ConfigError):
        BlockIndex(max_blocks=0)
    with pytest.raises(ConfigError):
        BlockIndex(max_blocks=2**31)


@pytest.mark.parametrize("ev", [
    _stored(None, [1, 2]), _stored([1], "ab"), _stored([1], [1, "x"]), _stored([1], [-1, 2]), _stored([1], [2**40, 1]),
    _stored([1.5], [1, 2]), _stored([1], [1, 2], parent=1.5), _stored([1], [1, 2], lora=7),
    _stored([1], [1, 2], bs=None), _stored([1], [1, 2], bs=2**70), _stored([[1]], [1, 2]), _stored([2**64], [1, 2]),
    _stored([-2**63 - 1], [1, 2]),
    BlockRemoved(block_hashes=None, medium="GPU"),
])
def test_hostile_events_are_counted_not_raised(ev) -> None:
    idx = BlockIndex()
    idx.apply(0, [ev])
    assert idx.stats.events == 1 and idx.stats.unresolved == 1 and len(idx) == 0


def test_hostile_shapes_never_crash() -> None:
    idx = BlockIndex()
    toks = list(range(8))
    fake = type("BlockStored", (), {})()  # the name of an event, none of its fields: malformed
    idx.apply(0, [None, 3, {"type": "BlockStored"}, fake, AllBlocksCleared(),
                  _stored([1, 2], toks, bs=-4),  # negative block size: a tokenless store of unknown blocks
                  _stored([1, 2, 3, 4, 5], toks),  # tokens short of the blocks: tokenless
                  _stored([1], list(range(10**6))),  # a huge list: only the first block is read
                  _stored(list(range(10, 10**5)), []),  # many unknown hashes
                  BlockRemoved(block_hashes=[None, 1.5, b"zz", 2**80], medium=None)])
    s = idx.stats
    assert s.events == 10 and s.clears == 1 and len(idx) == 1
    assert s.unresolved == 1 + 2 + 5 + len(range(10, 10**5)) and s.stored == 2 + 5 + 1 + len(range(10, 10**5))
    assert idx.overlap(chain_keys(list(range(10**6)), 2, limit=1), [0]) == {0: [GPU]}
    for bad in [lambda: idx.store(0, 0, [1.5], None, toks, 2), lambda: idx.store(0, 0, [1], None, [2**40, 0], 2),
                lambda: idx.store(0, 0, [1], None, None, 2), lambda: chain_keys(toks, 0),
                lambda: chain_keys([-1, 0], 1), lambda: chain_keys(toks, 2, extra=3), lambda: idx.overlap([-5], [0]),
                lambda: idx.apply(0, 5)]:
        with pytest.raises(InvalidArgumentError):
            bad()
    assert isinstance(InvalidArgumentError("x"), KvbmError) and len(idx) == 1


def test_router_ranks_prompts_the_index_cannot_key() -> None:
    """A request whose token ids no block can have (negative, >= 2**32) is routed cold, not failed."""
    pytest.importorskip("aiohttp")
    from kvbm.router.config import RouterConfig, parse_instance
    from kvbm.router.server import Router

    r = Router(RouterConfig(instances=(parse_instance("http://127.0.0.1:1"),)))
    r.instances[0].healthy, r.instances[0].block_size = True, BS
    for prompt in ([-1, 2, 3, 4], [2**40] * 4, [1, 2, 3, 4]):
        (est,) = r.rank(prompt, set())
        assert est.slot == 0 and est.cached_tokens == 0
