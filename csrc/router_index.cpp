// The router's block index (interface and contracts in csrc/router_index.h).
//
// Note [Native router index]
// --------------------------
// Semantics are those of Note [Router block keys] (kvbm/router/index.py); this is how they are
// laid out so that a BlockStored of 4 blocks costs a few cache misses, not a few dict rebuilds.
//
// Keys. key_i = fast64_seeded(key_{i-1}, LE32(tokens_i)): fast128's lanes over the block's
// token ids (the same 0 <= t < 2^32 domain and byte form as kvbm's block hashes) with the
// parent key XORed into the start state; the first parent is router_root_key(block_size,
// extra), a fast128 digest of the block size and the extra key (a LoRA name). Events and
// requests go through this one function (router_chain_keys), so their keys cannot disagree.
// It is not collision resistant against chosen tokens: a collision costs a misrouted request,
// never wrong KV (engines verify their own hashes); the tables below are seeded per process so
// that chosen keys cannot pile into one probe chain.
//
// Tables. Both maps are LruTables (Note [Stamped LRU table]): blocks are {key, stamp, mask}
// (24 bytes) plus an 8-byte table slot at load <= 3/4; each slot's engine map holds {engine
// hash, stamp, router key} (32 bytes) plus its slot. Residency bit 4 * slot + tier: slots 0..15
// live in the entry's own word, so the common router (<= 16 instances) reads one entry per
// block; slots 16..255 add words in a side array (wide_), sized on the first such store.
//
// Bound. As the Python index did: after a store, a table over max_blocks drops its oldest
// entries, the excess plus max_blocks / 16, so the O(size) selection runs once per
// max_blocks / 16 inserts. Evicted block keys are counted; engine hashes are forgotten silently.
// Memory is thus bounded by max_blocks entries per table (plus the blocks of one event).
#include "csrc/router_index.h"

#include <cstring>
#include <random>
#include <string>

#include "csrc/fast_hash.h"

