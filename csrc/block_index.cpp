#include "csrc/block_index.h"

#include <algorithm>
#include <cstdio>
#include <unordered_set>

namespace kvbm {

const char* tier_name(TierId t) {
  switch (t) {
    case TierId::kGpu: return "gpu";
    case TierId::kHost: return "host";
    case TierId::kDisk: return "disk";
    case TierId::kRemote: return "remote";
  }
  return "?";
}

const char* state_name(BlockState s) {
  switch (s) {
    case BlockState::kAbsent: return "absent";
    case BlockState::kStoring: return "storing";
    case BlockState::kReady: return "ready";
  }
  return "?";
}

namespace {

std::string hex(Hash128 k) {
  uint8_t b[16];
  k.to_bytes(b);
  char out[33];
  for (int i = 0; i < 16; ++i) std::snprintf(out + 2 * i, 3, "%02x", b[i]);
  return std::string(out, 32);
}

struct Hash128Hasher {
  size_t operator()(const Hash128& h) const { return static_cast<size_t>(h.lo ^ (h.hi * 0x9E3779B97F4A7C15ull)); }
};

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 1); }

// The 64-bit fingerprint a policy gets for a block (Note [Block fingerprints] in eviction.h).
// Keys are well mixed, but fold both halves in (multiplied, so equal halves do not cancel).
inline uint64_t policy_fingerprint(const Hash128& key) { return key.lo ^ (key.hi * 0x9E3779B97F4A7C15ull); }

constexpr uint8_t kAbsent = static_cast<uint8_t>(BlockState::kAbsent);
constexpr uint8_t kStoring = static_cast<uint8_t>(BlockState::kStoring);
constexpr uint8_t kReady = static_cast<uint8_t>(BlockState::kReady);

}  // namespace

BlockIndex::BlockIndex(uint32_t initial_capacity) {
  size_t buckets = 16;
  while (buckets * 3 / 4 < initial_capacity) buckets <<= 1;
  table_.assign(buckets, Bucket{kNoEntry, 0});
  mask_ = buckets - 1;
  entries_.reserve(initial_capacity);
}

Status BlockIndex::check_tier(TierId tier) const {
  int t = static_cast<int>(tier);
  if (t < 0 || t >= kNumTiers) return InvalidArgument("tier id " + std::to_string(t) + " is not 0..3");
  if (!tiers_[t].enabled) return InvalidArgument(std::string("tier '") + tier_name(tier) + "' is not configured");
  return Status::Ok();
}

Status BlockIndex::configure_tier(TierId tier, uint32_t num_slots, uint64_t slot_bytes, const std::string& policy) {
  std::lock_guard<std::mutex> g(mu_);
  int t = static_cast<int>(tier);
  if (t < 0 || t >= kNumTiers) return InvalidArgument("tier id " + std::to_string(t) + " is not 0..3");
  TierBook& tb = tiers_[t];
  if (tb.enabled) return AlreadyExists(std::string("tier '") + tier_name(tier) + "' is already configured");
  if (num_slots == 0 || num_slots == kNoSlot)
    return InvalidArgument(std::string("tier '") + tier_name(tier) + "': number of slots must be in 1.." +
                           std::to_string(kNoSlot - 1) + ", got " + std::to_string(num_slots));
  auto p = make_policy(policy, num_slots);
  if (!p.ok()) return p.status();
  tb.policy = std::move(p.value());
  tb.num_slots = num_slots;
  tb.slot_bytes = slot_bytes;
  tb.slot_entry.assign(num_slots, kNoEntry);
  tb.readers.assign(num_slots, 0);
  tb.free_slots.resize(num_slots);
  for (uint32_t i = 0; i < num_slots; ++i) tb.free_slots[i] = num_slots - 1 - i;  // pop gives 0,1,2...
  tb.enabled = true;
  return Status::Ok();
}

// ---- hash table -------------------------------------------------------------------------------

