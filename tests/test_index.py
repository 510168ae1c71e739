"""The native block index: state machine, slots, lookups, stats."""

from __future__ import annotations

import os

import numpy as np
import pytest

import kvbm
from kvbm import _native
from kvbm.errors import BlockNotFoundError, CapacityError, InvalidArgumentError, OutOfRangeError, StateError

HOST = 1
DISK = 2


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def make_index(slots: int = 8, policy: str = "lru") -> _native.BlockIndex:
    ix = _native.BlockIndex(16)
    ix.configure_tier(HOST, slots, 64, policy)
    return ix


def test_store_lookup_chain_prefix() -> None:
    ix = make_index()
    ks = keys(5)
    slots, evicted = ix.prepare_store(HOST, ks[:3])
    assert sorted(slots.tolist()) == [0, 1, 2] and evicted == []
    # Storing blocks are invisible to lookups.
    assert ix.lookup(ks)[0] == 0
    ix.complete_store(HOST, ks[:3])
    n, tiers = ix.lookup(ks)
    assert n == 3
    assert tiers.tolist() == [HOST, HOST, HOST, 255, 255]
    # A gap stops the prefix even if later blocks exist.
    ix.remove(HOST, [ks[1]])
    assert ix.lookup(ks)[0] == 1
    ix.validate()


def test_lookup_into_reuses_buffer_and_rejects_short_one() -> None:
    ix = make_index()
    ks = keys(4)
    ix.prepare_store(HOST, ks)
    ix.complete_store(HOST, ks)
    out = np.zeros(4, np.uint8)
    assert ix.lookup_into(ks, out) == 4 and (out == HOST).all()
    with pytest.raises(InvalidArgumentError, match="tiers_out"):
        ix.lookup_into(ks, np.zeros(2, np.uint8))


def test_keys_as_array_and_bad_keys() -> None:
    ix = make_index()
    arr = np.frombuffer(os.urandom(16 * 3), np.uint8).reshape(3, 16).copy()
    ix.prepare_store(HOST, arr)
    ix.complete_store(HOST, arr)
    assert ix.lookup(arr)[0] == 3
    assert ix.lookup([bytes(arr[0]), bytes(arr[1])])[0] == 2
    with pytest.raises(InvalidArgumentError, match="16 bytes"):
        ix.lookup([b"short"])
    with pytest.raises(InvalidArgumentError):
        ix.lookup(np.zeros((2, 8), np.uint8))


def test_illegal_transitions_raise_and_change_nothing() -> None:
    ix = make_index()
    a, b = keys(2)
    with pytest.raises(StateError, match="not storing"):
        ix.complete_store(HOST, [a])
    ix.prepare_store(HOST, [a])
    with pytest.raises(StateError, match="still storing"):
        ix.prepare_load(HOST, [a])
    with pytest.raises(StateError, match="still storing"):
        ix.remove(HOST, [a])
    ix.complete_store(HOST, [a])
    with pytest.raises(StateError):
        ix.complete_store(HOST, [a])
    with pytest.raises(StateError, match="not pinned"):
        ix.complete_load(HOST, [a])
    with pytest.raises(BlockNotFoundError):
        ix.prepare_load(HOST, [b])
    # all-or-nothing: a batch with one bad key pins nothing
    with pytest.raises(BlockNotFoundError):
        ix.prepare_load(HOST, [a, b])
    assert ix.get(a)["pins"][HOST] == 0
    ix.prepare_load(HOST, [a])
    with pytest.raises(StateError, match="pinned"):
        ix.remove(HOST, [a])
    ix.complete_load(HOST, [a])
    ix.remove(HOST, [a])
    assert ix.get(a) is None
    ix.validate()


def test_failed_store_frees_slot() -> None:
    ix = make_index(slots=2)
    ks = keys(2)
    slots, _ = ix.prepare_store(HOST, ks)
    ix.complete_store(HOST, ks, ok=np.array([1, 0], np.uint8))
    assert ix.lookup(ks)[0] == 1
    assert ix.tier_info(HOST)["used_slots"] == 1
    assert ix.counters(HOST)["store_failures"] == 1
    ix.validate()


def test_capacity_never_exceeded_and_pins_protect() -> None:
    ix = make_index(slots=3)
    ks = keys(3)
    ix.prepare_store(HOST, ks)
    ix.complete_store(HOST, ks)
    ix.prepare_load(HOST, ks)  # all pinned
    more = keys(1)
    with pytest.raises(CapacityError, match="pinned"):
        ix.prepare_store(HOST, more)
    assert ix.get(more[0]) is None  # nothing changed
    ix.complete_load(HOST, ks[:1])
    slots, evicted = ix.prepare_store(HOST, more)
    assert [e[0] for e in evicted] == [ks[0]]
    assert slots.tolist() == [evicted[0][2]]
    ix.complete_store(HOST, more)
    assert ix.tier_info(HOST)["used_slots"] == 3
    ix.validate()


def test_in_flight_blocks_are_not_evicted() -> None:
    ix = make_index(slots=2)
    ks = keys(2)
    ix.prepare_store(HOST, ks)  # both Storing
    with pytest.raises(CapacityError, match="in flight"):
        ix.prepare_store(HOST, keys(1))
    ix.validate()


