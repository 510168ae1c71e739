// fast128 (spec in csrc/fast_hash.h and docs/hashing.md).
#include "csrc/fast_hash.h"

#include <cstring>

namespace kvbm {
namespace {

constexpr uint64_t kK0 = 0x6a09e667f3bcc908ULL;
constexpr uint64_t kK1 = 0xbb67ae8584caa73bULL;
constexpr uint64_t kK2 = 0x3c6ef372fe94f82bULL;
constexpr uint64_t kK3 = 0xa54ff53a5f1d36f1ULL;

inline uint64_t load_le64(const uint8_t* p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
#else
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
#endif
}

inline void store_le64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}

struct Acc {
  uint64_t a, b;
};

inline void lane(Acc& acc, uint64_t x, uint64_t y, uint64_t kx, uint64_t ky) {
  const unsigned __int128 prod = static_cast<unsigned __int128>(x ^ kx) * (y ^ ky);
  acc.a += static_cast<uint64_t>(prod) ^ y;
  acc.b += static_cast<uint64_t>(prod >> 64) ^ x;
}

// The digest's two words; `seed` is XORed into a's start (0 for fast128 itself).
template <bool kPadded>
inline Acc fast128_impl(const uint8_t* p, size_t n, uint64_t seed) {
  // Two accumulator pairs (even/odd lanes) so consecutive multiplies do not wait on one
  // another's additions; the sums are mod 2^64 and commutative, so this equals the spec.
  Acc e{kK0 ^ static_cast<uint64_t>(n) ^ seed, kK1}, o{0, 0};
  uint64_t kx = kK2, ky = kK3;  // K2 + i*K3 and K3 + i*K2 for lane i
  size_t left = n;
  while (left >= 32) {
    lane(e, load_le64(p), load_le64(p + 8), kx, ky);
    kx += kK3;
    ky += kK2;
    lane(o, load_le64(p + 16), load_le64(p + 24), kx, ky);
    kx += kK3;
    ky += kK2;
    p += 32;
    left -= 32;
  }
  if (left >= 16) {
    lane(e, load_le64(p), load_le64(p + 8), kx, ky);
    kx += kK3;
    ky += kK2;
    p += 16;
    left -= 16;
  }
  if (left > 0) {
    if constexpr (kPadded) {
      lane(o, load_le64(p), load_le64(p + 8), kx, ky);
    } else {
      uint8_t last[16] = {};
      std::memcpy(last, p, left);
      lane(o, load_le64(last), load_le64(last + 8), kx, ky);
    }
  }
  uint64_t a = e.a + o.a, b = e.b + o.b;
  a = fmix64(a);
  b = fmix64(b ^ a);
  a = fmix64(a + b);
  b = fmix64(b ^ a);
  return Acc{a, b};
}

inline void store_digest(const Acc& d, uint8_t out[kFast128DigestSize]) {
  store_le64(out, d.a);
  store_le64(out + 8, d.b);
}

}  // namespace

void fast128(const void* data, size_t n, uint8_t out[kFast128DigestSize]) {
  store_digest(fast128_impl<false>(static_cast<const uint8_t*>(data), n, 0), out);
}

void fast128_zero_padded(const uint8_t* data, size_t n, uint8_t out[kFast128DigestSize]) {
  store_digest(fast128_impl<true>(data, n, 0), out);
}

uint64_t fast64_seeded(uint64_t seed, const void* data, size_t n) {
  return fast128_impl<false>(static_cast<const uint8_t*>(data), n, seed).a;
}

}  // namespace kvbm
