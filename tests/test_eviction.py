"""Eviction policies: through the bare policy (``kvbm._native.EvictionPolicy``) and through the
block index that drives them (lookups touch, stores insert with the parent's slot, loads pin)."""

from __future__ import annotations

import pytest

import kvbm
from kvbm import _native
from kvbm.errors import CapacityError, InvalidArgumentError, OutOfRangeError, StateError

HOST = 1
POLICIES = ["lru", "prefix_freq"]


def k(i: int) -> bytes:
    """A distinct 16-byte key for small integers (never the all-zero key)."""
    return (i + 1).to_bytes(8, "little") * 2


def make_index(slots: int, policy: str) -> _native.BlockIndex:
    ix = _native.BlockIndex(64)
    ix.configure_tier(HOST, slots, 1, policy)
    return ix


def store(ix: _native.BlockIndex, ids: list[int]) -> list[bytes]:
    """Store a chain (ids[i]'s parent is ids[i-1]); returns the evicted keys."""
    ks = [k(i) for i in ids]
    slots, evicted = ix.prepare_store(HOST, ks)
    ix.complete_store(HOST, [key for key, s in zip(ks, slots) if s >= 0])
    return [e[0] for e in evicted]


def present(ix: _native.BlockIndex, ids: list[int]) -> list[int]:
    return [i for i in ids if ix.get(k(i)) is not None and ix.get(k(i))["state"][HOST] == "ready"]


def drain(p: _native.EvictionPolicy) -> list[int]:
    """Evict everything evictable, in the policy's order."""
    out = []
    while (v := p.victim()) >= 0:
        out.append(v)
        p.remove(v)
    return out


# ---- registry -----------------------------------------------------------------------------------


def test_prefix_freq_is_the_default_policy() -> None:
    names = kvbm.eviction_policies()
    assert names[0] == "prefix_freq" and "lru" in names
    assert kvbm.KvbmConfig().eviction_policy == "prefix_freq"


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(InvalidArgumentError, match="known: prefix_freq, lru"):
        _native.EvictionPolicy("nope", 4)
    with pytest.raises(InvalidArgumentError, match="prefix_freq"):
        make_index(4, "nope")


# ---- contract, both policies --------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICIES)
def test_empty_and_all_pinned_give_no_victim(name: str) -> None:
    p = _native.EvictionPolicy(name, 4)
    assert p.name == name and p.victim() == -1 and len(p) == 0
    for i in range(3):
        p.insert(i, i - 1)
        p.set_pinned(i, True)
    assert len(p) == 3 and p.victim() == -1
    p.set_pinned(1, False)
    assert p.victim() == 1


@pytest.mark.parametrize("name", POLICIES)
def test_pinned_never_victims(name: str) -> None:
    p = _native.EvictionPolicy(name, 8)
    for i in range(8):
        p.insert(i, -1 if i % 3 == 0 else i - 1)
    for i in (0, 2, 5):
        p.set_pinned(i, True)
    order = drain(p)
    assert sorted(order) == [1, 3, 4, 6, 7]
    assert len(p) == 3


@pytest.mark.parametrize("name", POLICIES)
def test_removed_id_is_reusable_by_an_unrelated_block(name: str) -> None:
    p = _native.EvictionPolicy(name, 4)
    p.insert(0, -1)
    p.insert(1, 0)
    p.insert(2, 1)
    p.remove(0)  # 1 is now an orphan; 0 is free
    p.insert(0, -1)  # unrelated block in the same slot
    p.insert(3, 0)
    assert sorted(drain(p)) == [0, 1, 2, 3]
    assert len(p) == 0


@pytest.mark.parametrize("name", POLICIES)
def test_wrapper_rejects_misuse(name: str) -> None:
    p = _native.EvictionPolicy(name, 2)
    with pytest.raises(OutOfRangeError):
        p.insert(2)
    p.insert(0)
    with pytest.raises(StateError):
        p.insert(0)
    with pytest.raises(StateError):
        p.touch(1)
    with pytest.raises(InvalidArgumentError):
        p.insert(1, 1)


# ---- LRU ----------------------------------------------------------------------------------------


def test_lru_order() -> None:
    p = _native.EvictionPolicy("lru", 5)
    for i in range(5):
        p.insert(i, -1)
    p.touch(1)
    p.touch(0)
    p.set_pinned(2, True)
    p.set_pinned(2, False)  # unpin relinks as most recent
    assert drain(p) == [3, 4, 1, 0, 2]


@pytest.mark.parametrize("name", POLICIES)
def test_refused_store_leaves_eviction_order_alone(name: str) -> None:
    ix = make_index(2, name)
    store(ix, [0])
    store(ix, [1])
    with pytest.raises(CapacityError):
        ix.prepare_store(HOST, [k(0), k(2), k(3)])  # needs 2 slots, only block 1 is evictable
    ix.validate()
    assert ix.evict(HOST, 1)[0][0] == k(0)  # still the older one: the refused store touched nothing