uint32_t BlockIndex::find(Hash128 key) const {
  const uint32_t tag = static_cast<uint32_t>(key.hi >> 32);
  uint64_t i = key.lo & mask_;
  for (;;) {
    const Bucket& b = table_[i];
    if (b.entry == kNoEntry) return kNoEntry;
    if (b.tag == tag && entries_[b.entry].key == key) return b.entry;
    i = (i + 1) & mask_;
  }
}

uint32_t BlockIndex::alloc_entry() {
  if (free_entry_head_ != kNoEntry) {
    uint32_t id = free_entry_head_;
    free_entry_head_ = entries_[id].slot[0];
    return id;
  }
  entries_.emplace_back();
  return static_cast<uint32_t>(entries_.size() - 1);
}

void BlockIndex::grow_table() {
  decltype(table_) old;
  old.swap(table_);
  table_.assign(old.size() * 2, Bucket{kNoEntry, 0});
  mask_ = table_.size() - 1;
  for (const Bucket& b : old) {
    if (b.entry == kNoEntry) continue;
    uint64_t i = entries_[b.entry].key.lo & mask_;
    while (table_[i].entry != kNoEntry) i = (i + 1) & mask_;
    table_[i] = b;
  }
}

uint32_t BlockIndex::find_or_insert(Hash128 key, Hash128 parent, bool* inserted) {
  uint32_t id = find(key);
  if (id != kNoEntry) {
    *inserted = false;
    return id;
  }
  if ((size_ + 1) * 4 > table_.size() * 3) grow_table();
  id = alloc_entry();
  Entry& e = entries_[id];
  e = Entry{};
  e.key = key;
  e.parent = parent;
  for (int t = 0; t < kNumTiers; ++t) e.slot[t] = kNoSlot;
  e.in_use = 1;
  uint64_t i = key.lo & mask_;
  while (table_[i].entry != kNoEntry) i = (i + 1) & mask_;
  table_[i] = Bucket{id, static_cast<uint32_t>(key.hi >> 32)};
  ++size_;
  *inserted = true;
  return id;
}

void BlockIndex::erase_entry(uint32_t id) {
  const Hash128 key = entries_[id].key;
  uint64_t i = key.lo & mask_;
  while (table_[i].entry != id) i = (i + 1) & mask_;
  // Backward-shift deletion: pull later members of the probe run into the hole.
  uint64_t j = i;
  for (;;) {
    j = (j + 1) & mask_;
    if (table_[j].entry == kNoEntry) break;
    uint64_t home = entries_[table_[j].entry].key.lo & mask_;
    bool between = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
    if (!between) {
      table_[i] = table_[j];
      i = j;
    }
  }
  table_[i] = Bucket{kNoEntry, 0};
  Entry& e = entries_[id];
  e.in_use = 0;
  e.slot[0] = free_entry_head_;
  free_entry_head_ = id;
  --size_;
}

void BlockIndex::maybe_release(uint32_t id) {
  const Entry& e = entries_[id];
  for (int t = 0; t < kNumTiers; ++t)
    if (e.state[t] != kAbsent) return;
  erase_entry(id);
}

int64_t BlockIndex::parent_slot(const Entry& e, int t) const {
  if (e.parent.is_zero()) return -1;
  uint32_t pid = find(e.parent);
  if (pid == kNoEntry || entries_[pid].state[t] != kReady) return -1;
  return entries_[pid].slot[t];
}

void BlockIndex::evict_slot(TierBook& tb, int t, uint32_t slot, std::vector<EvictedBlock>* out, bool is_eviction,
                            bool hold) {
  uint32_t id = tb.slot_entry[slot];
  Entry& e = entries_[id];
  if (out) out->push_back(EvictedBlock{e.key, e.parent, slot, e.checksum, e.has_checksum != 0});
  e.state[t] = kAbsent;
  e.slot[t] = kNoSlot;
  tb.slot_entry[slot] = kNoEntry;
  if (hold) {  // Note [Slot lifetime]: reusable only after release_slots()
    tb.readers[slot] = 1;
    tb.draining++;
  } else {
    tb.free_slots.push_back(slot);
  }
  tb.ready--;
  tb.policy->remove(slot);
  if (is_eviction)
    tb.counters.evictions++;
  else
    tb.counters.removals++;
  maybe_release(id);
}

