// Host memory for the tiers: pinned (page-locked, mapped into the GPU's address space) when
// CUDA is compiled in and a GPU is present, else page-aligned pageable memory from mmap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "csrc/status.h"

namespace kvbm {

class HostBuffer {
 public:
  HostBuffer(uint8_t* data, size_t size, bool pinned) : data_(data), size_(size), pinned_(pinned) {}
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool pinned() const { return pinned_; }

 private:
  uint8_t* data_;
  size_t size_;
  bool pinned_;
};

// want_pinned: pin when possible (falls back to pageable memory when CUDA is absent).
// require_pinned: fail with kCudaUnavailable instead of falling back.
// The memory is 4096-byte aligned (usable for O_DIRECT) and zero-filled.
StatusOr<std::unique_ptr<HostBuffer>> alloc_host(size_t bytes, bool want_pinned, bool require_pinned = false);

}  // namespace kvbm
