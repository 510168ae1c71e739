// A 128-bit block hash as the index stores it. Block hashes come from a cryptographic (or a
// well-mixed) hash, so the bits are uniform and the table can use them directly.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvbm {

struct Hash128 {
  uint64_t lo = 0;
  uint64_t hi = 0;

  static Hash128 from_bytes(const uint8_t* p) {
    Hash128 h;
    std::memcpy(&h.lo, p, 8);
    std::memcpy(&h.hi, p + 8, 8);
    return h;
  }
  void to_bytes(uint8_t* p) const {
    std::memcpy(p, &lo, 8);
    std::memcpy(p + 8, &hi, 8);
  }
  bool is_zero() const { return lo == 0 && hi == 0; }
  bool operator==(const Hash128& o) const { return lo == o.lo && hi == o.hi; }
  bool operator!=(const Hash128& o) const { return !(*this == o); }
};

}  // namespace kvbm