// ---- lookups ----------------------------------------------------------------------------------

// Note [Chain lookup pipeline]
// A chain lookup knows every key up front, so it does not resolve them one miss at a time:
// key i+kBucketAhead's home bucket is prefetched (stage 1); key i+kEntryAhead's probe run,
// whose line has arrived by then, is scanned for a matching 32-bit tag and that entry's first
// 64 bytes (two lines at a 72-byte stride) are prefetched for writing (stage 2,
// probe_ahead); key i is then checked against the full key in its entry, which has arrived
// too (stage 3). About three lines per block (bucket, entry, and the policy's metadata, which
// touch_many prefetches the same way), all with a dozen or more misses in flight. Stage 2's
// answer is final unless a tag matched a different key (about 1 in 2^32 per probe): then the
// plain find() decides. The table cannot change under the mutex, so what stage 2 saw is what
// stage 3 sees.
uint32_t BlockIndex::probe_ahead(Hash128 key) const {
  const uint32_t tag = static_cast<uint32_t>(key.hi >> 32);
  uint64_t i = key.lo & mask_;
  for (;;) {
    const Bucket& b = table_[i];
    if (b.entry == kNoEntry) return kNoEntry;
    if (b.tag == tag) {
      const char* e = reinterpret_cast<const char*>(&entries_[b.entry]);
      __builtin_prefetch(e, 1, 3);
      __builtin_prefetch(e + 63, 1, 3);
      return b.entry;
    }
    i = (i + 1) & mask_;
  }
}

size_t BlockIndex::lookup(const Hash128* keys, size_t n, uint8_t* tiers_out) {
  std::lock_guard<std::mutex> g(mu_);
  std::fill(tiers_out, tiers_out + n, kNoTier);
  constexpr size_t kBucketAhead = 48, kEntryAhead = 24, kRing = 32;  // kRing > kEntryAhead, a power of 2
  uint32_t ahead[kRing];
  for (size_t i = 0; i < std::min(kBucketAhead, n); ++i) prefetch(&table_[keys[i].lo & mask_]);
  for (size_t i = 0; i < std::min(kEntryAhead, n); ++i) ahead[i] = probe_ahead(keys[i]);
  for (auto& v : touch_scratch_) v.clear();
  size_t hits = 0;
  for (size_t i = 0; i < n; ++i) {
    if (i + kBucketAhead < n) prefetch(&table_[keys[i + kBucketAhead].lo & mask_]);
    if (i + kEntryAhead < n) ahead[(i + kEntryAhead) % kRing] = probe_ahead(keys[i + kEntryAhead]);
    uint32_t id = ahead[i % kRing];
    if (id != kNoEntry && entries_[id].key != keys[i]) id = find(keys[i]);  // a tag collision
    int found = -1;
    for (int t = 0; t < kNumTiers; ++t) {
      TierBook& tb = tiers_[t];
      if (!tb.enabled) continue;
      tb.counters.lookups++;
      if (id != kNoEntry && entries_[id].state[t] == kReady) {
        found = t;
        tb.counters.hits++;
        break;
      }
      tb.counters.misses++;
    }
    if (found < 0) break;
    Entry& e = entries_[id];
    tiers_out[i] = static_cast<uint8_t>(found);
    if (e.hits != 0xFFFF) e.hits++;
    e.last_access = ++clock_;
    touch_scratch_[found].push_back(e.slot[found]);  // capacity is kept: no allocation after warm-up
    ++hits;
  }
  for (int t = 0; t < kNumTiers; ++t)
    if (!touch_scratch_[t].empty()) tiers_[t].policy->touch_many(touch_scratch_[t].data(), touch_scratch_[t].size());
  return hits;
}

