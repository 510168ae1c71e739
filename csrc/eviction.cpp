#include "csrc/eviction.h"

#include <algorithm>

#include "csrc/huge_alloc.h"

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
// Pinned ids are unlinked (kept off the list) and relinked as most recent on unpin. An id's
// state lives in its own link (prev == kMark: not on the list; next == kMark too: absent,
// else pinned), so a touch reads one 8-byte record and its two neighbours, nothing else.
namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  explicit LruPolicy(uint32_t capacity) : cap_(capacity), link_(capacity + 1, Link{kMark, kMark}) {
    link_[cap_] = Link{cap_, cap_};
  }
  const char* name() const override { return "lru"; }

  void insert(uint32_t id, int64_t /*parent*/, uint64_t /*fingerprint*/) override {
    ++size_;
    push_front(id);
  }
  void touch(uint32_t id) override {
    if (!linked(id)) return;
    unlink(id);
    push_front(id);
  }
  void touch_many(const uint32_t* ids, size_t n) override {
    constexpr size_t kAhead = 32;
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) __builtin_prefetch(&link_[ids[i + kAhead]], 1, 1);
      if (i + kAhead / 2 < n) {  // neighbours of an id a few steps ahead (its links are in cache by now)
        const Link& l = link_[ids[i + kAhead / 2]];
        if (l.prev != kMark) {
          __builtin_prefetch(&link_[l.prev], 1, 1);
          __builtin_prefetch(&link_[l.next], 1, 1);
        }
      }
      touch(ids[i]);
    }
  }
  void remove(uint32_t id) override {
    if (linked(id)) unlink(id);
    if (!absent(id)) --size_;
    link_[id] = Link{kMark, kMark};
  }
  void set_pinned(uint32_t id, bool pinned) override {
    if (pinned && linked(id)) {
      unlink(id);
      link_[id] = Link{kMark, 0};
    } else if (!pinned && !linked(id) && !absent(id)) {
      push_front(id);
    }
  }
  int64_t victim() override { return link_[cap_].prev == cap_ ? -1 : static_cast<int64_t>(link_[cap_].prev); }
  size_t size() const override { return size_; }
  size_t memory_bytes() const override { return link_.capacity() * sizeof(Link); }

 private:
  static constexpr uint32_t kMark = 0xFFFFFFFFu;  // never an index: ids < capacity <= 2^32 - 2
  struct Link {
    uint32_t prev, next;
  };
  bool linked(uint32_t id) const { return link_[id].prev != kMark; }
  bool absent(uint32_t id) const { return link_[id].prev == kMark && link_[id].next == kMark; }
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
  std::vector<Link, HugePageAllocator<Link>> link_;  // prev/next side by side: one cache line per touch, not two
  size_t size_ = 0;
};

const int kLruReg = register_policy("lru", 100, [](uint32_t c) -> std::unique_ptr<EvictionPolicy> {
  return std::make_unique<LruPolicy>(c);
});

}  // namespace
}  // namespace kvbm
