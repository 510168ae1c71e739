// The block index: hash -> entry with per-tier residency, slot, pins, state, checksum and
// access stats, plus each tier's slot bookkeeping (free slots, eviction policy, counters).
//
// Note [Block state machine]
// Every (block, tier) pair is in one of three states:
//
//     Absent --prepare_store--> Storing --complete_store(ok)--> Ready
//        ^                         |                              |
//        +---complete_store(fail)--+                              |
//        +----------------- evict / remove (pins == 0) -----------+
//
// Only Ready blocks are visible to lookups and loadable. Loads pin a Ready block
// (prepare_load / complete_load); a pinned or Storing block is never evicted, so a slot is
// never reused while bytes are moving in or out of it. See Note [Slot lifetime] for the bytes
// of a block that has just left its slot. Any other transition (completing a
// store that was never prepared, loading a Storing block, removing a pinned one, unpinning an
// unpinned one) fails with Code::kIllegalTransition and changes nothing.
//
// Note [Index layout]
// Entries (72 bytes) live in one array addressed by 32-bit ids; a free list threads the unused
// ones. Everything a lookup reads or writes (key, slots, last_access, hits, state) is in an
// entry's first 64 bytes. The hash table is open addressing with linear probing over 8-byte buckets holding the
// entry id and 32 more bits of the key (so a probe rarely touches an entry it does not want),
// with backward-shift deletion (no tombstones, probe lengths stay short under churn). It
// grows by doubling at 3/4 load. Chain lookups probe the table for keys a dozen places ahead
// of the one they resolve and prefetch what they will need (Note [Chain lookup pipeline] in
// block_index.cpp), so at 10M blocks they run at memory-level parallelism instead of one miss
// at a time; the big arrays sit on huge pages (Note [Huge pages for the index]).
// Nothing allocates on the lookup path.
//
// Note [Slot lifetime]
// A slot is handed out again only after every copy out of it has finished. While its block is
// Ready, readers pin it (prepare_load). When a block leaves a slot whose bytes are still to be
// copied out (a demotion to a slower tier, a write-behind), evict(..., hold=true) does not put
// the slot on the free list: it enters a draining state with one pending reader, and only
// release_slots() — called once the copy is done — returns it to the free list. prepare_store
// never hands out a draining slot (it evicts another block or reports kCapacityExceeded). A
// slot that prepare_store itself evicts goes straight to one of that call's own new blocks,
// whose only writer is the caller: the caller copies the evicted bytes out (StorePlan.evicted)
// before writing the new ones in.
//
// Thread safety: every public method takes the index mutex; callers move bytes outside it,
// which the Storing state and pins make safe.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "csrc/eviction.h"
#include "csrc/hash128.h"
#include "csrc/huge_alloc.h"
#include "csrc/status.h"

namespace kvbm {

enum class TierId : uint8_t { kGpu = 0, kHost = 1, kDisk = 2, kRemote = 3 };
constexpr int kNumTiers = 4;
constexpr uint8_t kNoTier = 0xFF;
const char* tier_name(TierId t);

enum class BlockState : uint8_t { kAbsent = 0, kStoring = 1, kReady = 2 };
const char* state_name(BlockState s);

constexpr uint32_t kNoSlot = 0xFFFFFFFFu;
constexpr uint32_t kNoEntry = 0xFFFFFFFFu;

struct Entry {              // 64 bytes
  Hash128 key;              // the block's chained hash
  Hash128 parent;           // the previous block's hash (zero for a chain's first block)
  uint32_t slot[kNumTiers]; // slot per tier (kNoSlot when absent); remote keeps 0
  uint32_t checksum;        // CRC32C of the block bytes, valid when has_checksum
  uint32_t last_access;     // logical clock of the last lookup hit / store / load
  uint16_t hits;            // lookup hits, saturating
  uint8_t has_checksum;
  uint8_t in_use;
  uint8_t state[kNumTiers]; // BlockState per tier
  uint8_t pins[kNumTiers];  // load pins per tier
};
static_assert(sizeof(Entry) == 72, "entry layout changed: update docs and the scale benchmark");

struct TierCounters {
  uint64_t lookups = 0;   // lookup calls that reached this tier's blocks
  uint64_t hits = 0;      // blocks found in this tier (as the best tier)
  uint64_t misses = 0;    // lookups that ended with a missing block (counted on the host tier)
  uint64_t stores = 0;    // blocks committed
  uint64_t store_failures = 0;
  uint64_t loads = 0;     // blocks loaded (prepare_load)
  uint64_t evictions = 0;
  uint64_t removals = 0;
  uint64_t bytes_stored = 0;
  uint64_t bytes_loaded = 0;
  uint64_t checksum_failures = 0;
};

struct TierInfo {
  bool enabled = false;
  uint32_t num_slots = 0;
  uint64_t slot_bytes = 0;
  uint32_t used_slots = 0;     // Storing + Ready
  uint32_t pinned_slots = 0;
  uint32_t draining_slots = 0;  // evicted, a copy out of them still running (Note [Slot lifetime])
  std::string policy;
};

struct EvictedBlock {
  Hash128 key;
  Hash128 parent;
  uint32_t slot;
  uint32_t checksum;
  bool has_checksum;
};

struct EntryInfo {
  bool found = false;
  Hash128 key, parent;
  uint8_t state[kNumTiers] = {0, 0, 0, 0};
  uint8_t pins[kNumTiers] = {0, 0, 0, 0};
  uint32_t slot[kNumTiers] = {kNoSlot, kNoSlot, kNoSlot, kNoSlot};
  uint32_t checksum = 0;
  bool has_checksum = false;
  uint32_t hits = 0;
  uint32_t last_access = 0;
};

class BlockIndex {
 public:
  explicit BlockIndex(uint32_t initial_capacity = 1024);
  BlockIndex(const BlockIndex&) = delete;
  BlockIndex& operator=(const BlockIndex&) = delete;

