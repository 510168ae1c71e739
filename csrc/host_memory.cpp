#include "csrc/host_memory.h"

#include <sys/mman.h>

#include <cstring>
#include <string>

#include "csrc/build_info.h"

#ifdef KVBM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvbm {

HostBuffer::~HostBuffer() {
  if (!data_) return;
#ifdef KVBM_WITH_CUDA
  if (pinned_) {
    cudaFreeHost(data_);
    return;
  }
#endif
  munmap(data_, size_);
}

StatusOr<std::unique_ptr<HostBuffer>> alloc_host(size_t bytes, bool want_pinned, bool require_pinned) {
  if (bytes == 0) return InvalidArgument("host allocation of 0 bytes");
#ifdef KVBM_WITH_CUDA
  if (want_pinned && cuda_available()) {
    void* p = nullptr;
    cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped);
    if (err == cudaSuccess) {
      std::memset(p, 0, bytes);
      return std::make_unique<HostBuffer>(static_cast<uint8_t*>(p), bytes, true);
    }
    cudaGetLastError();
    if (require_pinned)
      return CudaError("cudaHostAlloc(" + std::to_string(bytes) + " bytes) failed: " + cudaGetErrorString(err));
  }
#endif
  if (require_pinned)
    return CudaUnavailable("pinned host memory needs a CUDA build and a GPU (cuda_available() is False)");
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return CapacityExceeded("could not map " + std::to_string(bytes) + " bytes of host memory: " + std::strerror(errno));
  return std::make_unique<HostBuffer>(static_cast<uint8_t*>(p), bytes, false);
}

}  // namespace kvbm