def test_duplicate_keys_in_one_batch_get_one_slot() -> None:
    ix = make_index()
    a = keys(1)[0]
    slots, _ = ix.prepare_store(HOST, [a, a])
    assert (slots >= 0).sum() == 1
    ix.complete_store(HOST, [a, a])
    assert ix.tier_info(HOST)["used_slots"] == 1
    ix.validate()


def test_lru_order_and_counters() -> None:
    ix = make_index(slots=3)
    ks = keys(4)
    for k in ks[:3]:
        ix.prepare_store(HOST, [k])
        ix.complete_store(HOST, [k])
    ix.lookup([ks[0]])  # ks[0] becomes most recent; ks[1] is least recent
    _, evicted = ix.prepare_store(HOST, [ks[3]])
    assert evicted[0][0] == ks[1]
    c = ix.counters(HOST)
    assert c["evictions"] == 1 and c["stores"] == 3 and c["hits"] == 1


def test_restore_and_multiple_tiers() -> None:
    ix = make_index(slots=4)
    ix.configure_tier(DISK, 10, 128, "lru")
    a, b = keys(2)
    ix.restore(DISK, a, None, 7, checksum=1234)
    ix.restore(DISK, b, a, 3)
    assert ix.lookup([a, b])[1].tolist() == [DISK, DISK]
    with pytest.raises(kvbm.errors.AlreadyExistsError):
        ix.restore(DISK, keys(1)[0], None, 7)
    with pytest.raises(OutOfRangeError):
        ix.restore(DISK, keys(1)[0], None, 10)
    # a block in both tiers is served from the faster one
    ix.prepare_store(HOST, [a])
    ix.complete_store(HOST, [a])
    assert ix.lookup([a, b])[1].tolist() == [HOST, DISK]
    info = ix.get(a)
    assert info["state"][HOST] == "ready" and info["state"][DISK] == "ready" and info["checksum"] == 1234
    # allocation after restore never hands out a restored slot
    ks = keys(8)
    slots, _ = ix.prepare_store(DISK, ks)
    assert 7 not in slots.tolist() and 3 not in slots.tolist()
    ix.validate()


def test_bad_tier_and_policy() -> None:
    ix = _native.BlockIndex()
    with pytest.raises(InvalidArgumentError, match="not configured"):
        ix.lookup(keys(1)) and ix.prepare_store(HOST, keys(1))
    with pytest.raises(InvalidArgumentError, match="not configured"):
        ix.prepare_store(HOST, keys(1))
    with pytest.raises(InvalidArgumentError, match="unknown eviction policy 'nope'"):
        ix.configure_tier(HOST, 4, 64, "nope")
    with pytest.raises(InvalidArgumentError, match="tier must be"):
        ix.prepare_store(9, keys(1))
    with pytest.raises(InvalidArgumentError, match="slots"):
        ix.configure_tier(HOST, 0, 64, "lru")


def test_table_growth_and_deletion_churn() -> None:
    ix = _native.BlockIndex(4)
    ix.configure_tier(HOST, 5000, 1, "lru")
    rng = np.random.default_rng(1)
    live: set[bytes] = set()
    pool = keys(8000)
    for step in range(40):
        batch = [pool[i] for i in rng.choice(len(pool), 200, replace=False)]
        slots, _ = ix.prepare_store(HOST, batch)
        ix.complete_store(HOST, [k for k, s in zip(batch, slots) if s >= 0])
        live.update(batch)
        drop = batch[:50]
        ix.remove(HOST, drop, ignore_missing=True)
        live.difference_update(drop)
        if step % 10 == 0:
            ix.validate()
    ix.validate()
    present = sum(ix.peek([k])[0] for k in pool)
    assert present == len(ix) <= 5000


def test_held_evictions_drain_before_their_slots_are_reused() -> None:
    """Note [Slot lifetime]: evict(hold=True) keeps slots out of the free list until released."""
    ix = make_index(4)
    ks = keys(6)
    slots, _ = ix.prepare_store(HOST, ks[:4])
    ix.complete_store(HOST, ks[:4])
    ev = ix.evict(HOST, 2, hold=True)
    held = sorted(e[2] for e in ev)
    assert len(held) == 2 and ix.tier_info(HOST)["draining_slots"] == 2
    ix.validate()
    # two free-looking slots, but both are still being copied out of: no store may have them
    with pytest.raises(CapacityError, match="2 draining"):
        ix.prepare_store(HOST, ks[4:6] + keys(2))
    got, ev2 = ix.prepare_store(HOST, ks[4:5])  # room only by evicting a Ready block
    assert int(got[0]) not in held and len(ev2) == 1
    ix.complete_store(HOST, ks[4:5])
    with pytest.raises(StateError):
        ix.release_slots(HOST, [int(got[0])])  # not draining: refused, nothing changes
    ix.release_slots(HOST, held)
    assert ix.tier_info(HOST)["draining_slots"] == 0
    ix.validate()
    again, _ = ix.prepare_store(HOST, ks[5:6])
    assert int(again[0]) in held
    with pytest.raises(StateError):
        ix.release_slots(HOST, held)  # twice: refused
    with pytest.raises(InvalidArgumentError):
        ix.release_slots(HOST, [-1])
    ix.validate()
