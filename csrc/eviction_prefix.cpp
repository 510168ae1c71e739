// The prefix-aware eviction policies "prefix_freq" and "prefix_ghost" (one implementation; the
// second adds a history of evicted blocks). Array-backed, O(1) per operation.
//
// Note [Prefix- and frequency-aware eviction]
// Rationale. kvbm serves prefix hits: block i of a chain is only useful while blocks 0..i-1
// are cached too. Plain LRU ignores that in two ways. (1) A lookup touches a chain root
// first, so the root is the least recent block of its chain and goes first, turning every
// cached descendant into an orphan that can never hit again until the root comes back, while
// still occupying slots. (2) LRU gives a block seen once (a one-off long prompt, the partial
// last block of every prompt) the same lifetime as a block re-used many times (a system prompt,
// the trunk of a live conversation), so a burst of one-off prompts flushes hot prefixes.
// On the Mooncake conversation trace about three quarters of all distinct blocks are never
// re-used, while a block re-used once is re-used again about half the time.
//
// Approach. Every present, unpinned slot sits on exactly one intrusive doubly-linked list
// (one 48-byte node per slot (its `fp` field is used by prefix_ghost only) holding its links, stamp, tree links and class, plus one sentinel
// node per list; nothing allocates after construction):
//   - the orphan list: blocks whose parent left this tier (FIFO, evicted first);
//   - leaf lists, one per frequency class (seen once / re-used once / re-used 2-7 times /
//     re-used 8 times or more, "hot"): blocks with no cached child;
//   - interior lists, same classes: blocks with a cached child. Used only when no orphan and
//     no leaf is evictable (e.g. every leaf is pinned), so chains shrink from their tails and
//     a cached chain always stays a valid prefix.
// Each list is kept in recency order (a logical clock stamp per slot, head = newest). The
// victim is the orphan list's tail if any; otherwise, among the leaf lists' tails, the one with
// the largest *weighted* age (age / weight of its class, weights 1 : 1.5 : 2 : 8): a block
// re-used once may stay idle 1.5 times as long as a block seen once before it goes, a hot block
// (a system prompt) 8 times as long, so a burst of one-off prompts that turns the cache over
// several times does not flush it, while a block that stops being used still ages out (no
// LFU-style pollution). This is a segmented LRU whose segments size themselves (no fixed
// segment sizes to tune), akin to 2Q/SLRU and to the frequency-weighted recency of LRFU, over
// the leaf frontier of the prefix tree as in radix-tree KV caches (SGLang, vLLM's prefix cache).
// Weights were chosen on the Mooncake trace at 5/10/25% capacity; the landscape is flat near
// them (1:2:3 or 1:2:4 for the first three classes gain a little at 5-10% but fall below LRU at
// 25%; the hot class barely matters there and is what makes scans harmless).
// Parent/child links are intrusive too (parent, first_child, next_sib, prev_sib), so
// remove(p) turns p's children into orphans in O(children): amortized O(1), since each link is
// made once (at insert) and broken once. A parent whose last child leaves goes back to a leaf
// list at the place its stamp says; that ordered insert looks at most kWalk nodes from each end
// of the list and otherwise settles for the closest place found (an approximation: that block
// may go a little early or late). Chain lookups touch through touch_many, which prefetches the
// nodes (and their list neighbours) a few ids ahead, as LRU does.
//
// Limits. The policy keys nothing by block hash, so it keeps no ghost history of evicted blocks
// (a slot is reused by unrelated blocks at once); prefix_ghost (below) adds one. Links are only known at insert: when
// an evicted parent is stored again, its surviving children are not re-linked to it; they stay
// orphans (still hittable, merely first in line for eviction) and the parent counts as a leaf.
// Pin/unpin counts as an access (unpin stamps the block as recent, like LRU's relink) but not
// as a re-use. Frequencies saturate at 255 and never decay other than by eviction.
// Measured (benchmarks/results/eviction.md): on the Mooncake conversation trace at 10% capacity
// the prefix-hit ratio is 0.287 against LRU's 0.278 (clairvoyant 0.366). An offline bound for
// any policy that ranks blocks only by re-use count and idle time (the best time-to-live per
// re-use class, computed from the trace's re-use gaps) is about 0.29-0.30 there: three quarters
// of the blocks are never re-used and nothing a policy sees tells them apart early, so closing
// more of the gap needs inputs this interface does not carry (request timing, conversation ids).
//
// ---- prefix_ghost: prefix_freq plus a compact history of evicted blocks ----
//
// Note [Ghost history]
// Starting point. prefix_freq (the note above) evicts
// orphans, then the leaves of the cached prefix tree by frequency-weighted idle time. Its blind
// spot on a conversation workload such as the Mooncake trace: a block's re-use count dies with
// the block. A conversation that pauses longer than the cache lifetime loses its blocks; when
// the user comes back they miss, are stored again and count as "seen once", the class that
// goes first, although a block that has come back once is re-used again about half the time
// (a block seen once: about a quarter of the time).
//
// Approach. A ghost history, as in ARC's ghost lists or TinyLFU's frequency sketch, keyed by the
// 64-bit fingerprint of the block's hash that the index passes to insert() (Note [Block
// fingerprints] in eviction.h; slot ids cannot name a block across its stays). When a block
// leaves, a 16-bit entry (the fingerprint's top 12 bits as a tag, its re-use count saturated at
// 15) goes into a 4-way set chosen by the fingerprint's low bits; a set is a FIFO (newest in way
// 0, the oldest falls out of way 3). When a block is stored, a matching entry is taken out and
// the block starts with that count + 1 (coming back is a re-use) instead of 0, so it lands in
// the right frequency class at once. Everything else is prefix_freq: orphans first, leaves
// before interior blocks, weights 1 : 1.5 : 2 : 8 on idle time.
// Sizing. The table holds 8 entries per slot (16 bytes per slot next to the 48-byte node), so
// it remembers roughly the last 8 x capacity departures: the gaps between conversation turns
// are long (median about 7,700 newly stored blocks, 95th percentile 48,000, against 9,140
// slots at 5% capacity). In a Python model of the trace (one that also demoted chain tails, see
// below), the size mattered at 5%: 2 entries per slot direct-mapped gave 0.200, 8 per slot
// 4-way 0.221, an unbounded exact history 0.223; 16 per slot gained 0.0006 more. A false match
// (another block with the same set and tag, about 1 lookup in 1000) only gives that block a
// longer lease: the table holds hints, never state; fingerprint 0 means "unknown" and is
// neither remembered nor looked up.
//
// Tried and left out: demoting the last block of each stored chain (on that trace the partial
// block at a prompt's end is re-used 0.8% of the time) to a leaf class with weight 0.25, the
// block being recognised as the one inserted before an insert that does not continue it. A
// Python model without the prefix tree gained 0.003-0.005 from it; inside this policy it gained
// 0.001 at 5% but lost 0.023 at 10% and 0.010 at 25% (detaching the tail from its parent, so
// the parent becomes a leaf while its stamp is recent, lost as much; even weight 1 lost, so it
// is the change in tree shape, not the weight; the cause was not pinned down). Also no gain in
// the model: a longer lease (1.5x) for the new blocks of a continued conversation, and weights
// other than prefix_freq's (all within -0.003..+0.001 at 10%).
//
// Limits: why not 0.33 at 10%. Three quarters of the trace's blocks are never re-used, and the
// clairvoyant policy wins by never caching them. An online policy has to tell them apart when
// they arrive, and nothing it can see does: whether a conversation gets another turn is 0.31
// for a first turn and 0.42-0.68 for later ones, and flat in prompt length (except 1-2 block
// prompts), reply length and position in the trace. An offline upper bound for policies that
// give each class of block its best time-to-live (benchmarks/eviction_feature_bound.py; TTLs
// fitted to the trace itself, occupancy counted on average, prefix coupling ignored) is
// 0.221 / 0.294 / 0.355 at 5 / 10 / 25% when the class is the re-use count (this policy:
// 0.217 / 0.293 / 0.354), and still only 0.243 / 0.308 / 0.359 with 587 classes of re-use
// count, position in the prompt, prefix hit, prompt length, previous re-use gap and distance
// from the chain start; told which blocks will be re-used, the same bound gives 0.366. The
// target needs information about the future that the requests do not carry (a session-end
// signal, an application hint), not a better use of the history.
// Measured figures: benchmarks/results/eviction.md.
#include <algorithm>
#include <memory>
#include <vector>

