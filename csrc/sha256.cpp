// SHA-256 per FIPS 180-4. Two compression functions share one padding/driver:
//  * portable: the textbook 64-round loop on a 16-word rolling message schedule;
//  * SHA-NI: Intel's SHA extensions (sha256rnds2 / sha256msg1 / sha256msg2), which keep the
//    working variables as two 128-bit registers {A,B,E,F} and {C,D,G,H} and do two rounds
//    per instruction. Only that one function is compiled for "sha,sse4.1"; callers reach it
//    through a run-time CPU check, so the library still runs on baseline x86-64.
#include "csrc/sha256.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define KVBM_SHA_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace kvbm::sha256 {

// First 32 bits of the fractional parts of the square roots of the first 8 primes.
const uint32_t kInitialState[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

namespace {

// First 32 bits of the fractional parts of the cube roots of the first 64 primes.
alignas(64) constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

const uint32_t* const kInit = kInitialState;

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
inline uint32_t load_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}
inline void store_be32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}

void compress_portable(uint32_t st[8], const uint8_t* p, size_t nblocks) {
  for (; nblocks > 0; --nblocks, p += kBlockSize) {
    uint32_t w[16];
    for (int i = 0; i < 16; ++i) w[i] = load_be32(p + 4 * i);
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
    for (int t = 0; t < 64; ++t) {
      uint32_t wt;
      if (t < 16) {
        wt = w[t];
      } else {
        // W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16], kept in a 16-entry ring.
        uint32_t w15 = w[(t - 15) & 15], w2 = w[(t - 2) & 15];
        uint32_t s0 = rotr(w15, 7) ^ rotr(w15, 18) ^ (w15 >> 3);
        uint32_t s1 = rotr(w2, 17) ^ rotr(w2, 19) ^ (w2 >> 10);
        wt = w[t & 15] = s1 + w[(t - 7) & 15] + s0 + w[t & 15];
      }
      uint32_t big_s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
      uint32_t ch = (e & f) ^ (~e & g);
      uint32_t t1 = h + big_s1 + ch + kK[t] + wt;
      uint32_t big_s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
      uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
      uint32_t t2 = big_s0 + maj;
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    st[0] += a;
    st[1] += b;
    st[2] += c;
    st[3] += d;
    st[4] += e;
    st[5] += f;
    st[6] += g;
    st[7] += h;
  }
}

#ifdef KVBM_SHA_X86
// Register layout (dword 3..0): abef = {A,B,E,F}, cdgh = {C,D,G,H}. sha256rnds2(cdgh, abef, wk)
// runs two rounds with the two low dwords of wk (= W[t] + K[t]) and returns the new {A,B,E,F};
// after two rounds the old {A,B,E,F} is exactly the new {C,D,G,H}, so the two registers swap
// roles every call and are back in place after each group of four rounds.
__attribute__((target("sha,sse4.1"))) void compress_shani(uint32_t st[8], const uint8_t* p,
                                                          size_t nblocks) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(st));      // A B C D (dword 0..3)
  __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(st + 4));  // E F G H
  lo = _mm_shuffle_epi32(lo, 0xB1);                                       // B A D C
  hi = _mm_shuffle_epi32(hi, 0x1B);                                       // H G F E
  __m128i abef = _mm_alignr_epi8(lo, hi, 8);                              // F E B A
  __m128i cdgh = _mm_blend_epi16(hi, lo, 0xF0);                           // H G D C

  for (; nblocks > 0; --nblocks, p += kBlockSize) {
    const __m128i abef_in = abef, cdgh_in = cdgh;
    __m128i w[4];
    for (int i = 0; i < 4; ++i)
      w[i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)), bswap);
