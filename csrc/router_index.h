// The KV-aware router's block index: router block key -> residency bits (instance slot x tier),
// plus per instance an engine-hash -> key map; both bounded, least recently touched first out.
//
// Semantics: Note [Router block keys] in kvbm/router/index.py (the Python face of this class).
// Layout and costs: Note [Native router index] in router_index.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "csrc/block_hash.h"
#include "csrc/hash128.h"
#include "csrc/lru_table.h"
#include "csrc/status.h"

namespace kvbm {

constexpr int kRouterTiers = 4;  // GPU, CPU, DISK, REMOTE: residency bit 4 * slot + tier
constexpr int kRouterRemote = 3;
constexpr int kRouterMaxSlots = 256;
constexpr size_t kRouterMaxBlocks = size_t(1) << 30;

// OutOfRange naming the value unless 0 <= slot < kRouterMaxSlots (0 <= tier < kRouterTiers).
Status router_check_slot(int slot);
Status router_check_tier(int tier);

// What an extra key (a LoRA name ...) is: a str and a bytes of the same content differ.
enum class RouterExtra : uint64_t { kNone = 0, kText = 1, kBytes = 2 };

// The parent of the first block of every chain with this block size and extra key.
uint64_t router_root_key(uint64_t block_size, RouterExtra kind, const uint8_t* extra, size_t extra_len);

// Router keys of blocks [0, nblocks) of `tokens` chained from `parent` (the caller checked that
// nblocks * block_size <= tokens.count): key_i = fast64_seeded(key_{i-1}, LE32(tokens of block i)).
// `scratch` is used when the span is not contiguous host-order uint32. InvalidArgument if a
// token of those blocks lies outside [0, 2^32).
Status router_chain_keys(uint64_t parent, const TokenSpan& tokens, size_t block_size, size_t nblocks, uint64_t* out,
                         std::vector<uint32_t>* scratch);

struct RouterStats {
  uint64_t stored = 0;      // block stores applied (tokenless ones of unknown blocks included)
  uint64_t removed = 0;     // removals of blocks the index knew
  uint64_t unresolved = 0;  // blocks whose parent or key is unknown, or whose event was malformed
  uint64_t evicted = 0;     // keys dropped by the bound
  uint64_t events = 0;
  uint64_t clears = 0;
};

// One decoded KV event as the index applies it (bindings/bind_router_index.cpp builds these
// from vLLM's / kvbm's event structs).
struct RouterEvent {
  enum class Kind { kStored, kRemoved, kCleared, kMalformed, kOther };
  Kind kind = Kind::kOther;
  int tier = 0;
  const Hash128* hashes = nullptr;
  size_t num_hashes = 0;            // kMalformed: the blocks it named (counted unresolved)
  const Hash128* parent = nullptr;  // kStored: null = the first block of a chain
  TokenSpan tokens;                 // kStored: empty for a tokenless store
  int64_t block_size = 0;
  uint64_t root = 0;                // kStored: router_root_key(block_size, extra key)
};

class RouterIndex {
 public:
  // ConfigError unless 1 <= max_blocks <= kRouterMaxBlocks.
  static StatusOr<std::unique_ptr<RouterIndex>> create(size_t max_blocks);

  // `slot` holds blocks `hashes` (consecutive, engine hashes) in `tier`. With tokens for all of
  // them (tokens.count >= n * block_size > 0) their keys chain from `parent`'s key (unknown
  // parent: all n unresolved) or from `root`; without, only hashes known on `slot` resolve.
  // OutOfRange for a bad slot or tier; InvalidArgument for a token outside [0, 2^32) (nothing
  // applied).
  Status store(int slot, int tier, const Hash128* hashes, size_t n, const Hash128* parent, const TokenSpan& tokens,
               int64_t block_size, uint64_t root);
  // `slot` no longer holds these hashes in `tier`. OutOfRange for a bad slot or tier.
  Status remove(int slot, int tier, const Hash128* hashes, size_t n);
  // Forgets every block `slot` holds in the tiers of `tier_bits` (bit t = tier t); all four
  // also forget the slot's engine hashes. OutOfRange for a bad slot or tier bits.
  Status clear(int slot, uint32_t tier_bits);
  // One event from `slot`'s stream; AllBlocksCleared clears `clear_bits`. Malformed events and
  // bad tokens are counted unresolved, never an error; OutOfRange only for slot / clear_bits.
  Status apply(int slot, const RouterEvent& ev, uint32_t clear_bits);

  // Per slots[j], the best tier of each block of the longest prefix of keys[0, n) it can use:
  // (*tiers)[j * n + i] for i < (*lens)[j]. A REMOTE block counts for every slot. A hit
  // refreshes the key. OutOfRange for a bad slot.
  Status overlap(const uint64_t* keys, size_t n, const int* slots, size_t m, std::vector<uint8_t>* tiers,
                 std::vector<size_t>* lens);
  // (slot, tier bits) for every slot holding `key` (empty if absent). Does not refresh it.
  std::vector<std::pair<int, uint8_t>> holders(uint64_t key) const;

  size_t size() const { return blocks_.size(); }
  size_t max_blocks() const { return max_blocks_; }
  const RouterStats& stats() const { return stats_; }
  size_t memory_bytes() const;

 private:
  struct Block {
    using Key = uint64_t;
    Key key = 0;
    uint64_t stamp = 0;
    uint64_t mask = 0;  // slots 0..15; higher slots in wide_
    static uint64_t hash(Key k) { return k; }
  };
  struct Engine {
    using Key = Hash128;
    Key key;
    uint64_t stamp = 0;
    uint64_t block = 0;  // router key
    static uint64_t hash(const Key& k) { return k.lo ^ fmix64(k.hi); }
  };
  using Emap = LruTable<Engine>;

  RouterIndex(size_t max_blocks, uint64_t seed);
  Emap* emap(int slot, bool create);
  void ensure_width(int slot);
  void add_bit(uint64_t key, int slot, int tier);
  uint64_t word(uint32_t id, size_t w) const { return w == 0 ? blocks_[id].mask : wide_[id * wide_words_ + w - 1]; }
  uint64_t& word_ref(uint32_t id, size_t w) { return w == 0 ? blocks_[id].mask : wide_[id * wide_words_ + w - 1]; }
  unsigned nibble(uint32_t id, int slot) const;
  bool empty_mask(uint32_t id) const;
  bool any_remote(uint32_t id) const;
  void bound(Emap* em);

  size_t max_blocks_;
  uint64_t seed_;
  LruTable<Block> blocks_;
  // Mask words 1..wide_words_ of each block (slots 16 and up), by block id; empty until a slot
  // above 15 stores something.
  std::vector<uint64_t, HugePageAllocator<uint64_t>> wide_;
  size_t wide_words_ = 0;
  std::vector<std::unique_ptr<Emap>> emaps_;  // by slot
  RouterStats stats_;
  std::vector<uint64_t> keys_;    // one event's chain
  std::vector<uint32_t> tokens_;  // one block's tokens, when they must be gathered
};

}  // namespace kvbm