#include "csrc/eviction.h"
#include "csrc/huge_alloc.h"

namespace kvbm {
namespace {

constexpr uint32_t kNone = 0xFFFFFFFFu;

class PrefixPolicy final : public EvictionPolicy {
 public:
  // history: keep the ghost table (prefix_ghost); without it this is prefix_freq.
  PrefixPolicy(uint32_t capacity, bool history) : history_(history), cap_(capacity), n_(capacity + kNumLists) {
    for (uint32_t l = 0; l < kNumLists; ++l) n_[cap_ + l].prev = n_[cap_ + l].next = cap_ + l;
    if (!history_) return;
    uint64_t sets = 1;
    while (sets * kWays < static_cast<uint64_t>(capacity) * kGhostPerSlot) sets <<= 1;
    set_mask_ = sets - 1;
    ghost_.assign(sets * kWays, 0);
  }

  const char* name() const override { return history_ ? "prefix_ghost" : "prefix_freq"; }

  void insert(uint32_t id, int64_t parent, uint64_t fingerprint) override {
    const int remembered = recall(fingerprint);
    n_[id].ts = ++clock_;
    n_[id].freq = remembered < 0 ? 0 : static_cast<uint8_t>(remembered + 1);
    n_[id].orphan = 0;
    n_[id].fp = fingerprint;
    n_[id].parent = n_[id].first_child = n_[id].next_sib = n_[id].prev_sib = kNone;
    ++size_;
    if (parent >= 0 && parent < static_cast<int64_t>(cap_) && parent != id && n_[parent].list != kAbsent) {
      const uint32_t p = static_cast<uint32_t>(parent);
      const bool was_leaf = n_[p].first_child == kNone;
      n_[id].parent = p;
      n_[id].next_sib = n_[p].first_child;
      if (n_[p].first_child != kNone) n_[n_[p].first_child].prev_sib = id;
      n_[p].first_child = id;
      if (was_leaf && is_linked(p)) {  // leaf -> interior, same recency
        unlink(p);
        link_ordered(p);
      }
    }
    n_[id].list = home_list(id);
    push_head(id, n_[id].list);
  }

