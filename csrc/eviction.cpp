#include "csrc/eviction.h"

#include <algorithm>

namespace kvbm {

namespace {

struct PolicyReg {
  std::string name;
  int rank;
  PolicyFactory factory;
};

std::vector<PolicyReg>& policy_registry() {
  static std::vector<PolicyReg> r;
  return r;
}

}  // namespace

int register_policy(const char* name, int rank, PolicyFactory factory) {
  auto& r = policy_registry();
  r.push_back({name, rank, factory});
  std::stable_sort(r.begin(), r.end(), [](const PolicyReg& a, const PolicyReg& b) { return a.rank < b.rank; });
  return static_cast<int>(r.size());
}

std::vector<std::string> eviction_policy_names() {
  std::vector<std::string> names;
  for (const auto& p : policy_registry()) names.push_back(p.name);
  return names;
}

StatusOr<std::unique_ptr<EvictionPolicy>> make_policy(const std::string& name, uint32_t capacity) {
  for (const auto& p : policy_registry())
    if (p.name == name) return p.factory(capacity);
  std::string known;
  for (const auto& p : policy_registry()) known += (known.empty() ? "" : ", ") + p.name;
  return InvalidArgument("unknown eviction policy '" + name + "' (known: " + known + ")");
}

// ---------------------------------------------------------------------------------------------
// LRU: one intrusive doubly-linked list over slot ids with a sentinel at index `capacity`.
// Pinned ids are unlinked (kept off the list) and relinked as most recent on unpin.
namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  explicit LruPolicy(uint32_t capacity) : cap_(capacity), link_(capacity + 1), state_(capacity, kAbsent) {
    link_[cap_] = Link{cap_, cap_};
  }
  const char* name() const override { return "lru"; }

  void insert(uint32_t id, int64_t /*parent*/, uint64_t /*fingerprint*/) override {
    state_[id] = kLinked;
    ++size_;
    push_front(id);
  }
  void touch(uint32_t id) override {
    if (state_[id] != kLinked) return;
    unlink(id);
    push_front(id);
  }
  void touch_many(const uint32_t* ids, size_t n) override {
    constexpr size_t kAhead = 8;
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) __builtin_prefetch(&link_[ids[i + kAhead]], 1, 1);
      if (i + kAhead / 2 < n) {  // neighbours of an id a few steps ahead (its links are in cache by now)
        const Link& l = link_[ids[i + kAhead / 2]];
        __builtin_prefetch(&link_[l.prev], 1, 1);
        __builtin_prefetch(&link_[l.next], 1, 1);
      }
      touch(ids[i]);
    }
  }
  void remove(uint32_t id) override {
    if (state_[id] == kLinked) unlink(id);
    if (state_[id] != kAbsent) --size_;
    state_[id] = kAbsent;
  }
  void set_pinned(uint32_t id, bool pinned) override {
    if (pinned && state_[id] == kLinked) {
      unlink(id);
      state_[id] = kPinned;
    } else if (!pinned && state_[id] == kPinned) {
      state_[id] = kLinked;
      push_front(id);
    }
  }
  int64_t victim() override { return link_[cap_].prev == cap_ ? -1 : static_cast<int64_t>(link_[cap_].prev); }
  size_t size() const override { return size_; }
  size_t memory_bytes() const override { return link_.capacity() * sizeof(Link) + state_.capacity(); }

 private:
  enum : uint8_t { kAbsent = 0, kLinked = 1, kPinned = 2 };
  struct Link {
    uint32_t prev, next;
  };
  void push_front(uint32_t id) {
    uint32_t first = link_[cap_].next;
    link_[id] = Link{cap_, first};
    link_[first].prev = id;
    link_[cap_].next = id;
  }
  void unlink(uint32_t id) {
    const Link l = link_[id];
    link_[l.prev].next = l.next;
    link_[l.next].prev = l.prev;
  }
  uint32_t cap_;
  std::vector<Link> link_;  // prev/next side by side: one cache line per touch, not two
  std::vector<uint8_t> state_;
  size_t size_ = 0;
};

const int kLruReg = register_policy("lru", 100, [](uint32_t c) -> std::unique_ptr<EvictionPolicy> {
  return std::make_unique<LruPolicy>(c);
});

}  // namespace
}  // namespace kvbm
