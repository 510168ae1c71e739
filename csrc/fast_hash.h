// fast128: kvbm's own non-cryptographic 128-bit hash for trusted, single-tenant block hashing.
//
// NOT collision resistant against an adversary who chooses token ids: use it only where every
// prompt comes from one trusted tenant. Byte-exact specification (also in docs/hashing.md):
//
//   K0..K3 = 0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1
//            (first 64 fractional bits of sqrt(2), sqrt(3), sqrt(5), sqrt(7))
//   all arithmetic mod 2^64; LE64 = little-endian 64-bit load; n = message length in bytes
//   pad the message with zero bytes to L = ceil(n/16) lanes of 16 bytes (L = 0 when n = 0)
//   a = K0 ^ n ; b = K1
//   for lane i in 0..L-1:  x = LE64(lane[0:8]), y = LE64(lane[8:16])
//       u = x ^ (K2 + i*K3) ; v = y ^ (K3 + i*K2)
//       P = u * v  (full 128-bit product), lo = P mod 2^64, hi = P >> 64
//       a = a + (lo ^ y) ; b = b + (hi ^ x)
//   fmix(z): z ^= z>>33; z *= 0xff51afd7ed558ccd; z ^= z>>33; z *= 0xc4ceb9fe1a85ec53; z ^= z>>33
//   a = fmix(a) ; b = fmix(b ^ a) ; a = fmix(a + b) ; b = fmix(b ^ a)
//   digest = LE64(a) || LE64(b)
//
// Lanes are independent until the final mix, so the loop runs at multiply throughput. The
// final mix is a bijection of (a, b), so no entropy gathered by the lanes is lost.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm {

constexpr size_t kFast128DigestSize = 16;

// fmix above (murmur3's 64-bit finaliser): a bijection with full avalanche. Also the mixer of
// kvbm's open-addressing tables (csrc/lru_table.h).
inline uint64_t fmix64(uint64_t z) {
  z ^= z >> 33;
  z *= 0xff51afd7ed558ccdULL;
  z ^= z >> 33;
  z *= 0xc4ceb9fe1a85ec53ULL;
  z ^= z >> 33;
  return z;
}

// Whether this machine stores integers little-endian (token ids are hashed as LE32 words).
inline constexpr bool kHostLittleEndian =
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    false;
#else
    true;
#endif

void fast128(const void* data, size_t n, uint8_t out[kFast128DigestSize]);

// Same result as fast128(), for callers whose buffer is already zero-padded: the bytes
// [n, round_up(n, 16)) must be readable and zero. Saves the copy of the partial last lane.
void fast128_zero_padded(const uint8_t* data, size_t n, uint8_t out[kFast128DigestSize]);

// fast128 with `seed` XORed into the start state (a = K0 ^ n ^ seed), returning a, the digest's
// first 8 bytes read as LE64; fast64_seeded(0, m, n) is the first half of fast128(m). For keyed
// chains (the router's block keys): the seed enters a before any lane is added and the final mix
// is a bijection, so messages equal under different seeds never give equal (a, b) pairs.
uint64_t fast64_seeded(uint64_t seed, const void* data, size_t n);

}  // namespace kvbm