  void touch(uint32_t id) override {
    n_[id].ts = ++clock_;
    if (n_[id].freq != 0xFF) ++n_[id].freq;
    if (!is_linked(id)) return;  // pinned: relinked on unpin
    unlink(id);
    n_[id].list = home_list(id);
    push_head(id, n_[id].list);
  }

  void touch_many(const uint32_t* ids, size_t n) override {
    constexpr size_t kAhead = 8;
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) __builtin_prefetch(&n_[ids[i + kAhead]], 1, 1);
      if (i + kAhead / 2 < n) {  // neighbours of a node a few steps ahead (in cache by now)
        const Node& x = n_[ids[i + kAhead / 2]];
        __builtin_prefetch(&n_[x.prev], 1, 1);
        __builtin_prefetch(&n_[x.next], 1, 1);
      }
      touch(ids[i]);
    }
  }

  void remove(uint32_t id) override {
    if (n_[id].list == kAbsent) return;
    remember(n_[id].fp, n_[id].freq);
    if (is_linked(id)) unlink(id);
    n_[id].list = kAbsent;
    --size_;
    // Detach from the parent; a parent left without children becomes a leaf again.
    const uint32_t p = n_[id].parent;
    if (p != kNone) {
      detach_from_parent(id);
      if (n_[p].first_child == kNone && is_linked(p)) {
        unlink(p);
        link_ordered(p);
      }
    }
    // Children become orphans: their prefix is broken.
    for (uint32_t c = n_[id].first_child; c != kNone;) {
      const uint32_t nxt = n_[c].next_sib;
      n_[c].parent = n_[c].next_sib = n_[c].prev_sib = kNone;
      n_[c].orphan = 1;
      if (is_linked(c)) {
        unlink(c);
        n_[c].list = kOrphans;
        push_head(c, kOrphans);
      }
      c = nxt;
    }
    n_[id].parent = n_[id].first_child = n_[id].next_sib = n_[id].prev_sib = kNone;
  }