size_t BlockIndex::peek(const Hash128* keys, size_t n, uint8_t* tiers_out) const {
  std::lock_guard<std::mutex> g(mu_);
  std::fill(tiers_out, tiers_out + n, kNoTier);
  for (size_t i = 0; i < n; ++i) {
    uint32_t id = find(keys[i]);
    if (id == kNoEntry) return i;
    int found = -1;
    for (int t = 0; t < kNumTiers && found < 0; ++t)
      if (tiers_[t].enabled && entries_[id].state[t] == kReady) found = t;
    if (found < 0) return i;
    tiers_out[i] = static_cast<uint8_t>(found);
  }
  return n;
}

// ---- stores -----------------------------------------------------------------------------------

Status BlockIndex::prepare_store(TierId tier, const Hash128* keys, size_t n, Hash128 first_parent,
                                 uint32_t* slots_out, std::vector<EvictedBlock>* evicted) {
  std::lock_guard<std::mutex> g(mu_);
  KVBM_RETURN_IF_ERROR(check_tier(tier));
  const int t = static_cast<int>(tier);
  TierBook& tb = tiers_[t];
  if (tb.free_dirty) {
    tb.free_slots.clear();
    for (uint32_t s = tb.num_slots; s-- > 0;)
      if (tb.slot_entry[s] == kNoEntry && tb.readers[s] == 0) tb.free_slots.push_back(s);
    tb.free_dirty = false;
  }
  // Pass 1: what needs a slot; the batch's own present blocks are pinned (once the store is
  // known to fit, so a refused store leaves the policy untouched) so they are not victims.
  size_t need = 0;
  std::vector<uint32_t> temp_pinned;
  std::unordered_set<Hash128, Hash128Hasher> seen;  // a key listed twice is stored once
  seen.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    slots_out[i] = kNoSlot;
    if (!seen.insert(keys[i]).second) continue;
    uint32_t id = find(keys[i]);
    if (id == kNoEntry || entries_[id].state[t] == kAbsent) {
      ++need;
      slots_out[i] = 0;  // marks "needs a slot"
    } else if (entries_[id].state[t] == kReady && entries_[id].pins[t] == 0) {
      temp_pinned.push_back(entries_[id].slot[t]);
    }
  }
  const size_t evictable = tb.ready - tb.pinned - temp_pinned.size();
  if (need > tb.free_slots.size() + evictable) {
    for (size_t i = 0; i < n; ++i) slots_out[i] = kNoSlot;
    return CapacityExceeded(std::string("tier '") + tier_name(tier) + "': " + std::to_string(need) +
                            " blocks need slots but only " + std::to_string(tb.free_slots.size()) + " are free and " +
                            std::to_string(evictable) + " evictable (" + std::to_string(tb.pinned) +
                            " pinned, " + std::to_string(tb.storing) + " in flight, " +
                            std::to_string(tb.draining) + " draining)");
  }
  for (uint32_t s : temp_pinned) tb.policy->set_pinned(s, true);
  // Pass 2: allocate, evicting as needed.
  Hash128 parent = first_parent;
  for (size_t i = 0; i < n; ++i) {
    const Hash128 key = keys[i];
    if (slots_out[i] == kNoSlot) {
      parent = key;
      continue;
    }
    if (tb.free_slots.empty()) {
      int64_t v = tb.policy->victim();
      // Cannot fail: pass 1 proved enough evictable blocks exist.
      evict_slot(tb, t, static_cast<uint32_t>(v), evicted, true);
    }
    uint32_t slot = tb.free_slots.back();
    tb.free_slots.pop_back();
    bool inserted;
    uint32_t id = find_or_insert(key, parent, &inserted);
    Entry& e = entries_[id];
    if (!inserted && e.parent.is_zero()) e.parent = parent;
    e.state[t] = kStoring;
    e.slot[t] = slot;
    tb.slot_entry[slot] = id;
    tb.storing++;
    slots_out[i] = slot;
    parent = key;
  }
  for (uint32_t s : temp_pinned) tb.policy->set_pinned(s, false);
  return Status::Ok();
}

