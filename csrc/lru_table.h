// LruTable: an open-addressing hash table of fixed-size entries with a touch stamp each, for
// bounded indexes that drop their least recently touched entries in bulk.
//
// Note [Stamped LRU table]
// Entries live in one dense array; an entry's id (its index there) is stable while it lives
// and freed ids are reused. The table maps keys to ids by linear probing over 8-byte slots
// {id, tag}, tag being the low 32 bits of the key's mixed hash: a probe compares tags and reads
// the entry only on a tag match, and the home slot is tag & mask, so deletion shifts the
// cluster back (no tombstones) without reading entries. Load stays at most 3/4.
//
// Recency is a stamp per entry (a counter bumped at every touch) rather than a linked list: a
// touch writes the entry the caller is already holding in cache, where unlinking from a list
// writes two random neighbours (two more cache misses per touch at millions of entries).
// Eviction of the n oldest finds the n-th smallest stamp (nth_element over every live stamp)
// and erases each entry at or below it: O(size) per call, so callers evict in bulk (a fixed
// fraction of their bound at a time), which makes it O(1) amortised per insert. Stamps are
// unique (64-bit counter), so exactly n entries go, in exactly least-recently-touched order.
//
// Key hashing: a per-table seed is mixed into every key's hash, so inputs chosen to collide in
// one process's table (keys come from the network) do not collide in another's.
//
// E must be default-constructible with members `Key key` and `uint64_t stamp` (0 = free) and a
// static `uint64_t hash(const Key&)`. Not thread-safe; ids stay below 2^32 - 1 (callers bound
// the size far below that).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "csrc/fast_hash.h"
#include "csrc/huge_alloc.h"

namespace kvbm {


template <class E>
class LruTable {
 public:
  using Key = typename E::Key;
  static constexpr uint32_t kNone = 0xffffffffu;

  explicit LruTable(uint64_t seed) : seed_(seed) {}

  size_t size() const { return size_; }
  // Ids of live entries are below this.
  uint32_t id_limit() const { return static_cast<uint32_t>(entries_.size()); }
  E& operator[](uint32_t id) { return entries_[id]; }
  const E& operator[](uint32_t id) const { return entries_[id]; }

  // Id of k's entry, or kNone. Does not touch it.
  uint32_t find(const Key& k) const {
    if (size_ == 0) return kNone;
    const uint32_t tag = tag_of(k);
    for (size_t i = tag & mask_;; i = (i + 1) & mask_) {
      const Slot s = slots_[i];
      if (s.id == kNone) return kNone;
      if (s.tag == tag && entries_[s.id].key == k) return s.id;
    }
  }

  // Starts loading k's home slot into cache (a batch of lookups overlaps its misses this way).
  void prefetch(const Key& k) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[tag_of(k) & mask_]);
  }

  // Id of k's entry, touched; a new one is E{} with key k (*created = true). May move entries:
  // hold ids, not references, across calls.
  uint32_t upsert(const Key& k, bool* created) {
    if ((size_ + 1) * 4 > slots_.size() * 3) grow();
    const uint32_t tag = tag_of(k);
    size_t i = tag & mask_;
    for (;; i = (i + 1) & mask_) {
      const Slot s = slots_[i];
      if (s.id == kNone) break;
      if (s.tag == tag && entries_[s.id].key == k) {
        touch(s.id);
        *created = false;
        return s.id;
      }
    }
    uint32_t id;
    if (!free_.empty()) {
      id = free_.back();
      free_.pop_back();
    } else {
      id = static_cast<uint32_t>(entries_.size());
      entries_.emplace_back();
    }
    entries_[id] = E{};
    entries_[id].key = k;
    touch(id);
    slots_[i] = Slot{id, tag};
    ++size_;
    *created = true;
    return id;
  }

  void touch(uint32_t id) { entries_[id].stamp = ++clock_; }

  void erase(uint32_t id) {
    size_t i = tag_of(entries_[id].key) & mask_;
    while (slots_[i].id != id) i = (i + 1) & mask_;
    // Backward shift: move each later member of the cluster whose home is not in (i, j] into
    // the hole, until the cluster ends.
    for (size_t j = (i + 1) & mask_; slots_[j].id != kNone; j = (j + 1) & mask_) {
      const size_t home = slots_[j].tag & mask_;
      if (((j - home) & mask_) >= ((j - i) & mask_)) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i] = Slot{kNone, 0};
    entries_[id].stamp = 0;
    free_.push_back(id);
    --size_;
  }

  // Calls f(id, entry) for every live entry; f may erase the entry it is given.
  template <class F>
  void for_each(F&& f) {
    for (uint32_t id = 0; id < entries_.size(); ++id)
      if (entries_[id].stamp != 0) f(id, entries_[id]);
  }

  // Erases the `count` least recently touched entries (every entry if count >= size()).
  void evict_oldest(size_t count) {
    if (count == 0) return;
    if (count >= size_) {
      clear();
      return;
    }
    std::vector<uint64_t> stamps;
    stamps.reserve(size_);
    for (const E& e : entries_)
      if (e.stamp != 0) stamps.push_back(e.stamp);
    std::nth_element(stamps.begin(), stamps.begin() + static_cast<ptrdiff_t>(count - 1), stamps.end());
    const uint64_t cut = stamps[count - 1];
    stamps = std::vector<uint64_t>();
    for (uint32_t id = 0; id < entries_.size(); ++id)
      if (entries_[id].stamp != 0 && entries_[id].stamp <= cut) erase(id);
  }

  // Drops every entry and releases the memory.
  void clear() {
    entries_ = decltype(entries_)();
    slots_ = decltype(slots_)();
    free_ = std::vector<uint32_t>();
    size_ = 0;
    mask_ = 0;
  }

  size_t memory_bytes() const {
    return entries_.capacity() * sizeof(E) + slots_.capacity() * sizeof(Slot) + free_.capacity() * sizeof(uint32_t);
  }

 private:
  struct Slot {
    uint32_t id;
    uint32_t tag;
  };

  uint32_t tag_of(const Key& k) const { return static_cast<uint32_t>(fmix64(E::hash(k) ^ seed_)); }

  void grow() {
    const size_t cap = slots_.empty() ? 16 : 2 * slots_.size();
    slots_.assign(cap, Slot{kNone, 0});
    mask_ = cap - 1;
    for (uint32_t id = 0; id < entries_.size(); ++id) {
      if (entries_[id].stamp == 0) continue;
      const uint32_t tag = tag_of(entries_[id].key);
      size_t i = tag & mask_;
      while (slots_[i].id != kNone) i = (i + 1) & mask_;
      slots_[i] = Slot{id, tag};
    }
  }

  uint64_t seed_;
  uint64_t clock_ = 0;
  size_t size_ = 0;
  size_t mask_ = 0;
  std::vector<E, HugePageAllocator<E>> entries_;
  std::vector<Slot, HugePageAllocator<Slot>> slots_;
  std::vector<uint32_t> free_;
};

}  // namespace kvbm
