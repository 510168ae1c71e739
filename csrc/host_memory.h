// Host memory for the host tier and for transfer staging.
//
// alloc_host() returns pinned memory (cudaHostAlloc with cudaHostAllocMapped |
// cudaHostAllocPortable) when CUDA is compiled in AND a GPU is usable, so that every device can
// DMA into it and kernels can read and write it through its (UVA-identical) device address.
// Otherwise it returns 4096-byte-aligned pageable memory; pinned() tells which one you got.
// The memory is not initialised.
#pragma once

#include <cstddef>
#include <cstdint>

#include "csrc/status.h"

namespace kvbm {

// Owns one host allocation; move-only; frees it with the matching call on destruction.
class HostBuffer {
 public:
  HostBuffer() = default;
  ~HostBuffer();
  HostBuffer(HostBuffer&& o) noexcept;
  HostBuffer& operator=(HostBuffer&& o) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  // True when the memory is page-locked and mapped into every device's address space.
  bool pinned() const { return pinned_; }

 private:
  friend StatusOr<HostBuffer> alloc_host(size_t bytes, bool want_pinned);
  void reset();
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool pinned_ = false;
};

inline constexpr size_t kHostAlignment = 4096;

// bytes must be > 0. want_pinned=false always gives pageable memory. want_pinned=true gives pinned
// memory when CUDA is compiled and available, else pageable; it returns CudaError when the pinned
// allocation itself fails (the caller may then retry with want_pinned=false), and
// CapacityExceeded when even pageable memory cannot be had.
StatusOr<HostBuffer> alloc_host(size_t bytes, bool want_pinned);

}  // namespace kvbm