Status BlockIndex::complete_store(TierId tier, const Hash128* keys, size_t n, const uint8_t* ok,
                                  const uint32_t* checksums) {
  std::lock_guard<std::mutex> g(mu_);
  KVBM_RETURN_IF_ERROR(check_tier(tier));
  const int t = static_cast<int>(tier);
  TierBook& tb = tiers_[t];
  for (size_t i = 0; i < n; ++i) {
    uint32_t id = find(keys[i]);
    if (id == kNoEntry || entries_[id].state[t] != kStoring) {
      bool earlier = false;  // the same key twice in one batch
      for (size_t k = 0; k < i && !earlier; ++k) earlier = keys[k] == keys[i];
      if (earlier) continue;
      BlockState s = id == kNoEntry ? BlockState::kAbsent : static_cast<BlockState>(entries_[id].state[t]);
      return IllegalTransition(std::string("complete_store: block ") + hex(keys[i]) + " is " + state_name(s) +
                               " in tier '" + tier_name(tier) + "', not storing");
    }
  }
  for (size_t i = 0; i < n; ++i) {
    uint32_t id = find(keys[i]);
    if (id == kNoEntry || entries_[id].state[t] != kStoring) continue;
    Entry& e = entries_[id];
    uint32_t slot = e.slot[t];
    tb.storing--;
    if (ok == nullptr || ok[i]) {
      e.state[t] = kReady;
      if (checksums) {
        e.checksum = checksums[i];
        e.has_checksum = 1;
      }
      e.last_access = ++clock_;
      tb.ready++;
      tb.counters.stores++;
      tb.counters.bytes_stored += tb.slot_bytes;
      tb.policy->insert(slot, parent_slot(e, t), policy_fingerprint(e.key));
    } else {
      e.state[t] = kAbsent;
      e.slot[t] = kNoSlot;
      tb.slot_entry[slot] = kNoEntry;
      tb.free_slots.push_back(slot);
      tb.counters.store_failures++;
      maybe_release(id);
    }
  }
  return Status::Ok();
}

Status BlockIndex::restore(TierId tier, Hash128 key, Hash128 parent, uint32_t slot, uint32_t checksum,
                           bool has_checksum) {
  std::lock_guard<std::mutex> g(mu_);
  KVBM_RETURN_IF_ERROR(check_tier(tier));
  const int t = static_cast<int>(tier);
  TierBook& tb = tiers_[t];
  if (slot >= tb.num_slots)
    return OutOfRange("restore: slot " + std::to_string(slot) + " >= " + std::to_string(tb.num_slots) + " slots");
  if (tb.slot_entry[slot] != kNoEntry || tb.readers[slot] != 0)
    return AlreadyExists("restore: slot " + std::to_string(slot) + " is already occupied");
  bool inserted;
  uint32_t id = find_or_insert(key, parent, &inserted);
  Entry& e = entries_[id];
  if (e.state[t] != kAbsent)
    return AlreadyExists("restore: block " + hex(key) + " is already " +
                         state_name(static_cast<BlockState>(e.state[t])) + " in tier '" + tier_name(tier) + "'");
  e.state[t] = kReady;
  e.slot[t] = slot;
  if (has_checksum) {
    e.checksum = checksum;
    e.has_checksum = 1;
  }
  tb.slot_entry[slot] = id;
  tb.ready++;
  tb.free_dirty = true;
  tb.policy->insert(slot, parent_slot(e, t), policy_fingerprint(e.key));
  return Status::Ok();
}

// ---- loads ------------------------------------------------------------------------------------

