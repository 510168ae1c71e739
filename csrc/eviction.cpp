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

const std::vector<std::string>& eviction_policy_names() {
  static std::vector<std::string> names;
  names.clear();
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
  explicit LruPolicy(uint32_t capacity)
      : cap_(capacity), prev_(capacity + 1), next_(capacity + 1), state_(capacity, kAbsent) {
    prev_[cap_] = next_[cap_] = cap_;
  }
  const char* name() const override { return "lru"; }

  void insert(uint32_t id, int64_t /*parent*/) override {
    state_[id] = kLinked;
    ++size_;
    push_front(id);
  }
  void touch(uint32_t id) override {
    if (state_[id] != kLinked) return;
    unlink(id);
    push_front(id);
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
  int64_t victim() override { return prev_[cap_] == cap_ ? -1 : static_cast<int64_t>(prev_[cap_]); }
  size_t size() const override { return size_; }
  size_t memory_bytes() const override { return (prev_.capacity() + next_.capacity()) * 4 + state_.capacity(); }

 private:
  enum : uint8_t { kAbsent = 0, kLinked = 1, kPinned = 2 };
  void push_front(uint32_t id) {
    uint32_t first = next_[cap_];
    next_[id] = first;
    prev_[id] = cap_;
    prev_[first] = id;
    next_[cap_] = id;
  }
  void unlink(uint32_t id) {
    next_[prev_[id]] = next_[id];
    prev_[next_[id]] = prev_[id];
  }
  uint32_t cap_;
  std::vector<uint32_t> prev_, next_;
  std::vector<uint8_t> state_;
  size_t size_ = 0;
};

const int kLruReg = register_policy("lru", 100, [](uint32_t c) -> std::unique_ptr<EvictionPolicy> {
  return std::make_unique<LruPolicy>(c);
});

}  // namespace
}  // namespace kvbm