  // Give a tier `num_slots` slots of `slot_bytes` each, ordered by `policy`. Once per tier.
  Status configure_tier(TierId tier, uint32_t num_slots, uint64_t slot_bytes, const std::string& policy);

  // Longest cached prefix of a chain: for i < result, tiers_out[i] is the fastest tier where
  // block i is Ready; tiers_out[i] = kNoTier past it. Touches the hit blocks (recency,
  // frequency). Allocation-free.
  size_t lookup(const Hash128* keys, size_t n, uint8_t* tiers_out);
  // Same but without touching anything (no stats, no recency): for inspection.
  size_t peek(const Hash128* keys, size_t n, uint8_t* tiers_out) const;

  // Absent -> Storing for every key not already Storing/Ready in `tier`. keys form a chain:
  // key[i]'s parent is key[i-1], key[0]'s is `first_parent` (zero = chain root).
  // slots_out[i] = the slot to write, or kNoSlot when the block is already present/in flight.
  // Slots are freed or taken by evicting Ready, unpinned blocks (appended to `evicted`).
  // All-or-nothing: on kCapacityExceeded nothing changed.
  Status prepare_store(TierId tier, const Hash128* keys, size_t n, Hash128 first_parent, uint32_t* slots_out,
                       std::vector<EvictedBlock>* evicted);
  // Storing -> Ready (ok) or Storing -> Absent (!ok). checksums may be null.
  Status complete_store(TierId tier, const Hash128* keys, size_t n, const uint8_t* ok, const uint32_t* checksums);
  // Absent -> Ready at a given slot (rebuilding a persistent tier's state at start-up).
  Status restore(TierId tier, Hash128 key, Hash128 parent, uint32_t slot, uint32_t checksum, bool has_checksum);
  // Pin Ready blocks for reading; slots_out[i] is the slot. All-or-nothing.
  Status prepare_load(TierId tier, const Hash128* keys, size_t n, uint32_t* slots_out);
  // Unpin.
  Status complete_load(TierId tier, const Hash128* keys, size_t n);
  // Ready (unpinned) -> Absent. Missing keys are ignored when `ignore_missing`.
  Status remove(TierId tier, const Hash128* keys, size_t n, bool ignore_missing, std::vector<EvictedBlock>* removed);
  // Evict up to `count` blocks chosen by the policy. With `hold`, their slots stay draining
  // (not reusable) until release_slots() says the copies out of them are done.
  size_t evict(TierId tier, size_t count, std::vector<EvictedBlock>* evicted, bool hold = false);
  // Draining slots whose copies out finished go back to the free list. A slot listed that is
  // not draining is kIllegalTransition and nothing changes.
  Status release_slots(TierId tier, const uint32_t* slots, size_t n);
  // Record a checksum for a Ready/Storing block (e.g. computed lazily before demotion).
  Status set_checksum(Hash128 key, uint32_t checksum);
  // Count a verification failure against `tier` (the caller also removes the block).
  void count_checksum_failure(TierId tier, uint64_t n = 1);

  EntryInfo get(Hash128 key) const;
  TierInfo tier_info(TierId tier) const;
  TierCounters counters(TierId tier) const;
  size_t size() const;               // entries present in any tier
  size_t capacity() const;           // entries the arrays can hold before growing
  size_t memory_bytes() const;       // bytes held by the index and the tiers' bookkeeping
  // Check every invariant (tests). Returns kInternal naming the first violation.
  Status validate() const;

 private:
  struct Bucket {
    uint32_t entry;  // kNoEntry = empty
    uint32_t tag;    // key.hi >> 32
  };
  struct TierBook {
    bool enabled = false;
    uint32_t num_slots = 0;
    uint64_t slot_bytes = 0;
    std::vector<uint32_t> slot_entry;   // slot -> entry id (kNoEntry when free)
    std::vector<uint32_t> free_slots;   // stack
    std::vector<uint16_t> readers;      // per slot: copies out still running after its block left
    uint32_t draining = 0;              // slots with readers > 0 (neither free nor used)
    bool free_dirty = false;            // restore() ran: rebuild free_slots before allocating
    uint32_t ready = 0;
    uint32_t storing = 0;
    uint32_t pinned = 0;
    std::unique_ptr<EvictionPolicy> policy;
    TierCounters counters;
  };

  uint32_t find(Hash128 key) const;                 // entry id or kNoEntry
  uint32_t probe_ahead(Hash128 key) const;          // lookup pipeline stage 2 (Note [Chain lookup pipeline])
  uint32_t find_or_insert(Hash128 key, Hash128 parent, bool* inserted);
  void erase_entry(uint32_t id);                    // removes from table, frees id
  void maybe_release(uint32_t id);                  // erase if absent in every tier
  void grow_table();
  uint32_t alloc_entry();
  int64_t parent_slot(const Entry& e, int t) const;
  void evict_slot(TierBook& tb, int t, uint32_t slot, std::vector<EvictedBlock>* out, bool is_eviction,
                  bool hold = false);
  Status check_tier(TierId tier) const;

  mutable std::mutex mu_;
  std::vector<Entry, HugePageAllocator<Entry>> entries_;    // Note [Huge pages for the index]
  uint32_t free_entry_head_ = kNoEntry;
  std::vector<Bucket, HugePageAllocator<Bucket>> table_;
  uint64_t mask_ = 0;
  size_t size_ = 0;
  uint32_t clock_ = 0;
  std::array<TierBook, kNumTiers> tiers_;
  std::array<std::vector<uint32_t>, kNumTiers> touch_scratch_;  // reused by lookup(): no allocation
};

}  // namespace kvbm