namespace kvbm {
namespace {

constexpr uint64_t kRouterDomain = 0x6b76626d2d727472ULL;  // "kvbm-rtr"
constexpr uint64_t kRemoteBits = 0x8888888888888888ULL;    // bit 3 of every nibble

}  // namespace

Status router_check_slot(int slot) {
  if (slot < 0 || slot >= kRouterMaxSlots)
    return OutOfRange("router index: slot " + std::to_string(slot) + " is not in 0.." +
                      std::to_string(kRouterMaxSlots - 1));
  return Status::Ok();
}

Status router_check_tier(int tier) {
  if (tier < 0 || tier >= kRouterTiers)
    return OutOfRange("router index: tier " + std::to_string(tier) +
                      " is not one of 0 (GPU), 1 (CPU), 2 (DISK), 3 (REMOTE)");
  return Status::Ok();
}

uint64_t router_root_key(uint64_t block_size, RouterExtra kind, const uint8_t* extra, size_t extra_len) {
  uint8_t bs[8];
  for (int i = 0; i < 8; ++i) bs[i] = uint8_t(block_size >> (8 * i));
  const uint64_t x = fast64_seeded(kRouterDomain ^ static_cast<uint64_t>(kind), extra, extra_len);
  return fast64_seeded(x, bs, sizeof(bs));
}

Status router_chain_keys(uint64_t parent, const TokenSpan& tokens, size_t block_size, size_t nblocks, uint64_t* out,
                         std::vector<uint32_t>* scratch) {
  const size_t bytes = 4 * block_size;
  const bool in_place =
      kHostLittleEndian && tokens.type == TokenType::kUInt32 && tokens.stride == 4 && !tokens.byteswap;
  if (!in_place) scratch->resize(block_size);
  uint64_t k = parent;
  for (size_t b = 0; b < nblocks; ++b) {
    const void* msg;
    if (in_place) {
      msg = static_cast<const uint8_t*>(tokens.data) + b * bytes;
    } else {
      if (!gather_tokens(tokens, b * block_size, block_size, reinterpret_cast<uint8_t*>(scratch->data()))) {
        TokenSpan bad = tokens;
        bad.count = nblocks * block_size;
        const Status st = validate_tokens(bad);
        return st.ok() ? Internal("router keys: a token was rejected that validation accepts") : st;
      }
      msg = scratch->data();
    }
    k = fast64_seeded(k, msg, bytes);
    out[b] = k;
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<RouterIndex>> RouterIndex::create(size_t max_blocks) {
  if (max_blocks < 1 || max_blocks > kRouterMaxBlocks)
    return ConfigError("router index: max_blocks must be in 1.." + std::to_string(kRouterMaxBlocks) + ", got " +
                       std::to_string(max_blocks));
  std::random_device rd;
  const uint64_t seed = (uint64_t(rd()) << 32) ^ rd();
  return std::unique_ptr<RouterIndex>(new RouterIndex(max_blocks, seed));
}

RouterIndex::RouterIndex(size_t max_blocks, uint64_t seed)
    : max_blocks_(max_blocks), seed_(seed), blocks_(seed), emaps_(kRouterMaxSlots) {}

RouterIndex::Emap* RouterIndex::emap(int slot, bool create) {
  auto& e = emaps_[static_cast<size_t>(slot)];
  if (!e && create) e = std::make_unique<Emap>(fmix64(seed_ + static_cast<uint64_t>(slot) + 1));
  return e.get();
}

void RouterIndex::ensure_width(int slot) {
  const size_t need = static_cast<size_t>(slot) / 16;
  if (need <= wide_words_) return;
  decltype(wide_) wider(static_cast<size_t>(blocks_.id_limit()) * need, 0);
  for (uint32_t id = 0; id < blocks_.id_limit(); ++id)
    for (size_t w = 0; w < wide_words_; ++w) wider[id * need + w] = wide_[id * wide_words_ + w];
  wide_.swap(wider);
  wide_words_ = need;
}

void RouterIndex::add_bit(uint64_t key, int slot, int tier) {
  bool created = false;
  const uint32_t id = blocks_.upsert(key, &created);
  if (created && wide_words_ != 0) {
    const size_t end = (static_cast<size_t>(id) + 1) * wide_words_;
    if (wide_.size() < end) wide_.resize(static_cast<size_t>(blocks_.id_limit()) * wide_words_, 0);
    std::memset(&wide_[id * wide_words_], 0, wide_words_ * sizeof(uint64_t));
  }
  word_ref(id, static_cast<size_t>(slot) / 16) |= uint64_t(1) << (4 * (slot % 16) + tier);
}

unsigned RouterIndex::nibble(uint32_t id, int slot) const {
  const size_t w = static_cast<size_t>(slot) / 16;
  if (w > wide_words_) return 0;
  return static_cast<unsigned>(word(id, w) >> (4 * (slot % 16))) & 0xF;
}

bool RouterIndex::empty_mask(uint32_t id) const {
  for (size_t w = 0; w <= wide_words_; ++w)
    if (word(id, w) != 0) return false;
  return true;
}

bool RouterIndex::any_remote(uint32_t id) const {
  for (size_t w = 0; w <= wide_words_; ++w)
    if (word(id, w) & kRemoteBits) return true;
  return false;
}

void RouterIndex::bound(Emap* em) {
  if (blocks_.size() > max_blocks_) {
    const size_t n = blocks_.size() - max_blocks_ + max_blocks_ / 16;
    blocks_.evict_oldest(n);
    stats_.evicted += n;
  }
  if (em->size() > max_blocks_) em->evict_oldest(em->size() - max_blocks_ + max_blocks_ / 16);
}

Status RouterIndex::store(int slot, int tier, const Hash128* hashes, size_t n, const Hash128* parent,
                          const TokenSpan& tokens, int64_t block_size, uint64_t root) {
  KVBM_RETURN_IF_ERROR(router_check_slot(slot));
  KVBM_RETURN_IF_ERROR(router_check_tier(tier));
  Emap* em = emap(slot, true);
  ensure_width(slot);
  bool created = false;
  if (n > 0 && block_size > 0 && tokens.count / static_cast<uint64_t>(block_size) >= n) {
    uint64_t k = root;
    if (parent != nullptr) {
      const uint32_t pid = em->find(*parent);
      if (pid == Emap::kNone) {
        stats_.unresolved += n;
        return Status::Ok();
      }
      k = (*em)[pid].block;
    }
    keys_.resize(n);
    KVBM_RETURN_IF_ERROR(router_chain_keys(k, tokens, static_cast<size_t>(block_size), n, keys_.data(), &tokens_));
    for (size_t i = 0; i < n; ++i) {  // the event's misses in flight together
      em->prefetch(hashes[i]);
      blocks_.prefetch(keys_[i]);
    }
    for (size_t i = 0; i < n; ++i) {
      (*em)[em->upsert(hashes[i], &created)].block = keys_[i];
      add_bit(keys_[i], slot, tier);
    }
  } else {  // tokenless: only blocks already known on this slot resolve
    for (size_t i = 0; i < n; ++i) {
      const uint32_t id = em->find(hashes[i]);
      if (id == Emap::kNone) {
        ++stats_.unresolved;
        continue;
      }
      em->touch(id);
      add_bit((*em)[id].block, slot, tier);
    }
  }
  stats_.stored += n;
  bound(em);
  return Status::Ok();
}

Status RouterIndex::remove(int slot, int tier, const Hash128* hashes, size_t n) {
  KVBM_RETURN_IF_ERROR(router_check_slot(slot));
  KVBM_RETURN_IF_ERROR(router_check_tier(tier));
  Emap* em = emap(slot, false);
  if (em == nullptr) return Status::Ok();
  const size_t w = static_cast<size_t>(slot) / 16;
  const uint64_t bit = uint64_t(1) << (4 * (slot % 16) + tier);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t eid = em->find(hashes[i]);
    if (eid == Emap::kNone) continue;
    const uint32_t id = blocks_.find((*em)[eid].block);
    ++stats_.removed;
    if (id == LruTable<Block>::kNone) continue;
    if (w <= wide_words_) word_ref(id, w) &= ~bit;
    const bool still_held = nibble(id, slot) != 0;
    if (empty_mask(id)) blocks_.erase(id);
    if (!still_held) em->erase(eid);
  }
  return Status::Ok();
}

Status RouterIndex::clear(int slot, uint32_t tier_bits) {
  KVBM_RETURN_IF_ERROR(router_check_slot(slot));
  if (tier_bits > 0xF) return router_check_tier(4);
  ++stats_.clears;
  const size_t w = static_cast<size_t>(slot) / 16;
  const uint64_t bits = uint64_t(tier_bits) << (4 * (slot % 16));
  if (bits != 0 && w <= wide_words_) {
    blocks_.for_each([&](uint32_t id, Block&) {
      uint64_t& word = word_ref(id, w);
      if ((word & bits) == 0) return;
      word &= ~bits;
      if (empty_mask(id)) blocks_.erase(id);
    });
  }
  if (tier_bits == 0xF) emaps_[static_cast<size_t>(slot)].reset();
  return Status::Ok();
}

Status RouterIndex::apply(int slot, const RouterEvent& ev, uint32_t clear_bits) {
  KVBM_RETURN_IF_ERROR(router_check_slot(slot));
  ++stats_.events;
  switch (ev.kind) {
    case RouterEvent::Kind::kStored: {
      const Status st = store(slot, ev.tier, ev.hashes, ev.num_hashes, ev.parent, ev.tokens, ev.block_size, ev.root);
      if (st.code() == Code::kInvalidArgument) {  // a bad token: the whole event is unknown
        stats_.unresolved += ev.num_hashes;
        return Status::Ok();
      }
      return st;
    }
    case RouterEvent::Kind::kRemoved: return remove(slot, ev.tier, ev.hashes, ev.num_hashes);
    case RouterEvent::Kind::kCleared: return clear(slot, clear_bits);
    case RouterEvent::Kind::kMalformed: stats_.unresolved += ev.num_hashes > 0 ? ev.num_hashes : 1; return Status::Ok();
    case RouterEvent::Kind::kOther: return Status::Ok();
  }
  return Status::Ok();
}

Status RouterIndex::overlap(const uint64_t* keys, size_t n, const int* slots, size_t m, std::vector<uint8_t>* tiers,
                            std::vector<size_t>* lens) {
  for (size_t j = 0; j < m; ++j) KVBM_RETURN_IF_ERROR(router_check_slot(slots[j]));
  tiers->assign(n * m, 0);
  lens->assign(m, 0);
  std::vector<bool> live(m, true);
  size_t nlive = m;
  for (size_t i = 0; i < n && nlive > 0; ++i) {
    const uint32_t id = blocks_.find(keys[i]);
    if (id == LruTable<Block>::kNone) break;
    blocks_.touch(id);
    const bool shared = any_remote(id);
    for (size_t j = 0; j < m; ++j) {
      if (!live[j]) continue;
      const unsigned bits = nibble(id, slots[j]);
      if (bits != 0) {
        (*tiers)[j * n + (*lens)[j]++] = static_cast<uint8_t>(__builtin_ctz(bits));
      } else if (shared) {
        (*tiers)[j * n + (*lens)[j]++] = kRouterRemote;
      } else {
        live[j] = false;
        --nlive;
      }
    }
  }
  return Status::Ok();
}

std::vector<std::pair<int, uint8_t>> RouterIndex::holders(uint64_t key) const {
  std::vector<std::pair<int, uint8_t>> out;
  const uint32_t id = blocks_.find(key);
  if (id == LruTable<Block>::kNone) return out;
  for (int s = 0; s < 16 * static_cast<int>(wide_words_ + 1); ++s)
    if (const unsigned bits = nibble(id, s)) out.emplace_back(s, static_cast<uint8_t>(bits));
  return out;
}

size_t RouterIndex::memory_bytes() const {
  size_t total = sizeof(*this) + blocks_.memory_bytes() + wide_.capacity() * sizeof(uint64_t) +
                 (keys_.capacity() + tokens_.capacity()) * sizeof(uint64_t);
  for (const auto& e : emaps_)
    if (e) total += sizeof(Emap) + e->memory_bytes();
  return total;
}

}  // namespace kvbm