Status BlockIndex::prepare_load(TierId tier, const Hash128* keys, size_t n, uint32_t* slots_out) {
  std::lock_guard<std::mutex> g(mu_);
  KVBM_RETURN_IF_ERROR(check_tier(tier));
  const int t = static_cast<int>(tier);
  TierBook& tb = tiers_[t];
  for (size_t i = 0; i < n; ++i) {
    uint32_t id = find(keys[i]);
    if (id == kNoEntry || entries_[id].state[t] == kAbsent)
      return NotFound(std::string("block ") + hex(keys[i]) + " is not in tier '" + tier_name(tier) + "'");
    if (entries_[id].state[t] != kReady)
      return IllegalTransition(std::string("load: block ") + hex(keys[i]) + " is still storing in tier '" +
                               tier_name(tier) + "'");
    if (entries_[id].pins[t] >= 250)
      return CapacityExceeded(std::string("block ") + hex(keys[i]) + " has too many concurrent loads");
  }
  for (size_t i = 0; i < n; ++i) {
    Entry& e = entries_[find(keys[i])];
    uint32_t slot = e.slot[t];
    if (e.pins[t]++ == 0) {
      tb.pinned++;
      tb.policy->set_pinned(slot, true);
    }
    e.last_access = ++clock_;
    tb.counters.loads++;
    tb.counters.bytes_loaded += tb.slot_bytes;
    slots_out[i] = slot;
  }
  return Status::Ok();
}

Status BlockIndex::complete_load(TierId tier, const Hash128* keys, size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  KVBM_RETURN_IF_ERROR(check_tier(tier));
  const int t = static_cast<int>(tier);
  TierBook& tb = tiers_[t];
  // Validate with the batch's multiplicities, so a key listed twice needs two pins.
  for (size_t i = 0; i < n; ++i) {
    uint32_t id = find(keys[i]);
    size_t times = 0;
    for (size_t k = 0; k < n; ++k) times += keys[k] == keys[i];
    if (id == kNoEntry || entries_[id].pins[t] < times)
      return IllegalTransition(std::string("complete_load: block ") + hex(keys[i]) + " is not pinned in tier '" +
                               tier_name(tier) + "' (complete_load without prepare_load)");
    if (n > 64) break;  // multiplicity check is quadratic: only done in full for small batches
  }
  for (size_t i = 0; i < n; ++i) {
    uint32_t id = find(keys[i]);
    if (id == kNoEntry || entries_[id].pins[t] == 0) continue;
    Entry& e = entries_[id];
    if (--e.pins[t] == 0) {
      tb.pinned--;
      tb.policy->set_pinned(e.slot[t], false);
    }
  }
  return Status::Ok();
}

// ---- removal and eviction ---------------------------------------------------------------------

Status BlockIndex::remove(TierId tier, const Hash128* keys, size_t n, bool ignore_missing,
                          std::vector<EvictedBlock>* removed) {
  std::lock_guard<std::mutex> g(mu_);
  KVBM_RETURN_IF_ERROR(check_tier(tier));
  const int t = static_cast<int>(tier);
  TierBook& tb = tiers_[t];
  for (size_t i = 0; i < n; ++i) {
    uint32_t id = find(keys[i]);
    if (id == kNoEntry || entries_[id].state[t] == kAbsent) {
      if (ignore_missing) continue;
      return NotFound(std::string("remove: block ") + hex(keys[i]) + " is not in tier '" + tier_name(tier) + "'");
    }
    if (entries_[id].state[t] == kStoring)
      return IllegalTransition(std::string("remove: block ") + hex(keys[i]) + " is still storing");
    if (entries_[id].pins[t] != 0)
      return IllegalTransition(std::string("remove: block ") + hex(keys[i]) + " is pinned by a load in flight");
  }
  for (size_t i = 0; i < n; ++i) {
    uint32_t id = find(keys[i]);
    if (id == kNoEntry || entries_[id].state[t] != kReady) continue;
    evict_slot(tb, t, entries_[id].slot[t], removed, false);
  }
  return Status::Ok();
}

