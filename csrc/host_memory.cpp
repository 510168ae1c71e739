#include "csrc/host_memory.h"

#include <cstdlib>
#include <string>
#include <utility>

#include "csrc/build_info.h"

#ifdef KVBM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvbm {

HostBuffer::~HostBuffer() { reset(); }

HostBuffer::HostBuffer(HostBuffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
      pinned_(std::exchange(o.pinned_, false)) {}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    pinned_ = std::exchange(o.pinned_, false);
  }
  return *this;
}

void HostBuffer::reset() {
  if (data_ == nullptr) return;
#ifdef KVBM_WITH_CUDA
  if (pinned_)
    cudaFreeHost(data_);  // nothing useful to do with an error in a destructor
  else
    std::free(data_);
#else
  std::free(data_);
#endif
  data_ = nullptr;
  size_ = 0;
  pinned_ = false;
}

StatusOr<HostBuffer> alloc_host(size_t bytes, bool want_pinned) {
  if (bytes == 0) return InvalidArgument("alloc_host: bytes must be > 0");
  HostBuffer b;
#ifdef KVBM_WITH_CUDA
  if (want_pinned && cuda_available()) {
    void* p = nullptr;
    cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return CudaError("alloc_host: cudaHostAlloc(" + std::to_string(bytes) +
                       " bytes, mapped|portable) failed: " + cudaGetErrorString(e));
    }
    b.data_ = static_cast<uint8_t*>(p);
    b.size_ = bytes;
    b.pinned_ = true;
    return b;
  }
#endif
  (void)want_pinned;
  size_t rounded = (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
  void* p = std::aligned_alloc(kHostAlignment, rounded);
  if (p == nullptr)
    return CapacityExceeded("alloc_host: could not allocate " + std::to_string(bytes) + " bytes of host memory");
  b.data_ = static_cast<uint8_t*>(p);
  b.size_ = bytes;
  b.pinned_ = false;
  return b;
}

}  // namespace kvbm
