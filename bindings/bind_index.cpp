#include <string>
#include <vector>

#include "bindings/common.h"
#include "bindings/keys.h"
#include "csrc/block_index.h"
#include "csrc/eviction.h"

namespace kvbm::bind {
namespace {

TierId tier_arg(int t) {
  if (t < 0 || t >= kNumTiers) fail(Code::kInvalidArgument, "tier must be 0 (gpu), 1 (host), 2 (disk) or 3 (remote), got " + std::to_string(t));
  return static_cast<TierId>(t);
}

py::list evicted_list(const std::vector<EvictedBlock>& ev) {
  py::list out;
  for (const auto& e : ev)
    out.append(py::make_tuple(key_bytes(e.key), key_bytes(e.parent), e.slot,
                              e.has_checksum ? py::object(py::int_(e.checksum)) : py::object(py::none())));
  return out;
}

py::array_t<int64_t> slots_array(const std::vector<uint32_t>& slots) {
  py::array_t<int64_t> out(slots.size());
  auto* p = out.mutable_data();
  for (size_t i = 0; i < slots.size(); ++i) p[i] = slots[i] == kNoSlot ? -1 : static_cast<int64_t>(slots[i]);
  return out;
}

py::dict counters_dict(const TierCounters& c) {
  py::dict d;
  d["lookups"] = c.lookups;
  d["hits"] = c.hits;
  d["misses"] = c.misses;
  d["stores"] = c.stores;
  d["store_failures"] = c.store_failures;
  d["loads"] = c.loads;
  d["evictions"] = c.evictions;
  d["removals"] = c.removals;
  d["bytes_stored"] = c.bytes_stored;
  d["bytes_loaded"] = c.bytes_loaded;
  d["checksum_failures"] = c.checksum_failures;
  return d;
}

}  // namespace
}  // namespace kvbm::bind