  void set_pinned(uint32_t id, bool pinned) override {
    if (n_[id].list == kAbsent) return;
    if (pinned && is_linked(id)) {
      unlink(id);
      n_[id].list = kPinned;
    } else if (!pinned && n_[id].list == kPinned) {
      n_[id].ts = ++clock_;
      n_[id].list = home_list(id);
      push_head(id, n_[id].list);
    }
  }

  int64_t victim() override {
    if (!empty(kOrphans)) return tail(kOrphans);
    for (uint8_t first : {kLeaf0, kInner0}) {
      int64_t best = -1;
      uint64_t best_score = 0;
      for (uint8_t c = 0; c < kClasses; ++c) {
        const uint8_t l = first + c;
        if (empty(l)) continue;
        const uint32_t t = tail(l);
        const uint64_t score = (clock_ - n_[t].ts) * kAgeMultiplier[c];
        if (best < 0 || score > best_score) {
          best = t;
          best_score = score;
        }
      }
      if (best >= 0) return best;
    }
    return -1;
  }

  size_t size() const override { return size_; }

  size_t memory_bytes() const override {
    return n_.capacity() * sizeof(Node) + ghost_.capacity() * sizeof(uint16_t);
  }

 private:
  // List ids; the sentinel of list l is node cap_ + l.
  static constexpr uint8_t kOrphans = 0;
  static constexpr uint8_t kClasses = 4;  // seen once, re-used once, 2-7 times, hot
  static constexpr uint8_t kLeaf0 = 1;              // kLeaf0 + class
  static constexpr uint8_t kInner0 = 1 + kClasses;  // kInner0 + class
  static constexpr uint32_t kNumLists = 1 + 2 * kClasses;
  static constexpr uint8_t kHotUses = 8;  // re-uses that make a block "hot"
  static constexpr uint8_t kPinned = 0xFE;
  static constexpr uint8_t kAbsent = 0xFF;
  static constexpr int kWalk = 16;
  // Class weights 1 : 1.5 : 2 : 8 as integer multipliers of age (24 / weight), as prefix_freq.
  static constexpr uint64_t kAgeMultiplier[kClasses] = {24, 16, 12, 3};
  // Ghost table: kGhostPerSlot entries per slot in sets of kWays 16-bit entries
  // (12-bit tag << 4 | re-use count, saturated at 15; 0 = empty).
  static constexpr uint64_t kGhostPerSlot = 8;
  static constexpr uint64_t kWays = 4;

  bool is_linked(uint32_t id) const { return n_[id].list < kNumLists; }
  bool empty(uint8_t l) const { return n_[cap_ + l].next == cap_ + l; }
  uint32_t tail(uint8_t l) const { return n_[cap_ + l].prev; }

  uint8_t home_list(uint32_t id) const {
    if (n_[id].orphan) return kOrphans;
    const uint8_t f = n_[id].freq;
    const uint8_t c = f == 0 ? 0 : f == 1 ? 1 : f < kHotUses ? 2 : 3;
    return (n_[id].first_child == kNone ? kLeaf0 : kInner0) + c;
  }

  // Take id out of its parent's child list (its parent must be set).
  void detach_from_parent(uint32_t id) {
    const uint32_t p = n_[id].parent;
    if (n_[id].prev_sib != kNone) n_[n_[id].prev_sib].next_sib = n_[id].next_sib;
    else n_[p].first_child = n_[id].next_sib;
    if (n_[id].next_sib != kNone) n_[n_[id].next_sib].prev_sib = n_[id].prev_sib;
    n_[id].parent = n_[id].next_sib = n_[id].prev_sib = kNone;
  }

  static uint16_t ghost_tag(uint64_t fp) {
    const uint16_t t = static_cast<uint16_t>(fp >> 52);  // 12 bits
    return static_cast<uint16_t>((t == 0 ? 1 : t) << 4);
  }

