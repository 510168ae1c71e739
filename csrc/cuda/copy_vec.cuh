// Device-side byte moving shared by kvbm's copy kernels (kv_copy.cu, chunk_copy.cu): one CTA
// copies one contiguous range with the widest accesses its alignment allows.
//
// The CTA's threads take consecutive vectors (coalesced), kUnroll of them in flight per thread
// before the first store, so that enough loads are outstanding to cover HBM, NVLink or PCIe
// latency. The widest vector V that divides both addresses is used for the body; the bytes past
// the last whole vector (a length that is not a multiple of V) are copied one by one.
#pragma once

#include <cstdint>

namespace kvbm::cuda {

template <typename V, int kUnroll>
__device__ __forceinline__ void copy_vec(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src, uint64_t n) {
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  const uint64_t m = n / sizeof(V);
  const uint64_t stride = blockDim.x;
  uint64_t j = threadIdx.x;
  for (; j + (kUnroll - 1) * stride < m; j += kUnroll * stride) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = s[j + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[j + u * stride] = v[u];
  }
  for (; j < m; j += stride) d[j] = s[j];
  // Tail: the n % sizeof(V) bytes after the last whole vector.
  if constexpr (sizeof(V) > 1) {
    const uint64_t done = m * sizeof(V);
    for (uint64_t k = done + threadIdx.x; k < n; k += stride) dst[k] = src[k];
  }
}

// Copies n bytes (any alignment, not overlapping) with all threads of the calling CTA.
__device__ __forceinline__ void copy_range(uint8_t* dst, const uint8_t* src, uint64_t n) {
  const uint64_t a = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  if ((a & 15) == 0)
    copy_vec<uint4, 4>(dst, src, n);
  else if ((a & 7) == 0)
    copy_vec<uint2, 4>(dst, src, n);
  else if ((a & 3) == 0)
    copy_vec<uint32_t, 4>(dst, src, n);
  else
    copy_vec<uint8_t, 4>(dst, src, n);
}

}  // namespace kvbm::cuda