size_t BlockIndex::evict(TierId tier, size_t count, std::vector<EvictedBlock>* evicted, bool hold) {
  std::lock_guard<std::mutex> g(mu_);
  if (!check_tier(tier).ok()) return 0;
  const int t = static_cast<int>(tier);
  TierBook& tb = tiers_[t];
  size_t done = 0;
  while (done < count) {
    int64_t v = tb.policy->victim();
    if (v < 0) break;
    evict_slot(tb, t, static_cast<uint32_t>(v), evicted, true, hold);
    ++done;
  }
  return done;
}

Status BlockIndex::release_slots(TierId tier, const uint32_t* slots, size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  KVBM_RETURN_IF_ERROR(check_tier(tier));
  TierBook& tb = tiers_[static_cast<int>(tier)];
  for (size_t i = 0; i < n; ++i) {
    uint32_t s = slots[i];
    size_t times = 0;  // a slot listed twice needs two pending readers
    for (size_t k = 0; k < n && n <= 64; ++k) times += slots[k] == s;
    if (s >= tb.num_slots || tb.readers[s] < std::max<size_t>(times, 1))
      return IllegalTransition("release_slots: slot " + std::to_string(s) + " of tier '" + tier_name(tier) +
                               "' is not draining (release without a held eviction)");
  }
  for (size_t i = 0; i < n; ++i) {
    uint32_t s = slots[i];
    if (tb.readers[s] == 0) continue;  // over-release in a big batch: ignored, never double-freed
    if (--tb.readers[s] == 0) {
      tb.draining--;
      tb.free_slots.push_back(s);
    }
  }
  return Status::Ok();
}

Status BlockIndex::set_checksum(Hash128 key, uint32_t checksum) {
  std::lock_guard<std::mutex> g(mu_);
  uint32_t id = find(key);
  if (id == kNoEntry) return NotFound("set_checksum: block " + hex(key) + " is not indexed");
  entries_[id].checksum = checksum;
  entries_[id].has_checksum = 1;
  return Status::Ok();
}

void BlockIndex::count_checksum_failure(TierId tier, uint64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  int t = static_cast<int>(tier);
  if (t >= 0 && t < kNumTiers) tiers_[t].counters.checksum_failures += n;
}

// ---- introspection ----------------------------------------------------------------------------

EntryInfo BlockIndex::get(Hash128 key) const {
  std::lock_guard<std::mutex> g(mu_);
  EntryInfo info;
  uint32_t id = find(key);
  if (id == kNoEntry) return info;
  const Entry& e = entries_[id];
  info.found = true;
  info.key = e.key;
  info.parent = e.parent;
  for (int t = 0; t < kNumTiers; ++t) {
    info.state[t] = e.state[t];
    info.pins[t] = e.pins[t];
    info.slot[t] = e.slot[t];
  }
  info.checksum = e.checksum;
  info.has_checksum = e.has_checksum;
  info.hits = e.hits;
  info.last_access = e.last_access;
  return info;
}

TierInfo BlockIndex::tier_info(TierId tier) const {
  std::lock_guard<std::mutex> g(mu_);
  TierInfo info;
  int t = static_cast<int>(tier);
  if (t < 0 || t >= kNumTiers || !tiers_[t].enabled) return info;
  const TierBook& tb = tiers_[t];
  info.enabled = true;
  info.num_slots = tb.num_slots;
  info.slot_bytes = tb.slot_bytes;
  info.used_slots = tb.ready + tb.storing;
  info.pinned_slots = tb.pinned;
  info.draining_slots = tb.draining;
  info.policy = tb.policy->name();
  return info;
}

TierCounters BlockIndex::counters(TierId tier) const {
  std::lock_guard<std::mutex> g(mu_);
  int t = static_cast<int>(tier);
  if (t < 0 || t >= kNumTiers) return TierCounters{};
  return tiers_[t].counters;
}

size_t BlockIndex::size() const {
  std::lock_guard<std::mutex> g(mu_);
  return size_;
}