  // Record a leaving block: newest in way 0, shifting older entries down to the first empty
  // way (or out of the last one).
  void remember(uint64_t fp, uint8_t freq) {
    if (fp == 0 || !history_) return;
    uint16_t* set = &ghost_[(fp & set_mask_) * kWays];
    uint64_t e = 0;
    while (e + 1 < kWays && set[e] != 0) ++e;
    for (; e > 0; --e) set[e] = set[e - 1];
    set[0] = static_cast<uint16_t>(ghost_tag(fp) | std::min<uint8_t>(freq, 15));
  }

  // The re-use count remembered for a block now stored again (its entry is taken out), or -1.
  int recall(uint64_t fp) {
    if (fp == 0 || !history_) return -1;
    uint16_t* set = &ghost_[(fp & set_mask_) * kWays];
    const uint16_t tag = ghost_tag(fp);
    for (uint64_t w = 0; w < kWays; ++w) {
      if (set[w] != 0 && (set[w] & 0xFFF0) == tag) {
        const int f = set[w] & 0xF;
        for (; w + 1 < kWays; ++w) set[w] = set[w + 1];  // close the gap: ways stay newest-first
        set[kWays - 1] = 0;
        return f;
      }
    }
    return -1;
  }

  void push_head(uint32_t id, uint8_t l) { insert_after(id, cap_ + l); }

  // Place id right after node `at` (toward the tail).
  void insert_after(uint32_t id, uint32_t at) {
    const uint32_t n = n_[at].next;
    n_[id].prev = at;
    n_[id].next = n;
    n_[n].prev = id;
    n_[at].next = id;
  }

  void unlink(uint32_t id) {
    n_[n_[id].prev].next = n_[id].next;
    n_[n_[id].next].prev = n_[id].prev;
  }

  // Link id into its home list at the place its stamp says (head = newest), looking at most
  // kWalk nodes from each end (as in prefix_freq: the closest place found otherwise).
  void link_ordered(uint32_t id) {
    const uint8_t l = home_list(id);
    n_[id].list = l;
    const uint32_t s = cap_ + l;
    if (l == kOrphans) {
      push_head(id, l);
      return;
    }
    // From the tail (oldest): stop at the first node newer than id; id goes on its tail side.
    uint32_t n = n_[s].prev;
    for (int k = 0; k < kWalk && n != s; ++k, n = n_[n].prev) {
      if (n_[n].ts > n_[id].ts) {
        insert_after(id, n);
        return;
      }
    }
    if (n == s) {  // every node is older: id is the newest
      push_head(id, l);
      return;
    }
    const uint32_t fallback = n;
    // From the head (newest): stop at the first node not newer than id; id goes before it.
    uint32_t m = n_[s].next;
    for (int k = 0; k < kWalk && m != s; ++k, m = n_[m].next) {
      if (n_[m].ts <= n_[id].ts) {
        insert_after(id, n_[m].prev);
        return;
      }
    }
    insert_after(id, fallback);
  }

  struct Node {
    uint32_t prev = 0, next = 0;  // recency list
    uint64_t ts = 0;              // logical clock of the last access
    uint32_t parent = kNone, first_child = kNone, next_sib = kNone, prev_sib = kNone;
    uint64_t fp = 0;         // fingerprint given at insert (0 = unknown)
    uint8_t list = kAbsent;  // list id, kPinned or kAbsent
    uint8_t freq = 0;        // re-uses, saturating (a ghost hit counts as one)
    uint8_t orphan = 0;
  };
  static_assert(sizeof(Node) == 48, "Node layout changed");

  bool history_;
  uint32_t cap_;
  std::vector<Node, HugePageAllocator<Node>> n_;  // cap_ slots, then one sentinel per list
  std::vector<uint16_t> ghost_;
  uint64_t set_mask_ = 0;
  uint64_t clock_ = 0;
  size_t size_ = 0;
};

// Ranks: prefix_ghost 40 (the default: listed first), prefix_freq 50, LRU 100.
const int kPrefixGhostReg = register_policy("prefix_ghost", 40, [](uint32_t c) -> std::unique_ptr<EvictionPolicy> {
  return std::make_unique<PrefixPolicy>(c, true);
});
const int kPrefixFreqReg = register_policy("prefix_freq", 50, [](uint32_t c) -> std::unique_ptr<EvictionPolicy> {
  return std::make_unique<PrefixPolicy>(c, false);
});

}  // namespace
}  // namespace kvbm
