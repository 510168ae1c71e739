// Eviction policies over the dense slot ids of one tier.
//
// Note [Policies see slots, not hashes]
// A tier owns `num_slots` fixed-size slots; a policy orders the occupied, unpinned ones and
// names the next victim. Working on dense ids keeps every policy array-backed (no allocation
// per operation, O(1) bookkeeping) and lets the same policy serve the host arena, the disk
// slabs or a GPU arena. The tier tells the policy each block's parent slot in the same tier
// (or -1), which is all a prefix-aware policy needs: under prefix-hit semantics a block is only
// useful while its whole chain of ancestors is cached.
//
// Contract: insert() for an id not present; touch()/remove()/set_pinned() only for present
// ids; victim() never returns a pinned id and returns -1 when every present id is pinned.
// victim() does not remove: the tier calls remove() after it has evicted the block.
// After remove(p), ids that named p as their parent are orphans: p may be reused at once by
// an unrelated block, so a policy must forget the link (and may treat orphans as cold).
//
// Note [Block fingerprints]
// insert() also gets a 64-bit fingerprint of the block's hash (0 = unknown). It is the only
// thing that names a block across its stays in the tier: a policy may keep a compact history
// of evicted blocks keyed by it (a ghost list) and recognise a block when it is stored again.
// Fingerprints are hints: two blocks may share one, and a policy must stay correct (if less
// effective) whatever it is given.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "csrc/status.h"

namespace kvbm {

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual const char* name() const = 0;
  // A block now occupies `id`. `parent` is the slot of its parent block in this tier, or -1;
  // `fingerprint` is a 64-bit fingerprint of its hash, or 0 when unknown (Note [Block fingerprints]).
  virtual void insert(uint32_t id, int64_t parent, uint64_t fingerprint) = 0;
  // The block in `id` was used (a lookup hit, a load).
  virtual void touch(uint32_t id) = 0;
  // touch() each id in order. Policies override it to prefetch their metadata ahead, which
  // is what keeps chain lookups fast once the index is far larger than the caches.
  virtual void touch_many(const uint32_t* ids, size_t n) {
    for (size_t i = 0; i < n; ++i) touch(ids[i]);
  }
  // The block in `id` left the tier.
  virtual void remove(uint32_t id) = 0;
  // Pinned ids are never chosen as victims.
  virtual void set_pinned(uint32_t id, bool pinned) = 0;
  // The id to evict next, or -1 when nothing is evictable.
  virtual int64_t victim() = 0;
  // Number of present ids (pinned included).
  virtual size_t size() const = 0;
  // Bytes of bookkeeping this policy holds.
  virtual size_t memory_bytes() const = 0;
};

// Names accepted by make_policy, in a stable order (the first is the default).
std::vector<std::string> eviction_policy_names();
StatusOr<std::unique_ptr<EvictionPolicy>> make_policy(const std::string& name, uint32_t capacity);

// Registration hook used by policy implementations (see eviction.cpp).
using PolicyFactory = std::unique_ptr<EvictionPolicy> (*)(uint32_t capacity);
int register_policy(const char* name, int rank, PolicyFactory factory);

}  // namespace kvbm