size_t BlockIndex::capacity() const {
  std::lock_guard<std::mutex> g(mu_);
  return table_.size() * 3 / 4;
}

size_t BlockIndex::memory_bytes() const {
  std::lock_guard<std::mutex> g(mu_);
  size_t b = entries_.capacity() * sizeof(Entry) + table_.capacity() * sizeof(Bucket);
  for (const TierBook& tb : tiers_) {
    if (!tb.enabled) continue;
    b += tb.slot_entry.capacity() * 4 + tb.free_slots.capacity() * 4 + tb.readers.capacity() * 2 +
         tb.policy->memory_bytes();
  }
  return b;
}

Status BlockIndex::validate() const {
  std::lock_guard<std::mutex> g(mu_);
  size_t live = 0;
  for (uint32_t id = 0; id < entries_.size(); ++id) {
    const Entry& e = entries_[id];
    if (!e.in_use) continue;
    ++live;
    if (find(e.key) != id) return Internal("entry " + std::to_string(id) + " is not reachable from the table");
    bool any = false;
    for (int t = 0; t < kNumTiers; ++t) {
      if (e.state[t] == kAbsent) {
        if (e.pins[t] != 0) return Internal("absent block " + hex(e.key) + " has pins");
        continue;
      }
      any = true;
      const TierBook& tb = tiers_[t];
      if (!tb.enabled) return Internal("block resident in an unconfigured tier");
      if (e.slot[t] >= tb.num_slots || tb.slot_entry[e.slot[t]] != id)
        return Internal("block " + hex(e.key) + " slot mapping broken in tier " + tier_name(TierId(t)));
      if (e.state[t] == kStoring && e.pins[t] != 0) return Internal("storing block has pins");
    }
    if (!any) return Internal("entry " + hex(e.key) + " is absent everywhere but still indexed");
  }
  if (live != size_) return Internal("size mismatch: " + std::to_string(live) + " live vs " + std::to_string(size_));
  size_t occupied = 0;
  for (const Bucket& b : table_) occupied += b.entry != kNoEntry;
  if (occupied != size_) return Internal("table occupancy does not match size");
  for (int t = 0; t < kNumTiers; ++t) {
    const TierBook& tb = tiers_[t];
    if (!tb.enabled) continue;
    uint32_t used = 0, ready = 0, storing = 0, pinned = 0, draining = 0;
    for (uint32_t s = 0; s < tb.num_slots; ++s) {
      uint32_t id = tb.slot_entry[s];
      if (tb.readers[s] != 0) {
        ++draining;
        if (id != kNoEntry) return Internal("slot " + std::to_string(s) + " is draining but holds a block");
      }
      if (id == kNoEntry) continue;
      ++used;
      const Entry& e = entries_[id];
      if (!e.in_use || e.slot[t] != s) return Internal("slot " + std::to_string(s) + " points at a stale entry");
      ready += e.state[t] == kReady;
      storing += e.state[t] == kStoring;
      pinned += e.pins[t] != 0;
    }
    if (ready != tb.ready || storing != tb.storing || pinned != tb.pinned)
      return Internal(std::string("tier ") + tier_name(TierId(t)) + " counters disagree with slots");
    if (tb.policy->size() != tb.ready)
      return Internal(std::string("tier ") + tier_name(TierId(t)) + " policy holds " +
                      std::to_string(tb.policy->size()) + " ids, tier has " + std::to_string(tb.ready) + " ready");
    if (draining != tb.draining)
      return Internal(std::string("tier ") + tier_name(TierId(t)) + " draining count disagrees with slots");
    if (!tb.free_dirty && tb.free_slots.size() + used + draining != tb.num_slots)
      return Internal(std::string("tier ") + tier_name(TierId(t)) + " free list size is wrong");
    if (used > tb.num_slots) return Internal("capacity exceeded");
  }
  return Status::Ok();
}

}  // namespace kvbm
