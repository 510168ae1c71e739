"""Property tests of the block index and the eviction policies under any sequence of operations.

A hypothesis state machine drives a real ``BlockIndex`` (one tier, a few slots, each policy)
with prepare_store / complete_store (ok or failed) / prepare_load / complete_load / remove /
evict / lookup over a small universe of keys, legal or not, and checks after every step:

- ``validate()`` passes and the tier never holds more blocks than it has slots;
- every block's state and pins agree with a plain Python model of the state machine;
- pinned (loading) and in-flight (storing) blocks are never evicted, and an eviction only
  happens when a store needs the room or ``evict`` asks for it;
- ``lookup``'s hit count is the leading run of Ready blocks in the model;
- an illegal transition raises the documented error and changes nothing (states, pins, slots,
  access stats, tier occupancy).

A second machine drives a bare ``EvictionPolicy``: the victim is always present and unpinned,
and -1 exactly when everything present is pinned.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvbm
from kvbm import _native
from kvbm.errors import BlockNotFoundError, CapacityError, StateError

HOST = 1
N_KEYS = 10
POLICIES = kvbm.eviction_policies()
EXAMPLES = int(os.environ.get("KVBM_PROPERTY_EXAMPLES", "300"))

keys_st = st.integers(0, N_KEYS - 1)
chain_st = st.lists(keys_st, min_size=1, max_size=6, unique=True)


def k(i: int) -> bytes:
    return (i + 1).to_bytes(8, "little") * 2


def index_machine(policy: str) -> type[RuleBasedStateMachine]:
    class IndexMachine(RuleBasedStateMachine):
        @initialize(slots=st.integers(1, 6))
        def setup(self, slots: int) -> None:
            self.slots = slots
            self.ix = _native.BlockIndex(4)
            self.ix.configure_tier(HOST, slots, 8, policy)
            self.state: dict[int, str] = {}  # key -> "storing" | "ready" (absent = missing)
            self.pins: dict[int, int] = {}
            self.draining: set[int] = set()  # slots of held evictions (Note [Slot lifetime])

        # ---- helpers -----------------------------------------------------------------------
        def snapshot(self) -> tuple:
            return ([self.ix.get(k(i)) for i in range(N_KEYS)], self.ix.tier_info(HOST), len(self.ix))

        def expect_unchanged(self, exc: type[BaseException], fn, *args) -> None:  # type: ignore[no-untyped-def]
            before = self.snapshot()
            with pytest.raises(exc):
                fn(*args)
            assert self.snapshot() == before

        def evictable(self, exclude: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
            return [i for i, s in self.state.items() if s == "ready" and not self.pins.get(i) and i not in exclude]

        def check_evicted(self, evicted: list, exclude: set[int] = frozenset()) -> None:  # type: ignore[assignment]
            allowed = set(self.evictable(exclude))
            for e in evicted:
                i = int.from_bytes(e[0][:8], "little") - 1
                assert i in allowed, f"evicted block {i} was pinned, in flight, absent or in the batch"
                allowed.discard(i)
                del self.state[i]

        # ---- stores ------------------------------------------------------------------------
        @rule(chain=chain_st)
        def prepare_store(self, chain: list[int]) -> None:
            batch = set(chain)
            need = [i for i in chain if i not in self.state]
            free = self.slots - len(self.state) - len(self.draining)
            if len(need) > free + len(self.evictable(batch)):
                self.expect_unchanged(CapacityError, self.ix.prepare_store, HOST, [k(i) for i in chain])
                return
            slots, evicted = self.ix.prepare_store(HOST, [k(i) for i in chain])
            assert [s >= 0 for s in slots.tolist()] == [i not in self.state for i in chain]
            assert all(0 <= s < self.slots and s not in self.draining for s in slots.tolist() if s >= 0)
            assert len(evicted) == max(0, len(need) - free)  # evict only what the store needs
            self.check_evicted(evicted, batch)
            for i in need:
                self.state[i] = "storing"

        @rule(data=st.data())
        def complete_store(self, data: st.DataObject) -> None:
            storing = sorted(i for i, s in self.state.items() if s == "storing")
            if not storing:
                return
            chosen = data.draw(st.lists(st.sampled_from(storing), min_size=1, unique=True))
            ok = data.draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
            self.ix.complete_store(HOST, [k(i) for i in chosen], [int(b) for b in ok])
            for i, good in zip(chosen, ok):
                if good:
                    self.state[i] = "ready"
                else:
                    del self.state[i]

        @rule(i=keys_st)
        def complete_store_not_storing(self, i: int) -> None:
            if self.state.get(i) == "storing":
                return
            self.expect_unchanged(StateError, self.ix.complete_store, HOST, [k(i)])

        # ---- loads -------------------------------------------------------------------------
        @rule(chain=chain_st)
        def prepare_load(self, chain: list[int]) -> None:
            for i in chain:
                if i not in self.state:
                    self.expect_unchanged(BlockNotFoundError, self.ix.prepare_load, HOST, [k(j) for j in chain])
                    return
                if self.state[i] == "storing":
                    self.expect_unchanged(StateError, self.ix.prepare_load, HOST, [k(j) for j in chain])
                    return
            slots = self.ix.prepare_load(HOST, [k(i) for i in chain])
            assert all(0 <= s < self.slots for s in slots.tolist())
            for i in chain:
                self.pins[i] = self.pins.get(i, 0) + 1

        @rule(chain=chain_st)
        def complete_load(self, chain: list[int]) -> None:
            if any(not self.pins.get(i) for i in chain):
                self.expect_unchanged(StateError, self.ix.complete_load, HOST, [k(i) for i in chain])
                return
            self.ix.complete_load(HOST, [k(i) for i in chain])
            for i in chain:
                self.pins[i] -= 1
                if not self.pins[i]:
                    del self.pins[i]

        # ---- removal and eviction ----------------------------------------------------------
        @rule(chain=chain_st, ignore_missing=st.booleans())
        def remove(self, chain: list[int], ignore_missing: bool) -> None:
            for i in chain:
                s = self.state.get(i)
                if s is None and not ignore_missing:
                    self.expect_unchanged(BlockNotFoundError, self.ix.remove, HOST, [k(j) for j in chain], False)
                    return
                if s == "storing" or self.pins.get(i):
                    self.expect_unchanged(StateError, self.ix.remove, HOST, [k(j) for j in chain], ignore_missing)
                    return
            removed = self.ix.remove(HOST, [k(i) for i in chain], ignore_missing)
            assert sorted(int.from_bytes(e[0][:8], "little") - 1 for e in removed) == sorted(
                i for i in chain if i in self.state
            )
            for i in chain:
                self.state.pop(i, None)

        @rule(count=st.integers(0, 4), hold=st.booleans())
        def evict(self, count: int, hold: bool) -> None:
            expected = min(count, len(self.evictable()))
            evicted = self.ix.evict(HOST, count, hold=hold)
            assert len(evicted) == expected
            self.check_evicted(evicted)
            if hold:
                self.draining |= {int(e[2]) for e in evicted}

        @rule(data=st.data())
        def release_slots(self, data: st.DataObject) -> None:
            if self.draining and data.draw(st.booleans()):
                chosen = data.draw(st.lists(st.sampled_from(sorted(self.draining)), min_size=1, unique=True))
                self.ix.release_slots(HOST, chosen)
                self.draining -= set(chosen)
                return
            s = data.draw(st.integers(0, self.slots - 1))
            if s not in self.draining:
                self.expect_unchanged(StateError, self.ix.release_slots, HOST, [s])

        # ---- lookups -----------------------------------------------------------------------
        @rule(chain=st.lists(keys_st, min_size=1, max_size=8))
        def lookup(self, chain: list[int]) -> None:
            run = 0
            while run < len(chain) and self.state.get(chain[run]) == "ready":
                run += 1
            hits, tiers = self.ix.lookup([k(i) for i in chain])
            assert hits == run
            assert tiers.tolist() == [HOST] * run + [255] * (len(chain) - run)

        # ---- invariants --------------------------------------------------------------------
        @invariant()
        def consistent(self) -> None:
            self.ix.validate()
            info = self.ix.tier_info(HOST)
            assert info["used_slots"] == len(self.state) <= self.slots
            assert info["pinned_slots"] == len(self.pins)
            assert info["draining_slots"] == len(self.draining)
            assert len(self.ix) == len(self.state)
            for i in range(N_KEYS):
                e = self.ix.get(k(i))
                if i not in self.state:
                    assert e is None
                else:
                    assert e["state"][HOST] == self.state[i]
                    assert e["pins"][HOST] == self.pins.get(i, 0)

    IndexMachine.__name__ = f"IndexMachine_{policy}"
    return IndexMachine


def policy_machine(policy: str) -> type[RuleBasedStateMachine]:
    cap = 8

    class PolicyMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.p = _native.EvictionPolicy(policy, cap)
            self.present: dict[int, bool] = {}  # id -> pinned

        @rule(data=st.data())
        def insert(self, data: st.DataObject) -> None:
            absent = [i for i in range(cap) if i not in self.present]
            if not absent:
                return
            i = data.draw(st.sampled_from(absent))
            parent = data.draw(st.sampled_from([-1, *sorted(self.present)]))
            # Few fingerprints, so policies with a history of evicted blocks see returns and
            # collisions (0 = unknown, 2**64 - 1 has every tag bit set).
            fp = data.draw(st.sampled_from([0, 1, 2, 3, 0xABC0_0000_0000_0001, 2**64 - 1]))
            self.p.insert(i, parent, fp)
            self.present[i] = False

        def pick(self, data: st.DataObject) -> int | None:
            return data.draw(st.sampled_from(sorted(self.present))) if self.present else None

        @rule(data=st.data())
        def touch(self, data: st.DataObject) -> None:
            i = self.pick(data)
            if i is not None:
                self.p.touch(i)

        @rule(data=st.data())
        def remove(self, data: st.DataObject) -> None:
            i = self.pick(data)
            if i is not None:
                self.p.remove(i)
                del self.present[i]

        @rule(data=st.data(), pinned=st.booleans())
        def set_pinned(self, data: st.DataObject, pinned: bool) -> None:
            i = self.pick(data)
            if i is not None:
                self.p.set_pinned(i, pinned)
                self.present[i] = pinned

        @rule()
        def evict_one(self) -> None:
            v = self.p.victim()
            if v >= 0:
                self.p.remove(v)
                del self.present[v]

        @invariant()
        def victim_is_legal(self) -> None:
            v = self.p.victim()
            unpinned = [i for i, pinned in self.present.items() if not pinned]
            if unpinned:
                assert v in unpinned
            else:
                assert v == -1
            assert len(self.p) == len(self.present)

    PolicyMachine.__name__ = f"PolicyMachine_{policy}"
    return PolicyMachine


_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("policy", POLICIES)
def test_index_state_machine(policy: str) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(index_machine(policy), settings=_SETTINGS)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_state_machine(policy: str) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(policy_machine(policy), settings=_SETTINGS)