def test_lru_index_evicts_least_recent_root_first() -> None:
    ix = make_index(3, "lru")
    store(ix, [0, 1, 2])
    assert ix.lookup([k(0), k(1), k(2)])[0] == 3
    # LRU evicts the chain's root, orphaning the rest: the prefix is lost.
    assert ix.evict(HOST, 1)[0][0] == k(0)
    assert ix.lookup([k(0), k(1), k(2)])[0] == 0


# ---- prefix_freq: prefix awareness --------------------------------------------------------------


def test_prefix_freq_evicts_leaves_before_interior() -> None:
    p = _native.EvictionPolicy("prefix_freq", 8)
    p.insert(0, -1)
    p.insert(1, 0)
    p.insert(2, 1)
    p.insert(3, 1)  # 1 has two children
    assert drain(p) == [2, 3, 1, 0]


def test_prefix_freq_chain_shrinks_from_its_tail_through_the_index() -> None:
    ix = make_index(4, "prefix_freq")
    store(ix, [0, 1, 2, 3])
    chain = [k(i) for i in range(4)]
    for expect_hits in (3, 2, 1, 0):
        ix.evict(HOST, 1)
        assert ix.lookup(chain)[0] == expect_hits  # always a valid prefix
        ix.validate()


def test_prefix_freq_evicts_orphans_first() -> None:
    p = _native.EvictionPolicy("prefix_freq", 8)
    p.insert(5, -1)  # the oldest block
    p.insert(0, -1)
    p.insert(1, 0)
    p.insert(2, 1)
    p.touch(0)
    p.touch(1)
    p.touch(2)
    p.remove(0)  # as if the root were removed: 1 (and through it 2) are useless now
    assert p.victim() == 1
    p.remove(1)
    assert p.victim() == 2
    p.remove(2)
    assert p.victim() == 5


def test_prefix_freq_orphans_first_through_the_index() -> None:
    for name, first in (("prefix_freq", [k(11), k(12)]), ("lru", [k(20)])):
        ix = make_index(8, name)
        store(ix, [20, 21])  # older, unrelated chain
        store(ix, [10, 11, 12])
        ix.lookup([k(10), k(11), k(12)])
        ix.remove(HOST, [k(10)])  # the chain's root goes
        got = [e[0] for e in ix.evict(HOST, len(first))]
        assert got == first, name
        ix.validate()


def test_prefix_freq_pinned_orphan_and_pinned_leaf() -> None:
    ix = make_index(4, "prefix_freq")
    store(ix, [0, 1, 2])
    ix.prepare_load(HOST, [k(2)])  # pin the leaf: the interior blocks must still be evictable
    got = [e[0] for e in ix.evict(HOST, 5)]
    assert sorted(got) == sorted([k(0), k(1)])
    assert present(ix, [0, 1, 2]) == [2]
    ix.complete_load(HOST, [k(2)])
    assert [e[0] for e in ix.evict(HOST, 5)] == [k(2)]
    ix.validate()


# ---- frequency: a one-off scan must not flush a hot prefix --------------------------------------


def scan_after_hot_prefix(policy: str) -> list[int]:
    ix = make_index(32, policy)
    hot = [0, 1, 2, 3]
    store(ix, hot)
    for _ in range(10):  # a hot prefix (a system prompt): re-used often
        assert ix.lookup([k(i) for i in hot])[0] == 4
    # Six one-off prompts of 8 blocks each: 48 blocks through 28 free slots.
    for r in range(6):
        store(ix, [100 + 10 * r + j for j in range(8)])
    ix.validate()
    return present(ix, hot)


def test_one_off_scan_does_not_flush_a_hot_prefix() -> None:
    assert scan_after_hot_prefix("prefix_freq") == [0, 1, 2, 3]
    assert scan_after_hot_prefix("lru") == []  # what the new policy fixes


def test_prefix_freq_reused_blocks_outlive_new_ones() -> None:
    p = _native.EvictionPolicy("prefix_freq", 8)
    p.insert(0, -1)
    p.touch(0)
    p.touch(0)  # re-used twice
    for i in range(1, 4):
        p.insert(i, -1)  # newer, seen once
    assert p.victim() == 1
    # Once idle long enough, even a re-used block goes.
    for i in range(4, 8):
        p.insert(i, -1)
    for i in range(1, 8):
        p.touch(i)
        p.touch(i)
    assert p.victim() == 0


def test_prefix_freq_beats_lru_on_the_trace_shape() -> None:
    """A small synthetic conversation workload: prefix_freq keeps at least LRU's hits."""
    import random

    rng = random.Random(7)
    system = list(range(4))
    convs: list[list[int]] = []
    next_id = 1000
    requests: list[list[int]] = []
    for _ in range(400):
        if convs and rng.random() < 0.5:
            c = rng.choice(convs)
            c.extend(range(next_id, next_id + 3))
            next_id += 3
            requests.append(list(c))
        else:
            c = system + list(range(next_id, next_id + rng.randint(2, 30)))
            next_id += 40
            convs.append(c)
            requests.append(list(c))
    hits = {}
    for name in POLICIES:
        ix = make_index(120, name)
        h = 0
        for r in requests:
            h += ix.lookup([k(i) for i in r])[0]
            store(ix, r[:120])
        ix.validate()
        hits[name] = h
    assert hits["prefix_freq"] >= hits["lru"]