#pragma GCC unroll 16
    for (int g = 0; g < 16; ++g) {
      __m128i cur;
      if (g < 4) {
        cur = w[g];
      } else {
        // W[4g..4g+3] from w[g&3] = W[4g-16..], w[g+1] = W[4g-12..], w[g+2] = W[4g-8..],
        // w[g+3] = W[4g-4..]; alignr picks W[4g-7..4g-4] for the "+ W[t-7]" term.
        __m128i t = _mm_sha256msg1_epu32(w[g & 3], w[(g + 1) & 3]);
        t = _mm_add_epi32(t, _mm_alignr_epi8(w[(g + 3) & 3], w[(g + 2) & 3], 4));
        cur = _mm_sha256msg2_epu32(t, w[(g + 3) & 3]);
        w[g & 3] = cur;
      }
      __m128i wk = _mm_add_epi32(cur, _mm_load_si128(reinterpret_cast<const __m128i*>(kK + 4 * g)));
      cdgh = _mm_sha256rnds2_epu32(cdgh, abef, wk);  // cdgh now holds the new A,B,E,F
      wk = _mm_shuffle_epi32(wk, 0x0E);
      abef = _mm_sha256rnds2_epu32(abef, cdgh, wk);  // and abef the newest A,B,E,F
      // After two rnds2 calls: abef = {A,B,E,F}, cdgh = {C,D,G,H} again.
    }
    abef = _mm_add_epi32(abef, abef_in);
    cdgh = _mm_add_epi32(cdgh, cdgh_in);
  }

  __m128i t = _mm_shuffle_epi32(abef, 0x1B);  // A B E F (dword 0..3)
  __m128i u = _mm_shuffle_epi32(cdgh, 0xB1);  // G H C D
  _mm_storeu_si128(reinterpret_cast<__m128i*>(st), _mm_blend_epi16(t, u, 0xF0));    // A B C D
  _mm_storeu_si128(reinterpret_cast<__m128i*>(st + 4), _mm_alignr_epi8(u, t, 8));  // E F G H
}

// Two independent single-block compressions with their instructions interleaved.
__attribute__((target("sha,sse4.1"))) void compress_shani_x2(uint32_t sta[8], const uint8_t* pa, uint32_t stb[8],
                                                             const uint8_t* pb) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i abef[2], cdgh[2], abef_in[2], cdgh_in[2], w[2][4];
  uint32_t* st[2] = {sta, stb};
  const uint8_t* p[2] = {pa, pb};
  for (int s = 0; s < 2; ++s) {
    __m128i lo = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st[s])), 0xB1);
    __m128i hi = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st[s] + 4)), 0x1B);
    abef_in[s] = abef[s] = _mm_alignr_epi8(lo, hi, 8);
    cdgh_in[s] = cdgh[s] = _mm_blend_epi16(hi, lo, 0xF0);
    for (int i = 0; i < 4; ++i)
      w[s][i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[s] + 16 * i)), bswap);
  }
#pragma GCC unroll 16
  for (int g = 0; g < 16; ++g) {
    const __m128i k = _mm_load_si128(reinterpret_cast<const __m128i*>(kK + 4 * g));
#pragma GCC unroll 2
    for (int s = 0; s < 2; ++s) {
      __m128i cur;
      if (g < 4) {
        cur = w[s][g];
      } else {
        __m128i t = _mm_sha256msg1_epu32(w[s][g & 3], w[s][(g + 1) & 3]);
        t = _mm_add_epi32(t, _mm_alignr_epi8(w[s][(g + 3) & 3], w[s][(g + 2) & 3], 4));
        cur = _mm_sha256msg2_epu32(t, w[s][(g + 3) & 3]);
        w[s][g & 3] = cur;
      }
      __m128i wk = _mm_add_epi32(cur, k);
      cdgh[s] = _mm_sha256rnds2_epu32(cdgh[s], abef[s], wk);
      wk = _mm_shuffle_epi32(wk, 0x0E);
      abef[s] = _mm_sha256rnds2_epu32(abef[s], cdgh[s], wk);
    }
  }
  for (int s = 0; s < 2; ++s) {
    __m128i t = _mm_shuffle_epi32(_mm_add_epi32(abef[s], abef_in[s]), 0x1B);
    __m128i u = _mm_shuffle_epi32(_mm_add_epi32(cdgh[s], cdgh_in[s]), 0xB1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(st[s]), _mm_blend_epi16(t, u, 0xF0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(st[s] + 4), _mm_alignr_epi8(u, t, 8));
  }
}

bool detect_shani() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool ssse3 = ecx & (1u << 9), sse41 = ecx & (1u << 19);
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool sha = ebx & (1u << 29);
  return ssse3 && sse41 && sha;
}
#endif

}  // namespace