KVBM_BINDINGS(index, 10) {
  using namespace kvbm;
  using namespace kvbm::bind;
  m.attr("NO_TIER") = kNoTier;
  m.def("eviction_policy_names", &eviction_policy_names, "Names of the eviction policies (first = default).");

  py::class_<BlockIndex>(m, "BlockIndex", "Hash -> block entry index with per-tier slot bookkeeping.")
      .def(py::init<uint32_t>(), py::arg("initial_capacity") = 1024)
      .def("configure_tier",
           [](BlockIndex& self, int tier, uint32_t num_slots, uint64_t slot_bytes, const std::string& policy) {
             check(self.configure_tier(tier_arg(tier), num_slots, slot_bytes, policy));
           },
           py::arg("tier"), py::arg("num_slots"), py::arg("slot_bytes"), py::arg("policy"))
      .def("lookup_into",
           [](BlockIndex& self, py::handle keys, py::array_t<uint8_t, py::array::c_style> out) {
             Keys k = get_keys(keys);
             if (static_cast<size_t>(out.size()) < k.n)
               fail(Code::kInvalidArgument, "lookup_into: tiers_out has " + std::to_string(out.size()) +
                                                " elements, need " + std::to_string(k.n));
             uint8_t* o = out.mutable_data();
             py::gil_scoped_release nogil;
             return self.lookup(k.data, k.n, o);
           },
           py::arg("hashes"), py::arg("tiers_out"),
           "Longest cached prefix; writes the tier of each hit block into tiers_out (no allocation).")
      .def("lookup",
           [](BlockIndex& self, py::handle keys) {
             Keys k = get_keys(keys);
             py::array_t<uint8_t> out(k.n);
             uint8_t* o = out.mutable_data();
             size_t hits;
             {
               py::gil_scoped_release nogil;
               hits = self.lookup(k.data, k.n, o);
             }
             return py::make_tuple(hits, out);
           },
           py::arg("hashes"))
      .def("peek",
           [](const BlockIndex& self, py::handle keys) {
             Keys k = get_keys(keys);
             py::array_t<uint8_t> out(k.n);
             size_t hits = self.peek(k.data, k.n, out.mutable_data());
             return py::make_tuple(hits, out);
           },
           py::arg("hashes"))
      .def("prepare_store",
           [](BlockIndex& self, int tier, py::handle keys, py::handle first_parent) {
             Keys k = get_keys(keys);
             Hash128 parent = get_key(first_parent, "parent");
             std::vector<uint32_t> slots(k.n);
             std::vector<EvictedBlock> ev;
             {
               py::gil_scoped_release nogil;
               Status st = self.prepare_store(tier_arg(tier), k.data, k.n, parent, slots.data(), &ev);
               if (!st.ok()) {
                 py::gil_scoped_acquire g;
                 check(st);
               }
             }
             return py::make_tuple(slots_array(slots), evicted_list(ev));
           },
           py::arg("tier"), py::arg("hashes"), py::arg("parent") = py::none())
      .def("complete_store",
           [](BlockIndex& self, int tier, py::handle keys, py::object ok, py::object checksums) {
             Keys k = get_keys(keys);
             std::vector<uint8_t> okv;
             std::vector<uint32_t> crc;
             if (!ok.is_none()) {
               auto a = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(ok);
               if (!a || static_cast<size_t>(a.size()) != k.n)
                 fail(Code::kInvalidArgument, "complete_store: ok must have one flag per hash");
               okv.assign(a.data(), a.data() + k.n);
             }
             if (!checksums.is_none()) {
               auto a = py::array_t<uint32_t, py::array::c_style | py::array::forcecast>::ensure(checksums);
               if (!a || static_cast<size_t>(a.size()) != k.n)
                 fail(Code::kInvalidArgument, "complete_store: checksums must have one value per hash");
               crc.assign(a.data(), a.data() + k.n);
             }
             check(self.complete_store(tier_arg(tier), k.data, k.n, okv.empty() ? nullptr : okv.data(),
                                       crc.empty() ? nullptr : crc.data()));
           },
           py::arg("tier"), py::arg("hashes"), py::arg("ok") = py::none(), py::arg("checksums") = py::none())
      .def("restore",
           [](BlockIndex& self, int tier, py::handle key, py::handle parent, uint32_t slot, py::object checksum) {
             bool has = !checksum.is_none();
             check(self.restore(tier_arg(tier), get_key(key, "hash"), get_key(parent, "parent"), slot,
                                has ? checksum.cast<uint32_t>() : 0, has));
           },
           py::arg("tier"), py::arg("hash"), py::arg("parent"), py::arg("slot"), py::arg("checksum") = py::none())
      .def("prepare_load",
           [](BlockIndex& self, int tier, py::handle keys) {
             Keys k = get_keys(keys);
             std::vector<uint32_t> slots(k.n);
             check(self.prepare_load(tier_arg(tier), k.data, k.n, slots.data()));
             return slots_array(slots);
           },
           py::arg("tier"), py::arg("hashes"))
      .def("complete_load",
           [](BlockIndex& self, int tier, py::handle keys) {
             Keys k = get_keys(keys);
             check(self.complete_load(tier_arg(tier), k.data, k.n));
           },
           py::arg("tier"), py::arg("hashes"))
      .def("remove",
           [](BlockIndex& self, int tier, py::handle keys, bool ignore_missing) {
             Keys k = get_keys(keys);
             std::vector<EvictedBlock> ev;
             check(self.remove(tier_arg(tier), k.data, k.n, ignore_missing, &ev));
             return evicted_list(ev);
           },
           py::arg("tier"), py::arg("hashes"), py::arg("ignore_missing") = false)
      .def("evict",
           [](BlockIndex& self, int tier, size_t count, bool hold) {
             std::vector<EvictedBlock> ev;
             self.evict(tier_arg(tier), count, &ev, hold);
             return evicted_list(ev);
           },
           py::arg("tier"), py::arg("count"), py::arg("hold") = false,
           "Evict up to count blocks. hold=True keeps their slots draining (not reusable) until "
           "release_slots() says the copies out of them are done (Note [Slot lifetime]).")
      .def("release_slots",
           [](BlockIndex& self, int tier, py::handle slots) {
             auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(slots);
             if (!a || a.ndim() != 1) fail(Code::kInvalidArgument, "release_slots: slots must be a 1-d sequence of ints");
             std::vector<uint32_t> v(static_cast<size_t>(a.size()));
             for (size_t i = 0; i < v.size(); ++i) {
               int64_t s = a.data()[i];
               if (s < 0 || s >= static_cast<int64_t>(kNoSlot))
                 fail(Code::kInvalidArgument, "release_slots: slot " + std::to_string(s) + " is out of range");
               v[i] = static_cast<uint32_t>(s);
             }
             check(self.release_slots(tier_arg(tier), v.data(), v.size()));
           },
           py::arg("tier"), py::arg("slots"),
           "Return draining slots (from evict(hold=True)) to the free list once copies out of them ended.")
      .def("set_checksum",
           [](BlockIndex& self, py::handle key, uint32_t crc) { check(self.set_checksum(get_key(key, "hash"), crc)); },
           py::arg("hash"), py::arg("checksum"))
      .def("count_checksum_failure",
           [](BlockIndex& self, int tier, uint64_t n) { self.count_checksum_failure(tier_arg(tier), n); },
           py::arg("tier"), py::arg("n") = 1)
      .def("get",
           [](const BlockIndex& self, py::handle key) -> py::object {
             EntryInfo e = self.get(get_key(key, "hash"));
             if (!e.found) return py::none();
             py::dict d;
             d["hash"] = key_bytes(e.key);
             d["parent"] = key_bytes(e.parent);
             py::list states, pins, slots;
             for (int t = 0; t < kNumTiers; ++t) {
               states.append(state_name(static_cast<BlockState>(e.state[t])));
               pins.append(e.pins[t]);
               slots.append(e.slot[t] == kNoSlot ? py::object(py::none()) : py::object(py::int_(e.slot[t])));
             }
             d["state"] = states;
             d["pins"] = pins;
             d["slot"] = slots;
             d["checksum"] = e.has_checksum ? py::object(py::int_(e.checksum)) : py::object(py::none());
             d["hits"] = e.hits;
             d["last_access"] = e.last_access;
             return d;
           },
           py::arg("hash"))
      .def("tier_info",
           [](const BlockIndex& self, int tier) {
             TierInfo i = self.tier_info(tier_arg(tier));
             py::dict d;
             d["enabled"] = i.enabled;
             d["num_slots"] = i.num_slots;
             d["slot_bytes"] = i.slot_bytes;
             d["used_slots"] = i.used_slots;
             d["pinned_slots"] = i.pinned_slots;
             d["draining_slots"] = i.draining_slots;
             d["policy"] = i.policy;
             return d;
           },
           py::arg("tier"))
      .def("counters", [](const BlockIndex& self, int tier) { return counters_dict(self.counters(tier_arg(tier))); },
           py::arg("tier"))
      .def("__len__", &BlockIndex::size)
      .def_property_readonly("memory_bytes", &BlockIndex::memory_bytes)
      .def("validate", [](const BlockIndex& self) { check(self.validate()); },
           "Check every invariant; raises InternalError naming the first violation.");

  // A bare policy over dense ids, for tests and for tiers that keep their own bookkeeping.
  // The wrapper enforces the policy contract so Python misuse raises instead of corrupting.
  struct PyPolicy {
    std::unique_ptr<EvictionPolicy> p;
    uint32_t cap;
    std::vector<uint8_t> present;  // 0 absent, 1 present, 2 present+pinned
    void need(uint32_t id, bool want_present) const {
      if (id >= cap) fail(Code::kOutOfRange, "policy id " + std::to_string(id) + " >= capacity " + std::to_string(cap));
      if ((present[id] != 0) != want_present)
        fail(Code::kIllegalTransition, "policy id " + std::to_string(id) + (want_present ? " is not present" : " is already present"));
    }
  };
  py::class_<PyPolicy>(m, "EvictionPolicy", "An eviction policy over ids 0..capacity-1.")
      .def(py::init([](const std::string& name, uint32_t capacity) {
             if (capacity == 0) fail(Code::kInvalidArgument, "policy capacity must be positive");
             return PyPolicy{check(make_policy(name, capacity)), capacity, std::vector<uint8_t>(capacity, 0)};
           }),
           py::arg("name"), py::arg("capacity"))
      .def_property_readonly("name", [](const PyPolicy& s) { return std::string(s.p->name()); })
      .def("insert",
           [](PyPolicy& s, uint32_t id, int64_t parent, uint64_t fingerprint) {
             s.need(id, false);
             if (parent >= static_cast<int64_t>(s.cap) || parent < -1 || parent == static_cast<int64_t>(id))
               fail(Code::kInvalidArgument, "parent id " + std::to_string(parent) + " is invalid");
             if (parent >= 0 && s.present[parent] == 0) parent = -1;
             s.present[id] = 1;
             s.p->insert(id, parent, fingerprint);
           },
           py::arg("id"), py::arg("parent") = -1, py::arg("fingerprint") = 0,
           "A block now occupies `id` (parent: its parent's id or -1; fingerprint: of its hash, 0 = unknown).")
      .def("touch", [](PyPolicy& s, uint32_t id) { s.need(id, true); s.p->touch(id); }, py::arg("id"))
      .def("remove", [](PyPolicy& s, uint32_t id) { s.need(id, true); s.present[id] = 0; s.p->remove(id); }, py::arg("id"))
      .def("set_pinned",
           [](PyPolicy& s, uint32_t id, bool pinned) {
             s.need(id, true);
             s.present[id] = pinned ? 2 : 1;
             s.p->set_pinned(id, pinned);
           },
           py::arg("id"), py::arg("pinned"))
      .def("victim", [](PyPolicy& s) { return s.p->victim(); }, "Next victim id, or -1 when nothing is evictable.")
      .def("__len__", [](const PyPolicy& s) { return s.p->size(); });
}
