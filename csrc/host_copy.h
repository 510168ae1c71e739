// copy_bytes: memcpy for host blocks, without glibc's slow 4K-aliasing case.
//
// Note [Host copies]
// glibc's memcpy copies mid-size buffers with `rep movsb` on CPUs with ERMS/FSRM. Measured on the
// AMD EPYC dev box (benchmarks/results/host_copy.md), that path drops from ~9 GB/s to ~1.4-1.7 GB/s
// when the destination sits 1..31 bytes past the source modulo 4096: exactly a 64 KiB block copied
// from a page-aligned arena slot into a numpy array, whose data starts 16 bytes into its page (the
// host tier's load ran at 0.19x of a numpy copy). copy_bytes() copies those cases with 16-byte
// SSE2 loads and aligned stores (~6 GB/s whatever the offsets) and leaves every other case, and
// every other architecture, to memcpy. Same contract as memcpy: the ranges must not overlap.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define KVBM_HOST_COPY_SSE2 1
#endif

namespace kvbm {

// True where memcpy would take the slow path that copy_bytes avoids (see the note).
inline bool host_copy_aliased(const void* dst, const void* src, size_t n) {
#if KVBM_HOST_COPY_SSE2
  const uintptr_t delta = (reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(src)) & 4095;
  return n >= 4096 && delta != 0 && delta < 64;
#else
  (void)dst, (void)src, (void)n;
  return false;
#endif
}

// The SSE2 loop alone (tests and the side-by-side benchmark call it on every offset).
inline void copy_bytes_sse2(void* dst, const void* src, size_t n) {
#if KVBM_HOST_COPY_SSE2
  auto* d = static_cast<uint8_t*>(dst);
  auto* s = static_cast<const uint8_t*>(src);
  const size_t head = std::min<size_t>(n, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  d += head, s += head, n -= head;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_store_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_store_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
    _mm_store_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
    _mm_store_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
  }
  std::memcpy(d + i, s + i, n - i);
#else
  std::memcpy(dst, src, n);
#endif
}

inline void copy_bytes(void* dst, const void* src, size_t n) {
  if (host_copy_aliased(dst, src, n))
    copy_bytes_sse2(dst, src, n);
  else
    std::memcpy(dst, src, n);
}

}  // namespace kvbm