bool shani_supported() {
#ifdef KVBM_SHA_X86
  static const bool ok = detect_shani();
  return ok;
#else
  return false;
#endif
}

const char* active_impl_name() { return shani_supported() ? "sha-ni" : "portable"; }

void compress(uint32_t state[8], const uint8_t* blocks, size_t nblocks, Impl impl) {
  if (nblocks == 0) return;
#ifdef KVBM_SHA_X86
  // kShaNi on a CPU without SHA falls back to portable rather than faulting.
  if ((impl == Impl::kShaNi || impl == Impl::kAuto) && shani_supported()) {
    compress_shani(state, blocks, nblocks);
    return;
  }
#endif
  compress_portable(state, blocks, nblocks);
}

void compress_x2(uint32_t state_a[8], const uint8_t* block_a, uint32_t state_b[8], const uint8_t* block_b,
                 Impl impl) {
#ifdef KVBM_SHA_X86
  if ((impl == Impl::kShaNi || impl == Impl::kAuto) && shani_supported()) {
    compress_shani_x2(state_a, block_a, state_b, block_b);
    return;
  }
#endif
  compress_portable(state_a, block_a, 1);
  compress_portable(state_b, block_b, 1);
}

void digest(const void* data, size_t n, uint8_t out[kDigestSize], Impl impl) {
  // Resolve the dispatch once per message rather than once per block.
  if (impl == Impl::kAuto) impl = shani_supported() ? Impl::kShaNi : Impl::kPortable;
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint32_t st[8];
  std::memcpy(st, kInit, sizeof(st));
  const size_t full = n / kBlockSize;
  compress(st, p, full, impl);
  // Tail: the remaining bytes, 0x80, zeros, and the 64-bit big-endian bit length; one or two
  // blocks depending on whether 9 more bytes fit after the remainder.
  uint8_t tail[2 * kBlockSize] = {};
  const size_t rem = n - full * kBlockSize;
  if (rem) std::memcpy(tail, p + full * kBlockSize, rem);
  tail[rem] = 0x80;
  const size_t tail_blocks = rem + 9 <= kBlockSize ? 1 : 2;
  const uint64_t bits = uint64_t(n) * 8;
  for (int i = 0; i < 8; ++i) tail[tail_blocks * kBlockSize - 1 - i] = uint8_t(bits >> (8 * i));
  compress(st, tail, tail_blocks, impl);
  for (int i = 0; i < 8; ++i) store_be32(out + 4 * i, st[i]);
}

Hasher::Hasher(Impl impl) : impl_(impl == Impl::kAuto ? (shani_supported() ? Impl::kShaNi : Impl::kPortable)
                                                      : impl) {
  std::memcpy(state_, kInit, 8 * sizeof(uint32_t));
}

void Hasher::update(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (buf_len_) {
    const size_t take = n < kBlockSize - buf_len_ ? n : kBlockSize - buf_len_;
    std::memcpy(buf_ + buf_len_, p, take);
    buf_len_ += take;
    p += take;
    n -= take;
    if (buf_len_ < kBlockSize) return;
    compress(state_, buf_, 1, impl_);
    buf_len_ = 0;
  }
  const size_t full = n / kBlockSize;
  compress(state_, p, full, impl_);
  p += full * kBlockSize;
  n -= full * kBlockSize;
  if (n) std::memcpy(buf_, p, n);
  buf_len_ = n;
}

void Hasher::finish(uint8_t out[kDigestSize]) {
  uint8_t tail[2 * kBlockSize] = {};
  if (buf_len_) std::memcpy(tail, buf_, buf_len_);
  tail[buf_len_] = 0x80;
  const size_t tail_blocks = buf_len_ + 9 <= kBlockSize ? 1 : 2;
  const uint64_t bits = total_ * 8;
  for (int i = 0; i < 8; ++i) tail[tail_blocks * kBlockSize - 1 - i] = uint8_t(bits >> (8 * i));
  compress(state_, tail, tail_blocks, impl_);
  for (int i = 0; i < 8; ++i) store_be32(out + 4 * i, state_[i]);
}

}  // namespace kvbm::sha256
