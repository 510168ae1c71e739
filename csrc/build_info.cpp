#include "csrc/build_info.h"

#ifdef KVBM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvbm {

bool cuda_compiled() {
#ifdef KVBM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef KVBM_WITH_CUDA
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no driver" error
      return 0;
    }
    return n;
  }();
  return count;
#else
  return 0;
#endif
}

bool cuda_available() { return cuda_device_count() > 0; }

}  // namespace kvbm
