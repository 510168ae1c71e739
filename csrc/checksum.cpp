// CRC32C. Notes on the hardware path:
//
// The crc32 instruction has a latency of ~3 cycles and a throughput of one per cycle, so one
// dependent chain reaches only a third of what the unit can do. We split a chunk of 3*L bytes
// into three streams of L bytes, run them as three independent chains, and join them with
// the linearity of the raw (un-inverted) CRC register:
//     raw(r, X || Y) = Z_L(raw(r, X)) ^ raw(0, Y)      for |Y| = L,
// where Z_L(c) is "feed L zero bytes into register c" — a linear map of the 32-bit register,
// applied here with four 256-entry tables built once at start-up.
#include "csrc/checksum.h"

#include <cstring>

#if defined(__x86_64__)
#define KVBM_CRC_X86 1
#include <cpuid.h>
#include <nmmintrin.h>
#endif

namespace kvbm {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Tables {
  uint32_t slice[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      slice[0][i] = c;
    }
    for (int t = 1; t < 8; ++t)
      for (int i = 0; i < 256; ++i) slice[t][i] = (slice[t - 1][i] >> 8) ^ slice[0][slice[t - 1][i] & 0xff];
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

inline uint32_t load_le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

// Raw register update (no inversion), slicing-by-8.
uint32_t raw_table(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& T = tables().slice;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = T[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    --n;
  }
  for (; n >= 8; n -= 8, p += 8) {
    const uint32_t lo = crc ^ load_le32(p), hi = load_le32(p + 4);
    crc = T[7][lo & 0xff] ^ T[6][(lo >> 8) & 0xff] ^ T[5][(lo >> 16) & 0xff] ^ T[4][lo >> 24] ^
          T[3][hi & 0xff] ^ T[2][(hi >> 8) & 0xff] ^ T[1][(hi >> 16) & 0xff] ^ T[0][hi >> 24];
  }
  while (n--) crc = T[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return crc;
}

// Z_L as four byte-indexed tables: Z_L(c) = t[0][c&ff] ^ t[1][c>>8&ff] ^ t[2][..] ^ t[3][c>>24].
struct ZeroShift {
  uint32_t t[4][256];
  explicit ZeroShift(size_t len) {
    uint32_t basis[32];
    static const uint8_t zeros[256] = {};
    for (int j = 0; j < 32; ++j) {
      uint32_t c = 1u << j;
      for (size_t left = len; left > 0;) {
        const size_t step = left < sizeof(zeros) ? left : sizeof(zeros);
        c = raw_table(c, zeros, step);
        left -= step;
      }
      basis[j] = c;
    }
    for (int k = 0; k < 4; ++k)
      for (int b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int bit = 0; bit < 8; ++bit)
          if (b & (1 << bit)) v ^= basis[8 * k + bit];
        t[k][b] = v;
      }
  }
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
  }
};

#ifdef KVBM_CRC_X86
constexpr size_t kLongStream = 4096;  // bytes per stream for large buffers
constexpr size_t kShortStream = 256;  // and for medium ones (>= 768 bytes)

const ZeroShift& long_shift() {
  static const ZeroShift z(kLongStream);
  return z;
}
const ZeroShift& short_shift() {
  static const ZeroShift z(kShortStream);
  return z;
}

__attribute__((target("sse4.2"))) inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

__attribute__((target("sse4.2"))) uint32_t raw_hw_single(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) c = _mm_crc32_u64(c, load64(p));
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n; --n) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

// Three streams of `len` bytes (a multiple of 8) per chunk, while chunks fit.
__attribute__((target("sse4.2"))) uint32_t raw_hw_3way(uint32_t crc, const uint8_t*& p, size_t& n,
                                                       size_t len, const ZeroShift& shift) {
  while (n >= 3 * len) {
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    const uint8_t* p0 = p;
    const uint8_t* p1 = p + len;
    const uint8_t* p2 = p + 2 * len;
    for (size_t i = 0; i < len; i += 8) {
      c0 = _mm_crc32_u64(c0, load64(p0 + i));
      c1 = _mm_crc32_u64(c1, load64(p1 + i));
      c2 = _mm_crc32_u64(c2, load64(p2 + i));
    }
    crc = shift(shift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1)) ^ static_cast<uint32_t>(c2);
    p += 3 * len;
    n -= 3 * len;
  }
  return crc;
}

uint32_t raw_hw(uint32_t crc, const uint8_t* p, size_t n) {
  if (n >= 3 * kLongStream) crc = raw_hw_3way(crc, p, n, kLongStream, long_shift());
  if (n >= 3 * kShortStream) crc = raw_hw_3way(crc, p, n, kShortStream, short_shift());
  return raw_hw_single(crc, p, n);
}

bool detect_sse42() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  return ecx & (1u << 20);
}
#endif

}  // namespace

bool crc32c_hw_supported() {
#ifdef KVBM_CRC_X86
  static const bool ok = detect_sse42();
  return ok;
#else
  return false;
#endif
}

const char* crc32c_impl_name() { return crc32c_hw_supported() ? "sse4.2" : "table"; }

void crc32c_rows(const uint8_t* base, size_t rows, size_t row_bytes, size_t stride, uint32_t* out) {
  for (size_t i = 0; i < rows; ++i) out[i] = crc32c(base + i * stride, row_bytes, 0);
}

uint32_t crc32c(const void* p, size_t n, uint32_t crc, Crc32cImpl impl) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
#ifdef KVBM_CRC_X86
  // kSse42 on a CPU without SSE4.2 falls back to the table rather than faulting.
  if ((impl == Crc32cImpl::kSse42 || impl == Crc32cImpl::kAuto) && crc32c_hw_supported())
    return ~raw_hw(~crc, b, n);
#endif
  return ~raw_table(~crc, b, n);
}

uint32_t crc32c(const void* p, size_t n, uint32_t crc) { return crc32c(p, n, crc, Crc32cImpl::kAuto); }

}  // namespace kvbm
